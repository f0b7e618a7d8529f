"""Convolutional beta-VAE of Attri-VAE, the baseline AR-SIVAE is compared against.

The network is the beta-VAE image model of Higgins et al. (ICLR 2017), with one more stride-2
level for 128 px inputs, as Attri-VAE (Cetin et al. 2023) and the AR-SIVAE reference code
(Di Folco et al., MICCAI 2024) use it. No normalisation layers. With L = len(channels),
H = W = 4 * 2**L and F = bottleneck_features:

Encoder (B, H, W, C_in) -> mu, logvar (B, zdim):
  for c in channels: conv4x4 stride 2 pad 1 (-> c) -> ReLU;       H -> 4
  conv4x4 valid (-> F) -> ReLU;                                  4 -> 1
  Dense(2 * zdim).
Decoder (B, zdim) -> (B, H, W, C_out):
  Dense(F) -> ReLU;  transposed conv4x4 (F -> channels[-1]), 1 -> 4;  then one transposed
  conv4x4 stride 2 pad 1 per level to channels[-2], ..., channels[0], C_out with ReLU between;
  linear output (the reference has no output sigmoid).

Channels (32,) * 5, F = 256, zdim 128, one 128 px channel is the reference model.
Transposed convolutions keep PyTorch's kernel (4, 4, C_in, C_out): y[2i + ky - 1] += x[i] k[ky]
per axis. They are computed as a sub-pixel convolution (one 3x3 'SAME' convolution to 4 C_out
channels, one per output phase, then depth-to-space), the same function without XLA:CPU's slow
transposed-convolution kernels. Encoder and decoder are separate submodules ("encoder",
"decoder") with the `(x, train)` interface of `cardiac_jax.models.vae`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cardiac_jax import layers
from cardiac_jax.models import vae
from cardiac_jax.models.vae import INITIALIZERS

KERNEL_SIZE = 4
BOTTLENECK_SIZE = 4  # Spatial size before the valid 4x4 convolution to 1 x 1.

# Output row 2m + p of a stride-2, pad-1, 4-tap transposed convolution reads input rows m - 1,
# m, m + 1 (window taps t = 0, 1, 2) through kernel row _SUBPIXEL_TAPS[p, t]; row 4 is zeros.
_SUBPIXEL_TAPS = np.array([[3, 1, 4], [4, 2, 0]])


def check_image_size(image_size: int, num_levels: int) -> None:
  if image_size != BOTTLENECK_SIZE * 2 ** num_levels:
    raise ValueError(
        f"the attri_vae_conv network needs data.image_size = 4 * 2**len(model.channels) "
        f"(one stride-2 level per entry down to 4 x 4); got image_size {image_size} with "
        f"{num_levels} levels")


def subpixel_kernel(kernel: jax.Array) -> jax.Array:
  """(4, 4, C_in, C_out) transposed-conv kernel -> (3, 3, C_in, 4 C_out) phase kernel whose
  output channels are ordered (phase_y, phase_x, C_out)."""
  kh, kw, c_in, c_out = kernel.shape
  if (kh, kw) != (KERNEL_SIZE, KERNEL_SIZE):
    raise ValueError(f"expected a 4x4 kernel, got {kh}x{kw}")
  padded = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))
  taps = padded[_SUBPIXEL_TAPS[:, :, None, None], _SUBPIXEL_TAPS[None, None, :, :]]
  # (py, ty, px, tx, C_in, C_out) -> (ty, tx, C_in, py, px, C_out).
  return taps.transpose(1, 3, 4, 0, 2, 5).reshape(3, 3, c_in, 4 * c_out)


def conv_transpose_stride2(x: jax.Array, kernel: jax.Array, impl: str = "xla") -> jax.Array:
  """PyTorch ConvTranspose2d(kernel 4, stride 2, padding 1) without bias, NHWC.

  x: (B, H, W, C_in); kernel: (4, 4, C_in, C_out). Returns (B, 2H, 2W, C_out).
  """
  b, h, w, _ = x.shape
  c_out = kernel.shape[-1]
  y = layers.conv2d_same(x, subpixel_kernel(kernel), layers.resolve_conv_impl(impl))
  y = y.reshape(b, h, w, 2, 2, c_out).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(b, 2 * h, 2 * w, c_out)


def conv_stride2(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """PyTorch Conv2d(kernel 4, stride 2, padding 1) without bias, NHWC: (B, H, W, C_in) ->
  (B, H/2, W/2, C_out)."""
  return jax.lax.conv_general_dilated(x, kernel, window_strides=(2, 2),
                                      padding=((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


class _Kernel4x4(nn.Module):
  """Owns one (4, 4, C_in, features) kernel and a (features,) bias; `kind` picks the map."""
  features: int
  kind: str  # "down" (conv s2), "up" (transposed conv s2), "to_vector", "from_vector".
  conv_impl: str = "auto"
  dtype: Any = None
  initializer: str = "he_normal"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c_in = x.shape[-1]
    kernel = self.param("kernel", INITIALIZERS[self.initializer],
                        (KERNEL_SIZE, KERNEL_SIZE, c_in, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    dtype = self.dtype or x.dtype
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if self.kind == "down":
      y = conv_stride2(x, kernel)
    elif self.kind == "up":
      y = conv_transpose_stride2(x, kernel, self.conv_impl)
    elif self.kind == "to_vector":  # Valid 4x4 conv of a 4 x 4 map: (B, 4, 4, C) -> (B, F).
      y = jnp.einsum("bhwc,hwcf->bf", x, kernel)
    elif self.kind == "from_vector":  # Transposed 4x4 conv of 1 x 1: (B, C) -> (B, 4, 4, F).
      y = jnp.einsum("bc,hwcf->bhwf", x, kernel)
    else:
      raise ValueError(f"unknown kind {self.kind!r}")
    return y + bias.astype(dtype)


class Encoder(nn.Module):
  """(B, H, W, C) images -> (mu, logvar), each (B, latent_dim)."""
  channels: Sequence[int]
  latent_dim: int
  bottleneck_features: int = 256
  conv_impl: str = "auto"
  dtype: Any = None
  initializer: str = "he_normal"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    del train  # No normalisation or dropout.
    check_image_size(x.shape[1], len(self.channels))
    layer = lambda features, kind, name: _Kernel4x4(
        features, kind, conv_impl=self.conv_impl, dtype=self.dtype,
        initializer=self.initializer, name=name)
    h = x.astype(self.dtype or x.dtype)
    for i, c in enumerate(self.channels):
      h = nn.relu(layer(c, "down", f"down{i}")(h))
    h = nn.relu(layer(self.bottleneck_features, "to_vector", "to_features")(h))
    stats = nn.Dense(2 * self.latent_dim, kernel_init=INITIALIZERS[self.initializer],
                     name="to_latent")(h.astype(jnp.float32))
    mu, logvar = jnp.split(stats, 2, axis=-1)
    return mu, logvar


class Decoder(nn.Module):
  """(B, latent_dim) codes -> (B, image_size, image_size, out_channels) images."""
  channels: Sequence[int]
  image_size: int
  out_channels: int
  bottleneck_features: int = 256
  output_activation: str = "none"
  conv_impl: str = "auto"
  dtype: Any = None
  initializer: str = "he_normal"

  @nn.compact
  def __call__(self, z: jax.Array, train: bool) -> jax.Array:
    del train
    check_image_size(self.image_size, len(self.channels))
    layer = lambda features, kind, name: _Kernel4x4(
        features, kind, conv_impl=self.conv_impl, dtype=self.dtype,
        initializer=self.initializer, name=name)
    h = nn.Dense(self.bottleneck_features, kernel_init=INITIALIZERS[self.initializer],
                 name="from_latent")(z)
    h = nn.relu(h).astype(self.dtype or h.dtype)
    h = nn.relu(layer(self.channels[-1], "from_vector", "to_grid")(h))
    targets = list(reversed(self.channels[:-1])) + [self.out_channels]
    for i, c in enumerate(targets):
      h = layer(c, "up", f"up{i}" if i < len(targets) - 1 else "to_image")(h)
      if i < len(targets) - 1:
        h = nn.relu(h)
    return vae.apply_output_activation(h.astype(jnp.float32), self.output_activation)


class AttriVAE(vae.ImageVAE):
  """The convolutional encoder and decoder above (`vae.ImageVAE`'s interface)."""
  output_activation: str = "none"
  bottleneck_features: int = 256
  conv_impl: str = "auto"
  dtype: Any = None
  initializer: str = "he_normal"

  def setup(self):
    common = dict(channels=tuple(self.channels), bottleneck_features=self.bottleneck_features,
                  conv_impl=self.conv_impl, dtype=self.dtype, initializer=self.initializer)
    self.encoder = Encoder(latent_dim=self.latent_dim, **common)
    self.decoder = Decoder(image_size=self.image_size, out_channels=self.image_channels,
                           output_activation=self.output_activation, **common)
