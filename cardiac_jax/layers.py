"""Shared Flax building blocks for the image models.

Convolutions go through `Conv`, which owns one kernel parameter (kh, kw, C_in, C_out) and can
compute the same function two ways:

- "xla":    `lax.conv_general_dilated`, the natural choice on GPU/TPU;
- "im2col": the kh*kw shifted views of the padded input concatenated on the channel axis and one
            matmul with the reshaped kernel; its gradient is only matmuls and slices, which helps
            on backends whose convolution backward pass is slow.
- "auto":   the implementation measured fastest on the backend: "xla" everywhere, also on the
            CPU with the convolution flag every command sets (`cardiac_jax.runtime`), where
            "im2col" writes and reads a 9x larger patch tensor (timings: docs/implementation_notes.md and
            benchmarks/README.md).

Both share the parameter layout, so a checkpoint trained with one runs with the other.
Upsampling is nearest-neighbour + convolution: transposed convolutions are never used (they are
an order of magnitude slower on XLA:CPU and cause checkerboard artefacts).

The residual block follows the Soft-IntroVAE image model (Daniel & Tamar, CVPR 2021):
skip = 1x1 conv (no bias) when the channel count changes; main = conv3x3 -> BN -> LeakyReLU(0.2)
-> conv3x3 -> BN; out = LeakyReLU(0.2)(main + skip).

Rematerialisation (`recompute_in_backward`, `apply_recomputed`): a block keeps only its inputs
for the backward pass, which recomputes its activations. `jax.checkpoint` alone does not order
that recomputation after the block's output cotangent: XLA:CPU removes the optimisation barrier
that would (its `cse_barrier_expander` pass runs before scheduling), and its scheduler then
recomputes every block during the forward pass, which holds all activations at once, as if
nothing were rematerialised. Here the recomputed inputs carry a data dependency on the
cotangent, x + (c - c) with c one element of the cotangent, which is x exactly for a finite c
(a non-finite c gives non-finite gradients either way), so no backend can start the
recomputation early. The input cotangents are returned as arrays of their own, not as fused
elementwise expressions of the block's larger intermediates, which a distant consumer (a
UNet's skip connection) would otherwise keep alive until its own backward pass. (Running the
recomputation in a `lax.cond` on the cotangent does both too, but XLA:CPU runs such a branch
of convolutions ten times slower.)
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any
Initializer = Callable[..., jax.Array]

CONV_IMPLS = ("auto", "xla", "im2col")


def resolve_conv_impl(impl: str) -> str:
  """Maps "auto" to the implementation that is fastest on the default backend."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}")
  if impl == "auto":
    return "xla"
  return impl


def conv2d_same(x: jax.Array, kernel: jax.Array, impl: str) -> jax.Array:
  """Stride-1 'SAME' 2D convolution.

  Args:
    x: (B, H, W, C_in).
    kernel: (kh, kw, C_in, C_out), odd kh and kw.
    impl: "xla" or "im2col" (already resolved).
  Returns:
    (B, H, W, C_out).
  """
  kh, kw, c_in, c_out = kernel.shape
  if kh == 1 and kw == 1:
    return jnp.einsum("bhwc,cd->bhwd", x, kernel[0, 0])
  if impl == "xla":
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  ph, pw = kh // 2, kw // 2
  height, width = x.shape[1], x.shape[2]
  padded = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  # Patch channel order (dy, dx, c) matches kernel.reshape(kh * kw * c_in, c_out).
  patches = jnp.concatenate(
      [padded[:, dy:dy + height, dx:dx + width, :]
       for dy in range(kh) for dx in range(kw)], axis=-1)
  return jnp.einsum("bhwk,kd->bhwd", patches, kernel.reshape(kh * kw * c_in, c_out))


class Conv(nn.Module):
  """Stride-1 'SAME' convolution with a selectable implementation (see module docstring)."""
  features: int
  kernel_size: int = 3
  use_bias: bool = True
  impl: str = "auto"
  dtype: Dtype | None = None
  kernel_init: Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init,
                        (self.kernel_size, self.kernel_size, x.shape[-1], self.features),
                        jnp.float32)
    dtype = self.dtype or x.dtype
    y = conv2d_same(x.astype(dtype), kernel.astype(dtype), resolve_conv_impl(self.impl))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
      y = y + bias.astype(dtype)
    return y


def avg_pool2(x: jax.Array) -> jax.Array:
  """2x2 average pooling with stride 2 on (B, H, W, C), H and W even."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def upsample_nearest2(x: jax.Array) -> jax.Array:
  """Nearest-neighbour x2 upsampling of (B, H, W, C) to (B, 2H, 2W, C)."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


class ResBlock(nn.Module):
  """Soft-IntroVAE residual block (see module docstring). (B, H, W, C_in) -> (B, H, W, C_out)."""
  features: int
  conv_impl: str = "auto"
  dtype: Dtype | None = None
  bn_axis_name: str | None = None
  kernel_init: Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = lambda name: nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
        axis_name=self.bn_axis_name, name=name)
    conv = lambda name, k: Conv(self.features, k, use_bias=False, impl=self.conv_impl,
                                dtype=self.dtype, kernel_init=self.kernel_init, name=name)
    skip = x if x.shape[-1] == self.features else conv("skip", 1)(x)
    h = conv("conv1", 3)(x)
    h = nn.leaky_relu(norm("bn1")(h), 0.2)
    h = conv("conv2", 3)(h)
    h = norm("bn2")(h)
    return nn.leaky_relu(h + skip, 0.2)


# ------------------------------------------------------------------------- rematerialisation
def _after(tree: Any, anchor: jax.Array) -> Any:
  """`tree` with every floating-point and PRNG-key leaf made data-dependent on `anchor`
  (values unchanged for a finite anchor): leaf + (a - a), a the first element of `anchor`.
  Keys too: random bits drawn from an untied key in the recomputation would be the same
  computation as in the forward pass, which XLA merges, keeping the bits alive in between."""
  first = jnp.ravel(anchor)[0]
  zero = first - first

  def tie(leaf):
    if not isinstance(leaf, jax.Array):
      return leaf
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      data = jax.random.key_data(leaf)
      return jax.random.wrap_key_data(data + zero.astype(data.dtype),
                                      impl=jax.random.key_impl(leaf))
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      return leaf + zero.astype(leaf.dtype)
    return leaf

  return jax.tree.map(tie, tree)


def _materialised(x: jax.Array) -> jax.Array:
  """x, computed as a product with the identity over its last axis (exact for finite x).

  A matrix product is never fused into its consumers, so x becomes an array of its own when
  its operands are ready, instead of an elementwise expression that a late consumer would
  evaluate, keeping every (larger) operand of the expression alive until then."""
  eye = jnp.eye(x.shape[-1], dtype=x.dtype)
  return jnp.einsum("...c,cd->...d", x, eye, precision=jax.lax.Precision.HIGHEST)


def recompute_in_backward(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """fn(params, *inputs) -> array, differentiated by recomputing fn in the backward pass.

  The forward pass keeps `params` and `inputs` only; the backward pass recomputes fn from
  arguments tied to the output cotangent (module docstring), so the recomputation cannot run
  before the cotangent exists, and returns the input cotangents as finished arrays
  (`_materialised`). Same values and gradients as fn for a finite cotangent (a non-finite
  one gives non-finite gradients). Inputs that are not floating point (PRNG keys, None) get
  no cotangent.
  """

  @jax.custom_vjp
  def recomputed(params, *inputs):
    return fn(params, *inputs)

  def forward(params, *inputs):
    return fn(params, *inputs), (params, inputs)

  def backward(residuals, cotangent):
    # Parameters too: what the block computes from them alone (GroupNorm scales broadcast to
    # the activations' shape) would otherwise be shared with the forward pass and kept.
    params, inputs = _after(residuals, cotangent)
    _, vjp = jax.vjp(fn, params, *inputs)
    params_grad, *inputs_grad = vjp(cotangent)

    def finished(grad):
      if grad.dtype == jax.dtypes.float0:   # A PRNG key's.
        return None
      return _materialised(grad) if grad.ndim else grad

    return (params_grad, *jax.tree.map(finished, inputs_grad))

  recomputed.defvjp(forward, backward)
  return recomputed


def apply_recomputed(block: nn.Module, *inputs) -> jax.Array:
  """Calls the bound submodule `block` (variables: "params" only) on `inputs`, its activations
  recomputed in the backward pass (`recompute_in_backward`). The parameter tree is the one
  `block(*inputs)` creates; during initialisation that is what runs."""
  if block.is_initializing():
    return block(*inputs)
  definition = block.clone(parent=None)
  apply = lambda params, *args: definition.apply({"params": params}, *args)
  return recompute_in_backward(apply)(block.variables["params"], *inputs)
