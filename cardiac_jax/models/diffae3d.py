"""3D diffusion autoencoder networks: conditional UNet and semantic encoder for cine volumes.

Diffusion Autoencoders (Preechakul et al., CVPR 2022) with dims = 3 as in the UK Biobank cine
study (Ometto et al. 2024): a cine series is a volume x (B, T, H, W, C) with the T frames as the
depth axis; every convolution is 3x3x3 ('SAME', stride 1), but resampling acts in-plane only,
so the time axis keeps its T frames at every level:
  downsample: average pooling with kernel = stride = (1, 2, 2): (T, H, W) -> (T, H/2, W/2);
  upsample:   nearest neighbour (T, h, w) -> (T, 2h, 2w).

Building blocks (GN = GroupNorm with min(g, C) groups, g = min(32, base channels), always
computed in float32; SiLU(x) = x sigmoid(x)):
- Timestep embedding: e_t = Dense(E)(SiLU(Dense(E)(sin_emb(t)))), sin_emb(t) of dimension d =
  base channels: [cos(t f_0) .. cos(t f_{d/2-1}), sin(t f_0) .. sin(t f_{d/2-1})],
  f_i = 10000^(-i / (d/2)); E = model.time_embed_dim (4 x base by default, 128 at base 32).
- Conditioned ResBlock (UNet), AdaGN:
    h = Conv(SiLU(GN(x)));  [t_s, t_b] = Dense(2 C_out)(SiLU(e_t));  z_s = Dense(C_out)(SiLU(z));
    h = (1 + z_s) ((1 + t_s) GN(h) + t_b);  h = Conv_0(Dropout(SiLU(h)));
    out = skip(x) + h,
  Conv_0 initialised to zero, skip = identity or a 1x1x1 conv when the channel count changes.
  A resampling ResBlock resamples after SiLU(GN(x)) and before the first conv, and resamples x
  on the skip path (BigGAN-style up/down blocks; the reference's `resblock_updown`).
- Unconditioned ResBlock (semantic encoder): out = skip(x) + Conv(SiLU(GN(x))). The reference
  builds its encoder blocks with `use_condition=False`, which drops the whole second half
  (GN, modulation, dropout, second conv), so they have one convolution.
- Self-attention over the N = T h w tokens of a level (one token per voxel, every frame attends
  to every frame): h = GN(x); [q, k, v] = Dense(3C)(h) split into `num_heads` heads;
  a = softmax(q k^T / sqrt(C / heads)) v; out = x + Dense_0(C)(a), Dense_0 zero-initialised.
  `cardiac_jax.attention.chunked_attention` computes a in blocks of `attention_block_size`
  queries with a custom VJP that keeps each query's log-sum-exp, so at most one (block x N)
  logit matrix per example and head exists at a time, in the forward and in the backward pass
  (12,800 tokens at the reference size: 1024 x 12,800 float32 logits = 52 MB per example and
  head instead of 655 MB for the full matrix). The result is the plain softmax attention.

Conditional UNet eps_theta(x_t, t, z_sem) (base b, channel multipliers m_0..m_{L-1}, R =
num_res_blocks):
  in: Conv(C_in -> b m_0);
  down, level l = 0..L-1 at in-plane size S / 2^l: R conditioned ResBlocks to b m_l (each
    followed by attention when S / 2^l is in attention_resolutions), then (l < L-1) one
    downsampling ResBlock; every output is kept for the skip connections;
  middle: ResBlock, attention, ResBlock;
  up, level l = L-1..0: R + 1 ResBlocks, each on concat(h, skip) (channels last), to b m_l,
    with attention at the attention resolutions, then (l > 0) one upsampling ResBlock;
  out: GN -> SiLU -> Conv_0(b m_0 -> C_out), zero-initialised, so eps_hat = 0 at
  initialisation.
Semantic encoder z_sem = Enc(x_0) (half UNet, no timestep): Conv(C_in -> b n_0), the down path
with unconditioned ResBlocks (encoder multipliers n_l, its own attention resolutions), middle
ResBlock, attention, ResBlock; head GN -> SiLU -> global average pool over (T, h, w) ->
Dense(z_sem_dim) (`head="pool"`, the reference's 1x1x1 convolution after the pool), or
GN -> SiLU -> flatten all (T, h, w, C) features -> Dense(z_sem_dim) (`head="flatten"`: the
code can depend on where in the frame and cycle a feature is; the average of a group-normalised
feature map hardly depends on the image, which leaves a briefly trained pooled code nearly
constant across subjects).

Reference size (base 32, m = (1, 1, 2, 3, 4), n = (1, 1, 2, 3, 4, 4), R = 2, attention at 16 px
and in the middle blocks, E = 128, z_sem 128, one head, 50 x 128 x 128 input): 16,561,441 UNet
and 4,276,032 encoder parameters, 20,837,473 in all (the "about 21M" of the reference).

Convolutions (`conv_impl`): "xla" is one 3D `lax.conv_general_dilated`; "frames" computes the
same function as one 2D convolution of the B * T frames with the 3 temporally neighbouring
frames stacked on the channel axis (`conv3d_same`); "auto" takes "frames" on the CPU backend
and "xla" elsewhere, because XLA:CPU's 3D convolution is 3 to 5 times slower than its 2D one
(timings: docs/implementation_notes.md). Parameter initialisers draw flat vectors and reshape
them (`flat_normal`): the same distributions, but XLA:CPU compiles a rank-5 random draw about
ten times slower.

Precision: parameters are float32; with `dtype` = bfloat16 the convolutions, dense layers and
attention matmuls compute in bfloat16 while GroupNorm statistics, the attention softmax and the
returned eps_hat are float32. Rematerialisation (`remat` = "blocks"): every ResBlock keeps only its
inputs for the backward pass, which recomputes its activations once the block's output cotangent
exists (`layers.recompute_in_backward`; `nn.remat` alone saves nothing on XLA:CPU, see
`cardiac_jax.layers`), and `DiffAE3D.encode` recomputes the whole semantic encoder the same way,
since z_sem's cotangent is complete only after the UNet's backward pass. Attention blocks are not
recomputed: the blockwise attention's own residuals are linear in the number of voxels
(`_attention`). An up-path ResBlock concatenates the skip connection itself, so it keeps the two
halves rather than a copy of both. The parameter tree is the same in every mode;
docs/diffae3d_memory.md has the compiled memory of the reference size.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from cardiac_jax import layers, runtime
from cardiac_jax.attention import chunked_attention

Dtype = Any

REMAT_MODES = ("none", "blocks")
CONV_IMPLS = ("auto", "xla", "frames")
GROUP_LIMIT = 32


# ------------------------------------------------------------------------------ functions
def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """(B,) timesteps -> (B, dim) float32 [cos(t f), sin(t f)], f_i = max_period^(-i / (dim/2))
  (a zero column is appended when dim is odd)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def downsample_inplane(x: jax.Array) -> jax.Array:
  """Average pooling with kernel = stride = (1, 2, 2): (B, T, H, W, C) -> (B, T, H/2, W/2, C)."""
  b, t, h, w, c = x.shape
  return x.reshape(b, t, h // 2, 2, w // 2, 2, c).mean(axis=(3, 5))


def upsample_inplane(x: jax.Array) -> jax.Array:
  """Nearest-neighbour upsampling (B, T, h, w, C) -> (B, T, 2h, 2w, C)."""
  b, t, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, :, None, :, None, :], (b, t, h, 2, w, 2, c))
  return x.reshape(b, t, 2 * h, 2 * w, c)


def flat_normal(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """N(0, 1) of `shape` drawn as one flat vector and reshaped.

  The same distribution as `jax.random.normal(key, shape)` (other numbers); XLA:CPU compiles a
  random draw of a rank-5 shape more than ten times slower than a flat one, and a model has
  dozens of them (docs/implementation_notes.md).
  """
  return jax.random.normal(key, (math.prod(shape),), dtype).reshape(tuple(shape))


def lecun_normal_flat(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """flax's lecun_normal (truncated normal on [-2, 2] scaled to variance 1 / fan_in,
  fan_in = prod(shape[:-1])) drawn flat and reshaped (see `flat_normal`)."""
  fan_in = math.prod(shape[:-1])
  stddev = math.sqrt(1.0 / fan_in) / .87962566103423978  # std of the truncated N(0, 1).
  flat = jax.random.truncated_normal(key, -2.0, 2.0, (math.prod(shape),), dtype)
  return (flat * stddev).reshape(tuple(shape)).astype(dtype)


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
  """Inverted dropout: x * m / (1 - rate), m ~ Bernoulli(1 - rate) drawn flat and reshaped."""
  if rate <= 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, (x.size,)).reshape(x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)


def num_groups(channels: int, group_limit: int) -> int:
  """min(group_limit, C) GroupNorm groups; a ValueError when they do not divide C."""
  groups = min(group_limit, channels)
  if channels % groups:
    raise ValueError(f"GroupNorm with {groups} groups cannot normalise {channels} channels; "
                     "choose model.base_channels and channel multipliers so that every "
                     "channel count (skip concatenations included) is a multiple of "
                     f"min(32, base_channels) = {group_limit} or smaller than it")
  return groups


# ------------------------------------------------------------------------------ layers
def resolve_conv_impl(impl: str) -> str:
  """"auto" -> "frames" on the CPU backend, else "xla" (module docstring, Convolutions)."""
  return runtime.backend_choice(impl, CONV_IMPLS, cpu="frames", other="xla",
                                what="model.conv_impl")


def conv3d_same(x: jax.Array, kernel: jax.Array, impl: str) -> jax.Array:
  """Stride-1 'SAME' 3D convolution of (B, T, H, W, C_in) with a (k, k, k, C_in, C_out) kernel.

  impl "xla": one `lax.conv_general_dilated` over (T, H, W); "frames": one 2D convolution of
  the B * T frames, each frame's channels the k frames dt = 0..k-1 around it (zero frames
  outside the sequence) side by side, k * C_in in all, with the kernel's temporal taps
  kernel[dt] stacked along its input-channel axis to match. Both compute the same function
  with the same parameters. (One convolution rather than k summed per-tap ones: the compiler
  keeps a lazily fused sum's k operands alive, k times the memory of the output.)
  """
  k = kernel.shape[0]
  if impl == "xla":
    return jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), "SAME",
                                        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
  if impl != "frames":
    raise ValueError(f"conv3d_same: unknown impl {impl!r} (xla or frames)")
  b, t, h, w, c = x.shape
  pad = k // 2
  padded = jnp.pad(x, ((0, 0), (pad, pad), (0, 0), (0, 0), (0, 0)))
  frames = jnp.concatenate([padded[:, dt:dt + t] for dt in range(k)], axis=-1)
  taps = jnp.concatenate([kernel[dt] for dt in range(k)], axis=2)   # (k, k, k * C_in, C_out)
  out = jax.lax.conv_general_dilated(frames.reshape(b * t, h, w, k * c), taps, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return out.reshape(b, t, h, w, kernel.shape[-1])


class Conv3D(nn.Module):
  """Stride-1 'SAME' 3D convolution on (B, T, H, W, C); float32 kernel (k, k, k, C_in, C_out)."""
  features: int
  kernel_size: int = 3
  zero_init: bool = False
  dtype: Dtype | None = None
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    init = nn.initializers.zeros if self.zero_init else lecun_normal_flat
    kernel = self.param("kernel", init, (k, k, k, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)
    if k == 1:
      y = jnp.einsum("bthwc,cd->bthwd", x, kernel[0, 0, 0].astype(dtype))
    else:
      impl = resolve_conv_impl(self.impl)
      y = conv3d_same(x, kernel.astype(dtype), impl)
    return y + bias.astype(dtype)


class GroupNorm32(nn.Module):
  """GroupNorm with min(group_limit, C) groups computed in float32, cast back to the input's
  dtype (statistics over (T, H, W) and the channels of a group, per example)."""
  group_limit: int = GROUP_LIMIT

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    groups = num_groups(x.shape[-1], self.group_limit)
    y = nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=jnp.float32,
                     param_dtype=jnp.float32, name="norm")(x.astype(jnp.float32))
    return y.astype(x.dtype)


class ResBlock(nn.Module):
  """(B, T, H, W, C_in) -> (B, T, H', W', features); conditioned (AdaGN) or not (module
  docstring). `resample`: "none", "down" (H' = H/2) or "up" (H' = 2H)."""
  features: int
  conditioned: bool = True
  resample: str = "none"
  dropout: float = 0.0
  group_limit: int = GROUP_LIMIT
  dtype: Dtype | None = None
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array | None, cond: jax.Array | None,
               dropout_key: jax.Array | None = None,
               down_feature: jax.Array | None = None) -> jax.Array:
    """`dropout_key`: the key of the dropout mask (training), None for no dropout.
    `down_feature`: the UNet's skip connection, concatenated to x on the channel axis here
    rather than by the caller, so that a rematerialised block keeps x and the down path's
    feature map (kept anyway) instead of a copy of both."""
    if down_feature is not None:
      x = jnp.concatenate([x, down_feature.astype(x.dtype)], axis=-1)
    c_out = self.features
    h = nn.silu(GroupNorm32(self.group_limit, name="in_norm")(x))
    if self.resample == "down":
      h, x = downsample_inplane(h), downsample_inplane(x)
    elif self.resample == "up":
      h, x = upsample_inplane(h), upsample_inplane(x)
    elif self.resample != "none":
      raise ValueError(f"resample must be none, down or up, got {self.resample!r}")
    h = Conv3D(c_out, dtype=self.dtype, impl=self.conv_impl, name="in_conv")(h)
    if self.conditioned:
      if emb is None or cond is None:
        raise ValueError("a conditioned ResBlock needs the timestep embedding and z_sem")
      dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=jnp.float32,
                                       kernel_init=lecun_normal_flat, name=name)
      time_scale, time_shift = jnp.split(dense(2 * c_out, "time")(nn.silu(emb)), 2, axis=-1)
      cond_scale = dense(c_out, "cond")(nn.silu(cond))
      expand = lambda v: v[:, None, None, None, :].astype(jnp.float32)
      h = GroupNorm32(self.group_limit, name="out_norm")(h).astype(jnp.float32)
      h = (1.0 + expand(cond_scale)) * ((1.0 + expand(time_scale)) * h + expand(time_shift))
      h = nn.silu(h).astype(self.dtype or x.dtype)
      if dropout_key is not None and self.dropout > 0.0:
        h = dropout(h, self.dropout, dropout_key)
      h = Conv3D(c_out, zero_init=True, dtype=self.dtype, impl=self.conv_impl,
                 name="out_conv")(h)
    skip = x if x.shape[-1] == c_out else Conv3D(c_out, 1, dtype=self.dtype, name="skip")(x)
    return skip.astype(h.dtype) + h


class AttentionBlock(nn.Module):
  """x + proj_0(attention(GN(x))) over the T*H*W voxels of (B, T, H, W, C) (module docstring)."""
  num_heads: int = 1
  block_size: int = 1024
  group_limit: int = GROUP_LIMIT
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, hh, ww, c = x.shape
    if c % self.num_heads:
      raise ValueError(f"model.num_heads={self.num_heads} does not divide the {c} channels "
                       "of an attention block")
    h = GroupNorm32(self.group_limit, name="norm")(x).reshape(b, t * hh * ww, c)
    qkv = nn.Dense(3 * c, dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=lecun_normal_flat, name="qkv")(h)
    q, k, v = (a.reshape(b, t * hh * ww, self.num_heads, c // self.num_heads)
               for a in jnp.split(qkv, 3, axis=-1))
    a = chunked_attention(q, k, v, self.block_size).reshape(b, t * hh * ww, c)
    out = nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=nn.initializers.zeros, name="proj")(a)
    return x.astype(out.dtype) + out.reshape(b, t, hh, ww, c)


ENCODER_HEADS = ("pool", "flatten")


def check_remat(remat: str) -> None:
  if remat not in REMAT_MODES:
    raise ValueError(f"model.remat must be one of {REMAT_MODES}, got {remat!r}")


def call_block(block: nn.Module, remat: str, *inputs) -> jax.Array:
  """block(*inputs); with remat="blocks" only the inputs are kept for the backward pass, which
  recomputes the block's activations (`layers.apply_recomputed`)."""
  if remat == "blocks":
    return layers.apply_recomputed(block, *inputs)
  return block(*inputs)


def dropout_key(block: ResBlock, train: bool) -> jax.Array | None:
  """The dropout key of a ResBlock, drawn from the block's own scope ("dropout" stream), or
  None outside training or without dropout."""
  if not train or block.dropout <= 0.0:
    return None
  return block.make_rng("dropout")


def level_sizes(image_size: int, num_levels: int, what: str) -> list[int]:
  """In-plane sizes S, S/2, ..., S/2^(L-1) of the levels; a ValueError when S does not halve
  exactly (L - 1) times."""
  if image_size % 2 ** (num_levels - 1):
    raise ValueError(f"data.image_size {image_size} must be divisible by 2^{num_levels - 1} "
                     f"({num_levels} levels of {what})")
  return [image_size // 2 ** level for level in range(num_levels)]


def check_attention_resolutions(resolutions: Sequence[int], sizes: Sequence[int],
                                field: str) -> None:
  unknown = sorted(set(int(r) for r in resolutions) - set(sizes))
  if unknown:
    raise ValueError(f"{field} {tuple(resolutions)}: {unknown} match no level (in-plane sizes "
                     f"{tuple(sizes)})")


class LevelNetwork(nn.Module):
  """The settings the UNet and the semantic encoder share: level l has base_channels *
  channel_mult[l] channels at image_size / 2**l px and num_res_blocks ResBlocks, with attention
  at the in-plane sizes of attention_resolutions and in the middle blocks."""
  image_size: int
  base_channels: int = 32
  channel_mult: Sequence[int] = (1, 1, 2, 3, 4)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (16,)
  num_heads: int = 1
  attention_block_size: int = 1024
  dtype: Dtype | None = None
  remat: str = "none"
  conv_impl: str = "auto"


def _attention(network: LevelNetwork, group_limit: int, dtype: Dtype) -> Callable:
  """name -> the AttentionBlock `name` of `network` (its num_heads and attention_block_size).

  Never recomputed, whatever `network.remat`: its blockwise attention keeps only q, k, v, the
  output and one log-sum-exp per query for the backward pass, a few (N, C) arrays, and
  recomputing the block would repeat its (block x N) products for nothing."""

  def attn(name: str):
    return AttentionBlock(network.num_heads, network.attention_block_size, group_limit, dtype,
                          name=name)

  return attn


def _down_path_and_middle(network: LevelNetwork, x: jax.Array, res: Callable, attn: Callable,
                          sizes: Sequence[int], dtype: Dtype,
                          skips: list[jax.Array] | None = None) -> jax.Array:
  """The trunk the UNet and the semantic encoder share (module docstring): in_conv, the levels
  down and the middle blocks, with `network`'s channels and attention resolutions. `res(features,
  name, resample)` builds a ResBlock; `skips`, when given, receives in_conv's output and every
  down-path output (the UNet's skip connections)."""
  keep = skips.append if skips is not None else (lambda h: None)
  h = Conv3D(network.base_channels * network.channel_mult[0], dtype=dtype,
             impl=network.conv_impl, name="in_conv")(x)
  keep(h)
  last = len(network.channel_mult) - 1
  for level, mult in enumerate(network.channel_mult):
    for i in range(network.num_res_blocks):
      h = res(network.base_channels * mult, f"down{level}_res{i}")(h)
      if sizes[level] in network.attention_resolutions:
        h = attn(f"down{level}_attn{i}")(h)
      keep(h)
    if level != last:
      h = res(h.shape[-1], f"down{level}_downsample", "down")(h)
      keep(h)
  h = res(h.shape[-1], "mid_res0")(h)
  h = attn("mid_attn")(h)
  return res(h.shape[-1], "mid_res1")(h)


# ------------------------------------------------------------------------------ networks
class ConditionalUNet(LevelNetwork):
  """eps_theta(x_t, t, z_sem): (B, T, S, S, C_in), (B,), (B, Z) -> (B, T, S, S, C_out) float32."""
  out_channels: int = 1
  time_embed_dim: int = 0          # 0 = 4 * base_channels.
  dropout: float = 0.1

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, z_sem: jax.Array,
               train: bool = False) -> jax.Array:
    check_remat(self.remat)
    sizes = level_sizes(self.image_size, len(self.channel_mult), "model.channel_mult")
    check_attention_resolutions(self.attention_resolutions, sizes,
                                "model.attention_resolutions")
    if x.shape[2] != self.image_size or x.shape[3] != self.image_size:
      raise ValueError(f"the UNet expects (B, T, {self.image_size}, {self.image_size}, C) "
                       f"volumes, got {tuple(x.shape)}")
    group_limit = min(GROUP_LIMIT, self.base_channels)
    dtype = self.dtype or jnp.float32
    embed_dim = self.time_embed_dim or 4 * self.base_channels
    emb = timestep_embedding(t, self.base_channels)
    dense = lambda name: nn.Dense(embed_dim, dtype=dtype, param_dtype=jnp.float32,
                                  kernel_init=lecun_normal_flat, name=name)
    emb = dense("time_embed1")(nn.silu(dense("time_embed0")(emb)))
    z = z_sem.astype(dtype)

    def res(features, name, resample="none"):
      block = ResBlock(features, conditioned=True, resample=resample, dropout=self.dropout,
                       group_limit=group_limit, dtype=dtype, conv_impl=self.conv_impl,
                       name=name)
      return lambda h, down_feature=None: call_block(
          block, self.remat, h, emb, z, dropout_key(block, train), down_feature)

    attn = _attention(self, group_limit, dtype)
    skips = []
    h = _down_path_and_middle(self, x, res, attn, sizes, dtype, skips)
    for level in reversed(range(len(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        h = res(self.base_channels * self.channel_mult[level], f"up{level}_res{i}")(
            h, skips.pop())
        if sizes[level] in self.attention_resolutions:
          h = attn(f"up{level}_attn{i}")(h)
      if level:
        h = res(h.shape[-1], f"up{level}_upsample", "up")(h)
    h = nn.silu(GroupNorm32(group_limit, name="out_norm")(h))
    out = Conv3D(self.out_channels, zero_init=True, dtype=dtype, impl=self.conv_impl,
                 name="out_conv")(h)
    return out.astype(jnp.float32)


class SemanticEncoder(LevelNetwork):
  """z_sem = Enc(x_0): (B, T, S, S, C_in) -> (B, z_sem_dim) float32 (module docstring)."""
  channel_mult: Sequence[int] = (1, 1, 2, 3, 4, 4)
  z_sem_dim: int = 128
  head: str = "pool"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.head not in ENCODER_HEADS:
      raise ValueError(f"model.encoder_head must be one of {ENCODER_HEADS}, got {self.head!r}")
    check_remat(self.remat)
    sizes = level_sizes(self.image_size, len(self.channel_mult), "model.encoder_channel_mult")
    check_attention_resolutions(self.attention_resolutions, sizes,
                                "model.encoder_attention_resolutions")
    group_limit = min(GROUP_LIMIT, self.base_channels)
    dtype = self.dtype or jnp.float32

    def res(features, name, resample="none"):
      block = ResBlock(features, conditioned=False, resample=resample, group_limit=group_limit,
                       dtype=dtype, conv_impl=self.conv_impl, name=name)
      return lambda h: call_block(block, self.remat, h, None, None)

    h = _down_path_and_middle(self, x, res, _attention(self, group_limit, dtype), sizes, dtype)
    h = nn.silu(GroupNorm32(group_limit, name="out_norm")(h)).astype(jnp.float32)
    if self.head == "pool":
      features = jnp.mean(h, axis=(1, 2, 3))
    else:
      features = h.reshape(h.shape[0], -1)
    z = nn.Dense(self.z_sem_dim, dtype=jnp.float32, param_dtype=jnp.float32,
                 kernel_init=lecun_normal_flat, name="out")(features)
    return z


class DiffAE3D(nn.Module):
  """The semantic encoder ("encoder") and the conditional UNet ("unet") as two submodules.

  `encode(x_0) -> z_sem`, `eps(x_t, t, z_sem, train) -> eps_hat`; `__call__` runs both (used
  to initialise every parameter).
  """
  unet: ConditionalUNet
  encoder: SemanticEncoder

  def encode(self, x0: jax.Array, train: bool = False) -> jax.Array:
    if self.encoder.remat == "blocks":
      # z_sem's cotangent exists only after the UNet's whole backward pass: the encoder's
      # activations are recomputed then instead of being kept through it.
      # (The encoder has no dropout: `train` does not change it.)
      return call_block(self.encoder, "blocks", x0)
    return self.encoder(x0, train)

  def eps(self, x_t: jax.Array, t: jax.Array, z_sem: jax.Array,
          train: bool = False) -> jax.Array:
    return self.unet(x_t, t, z_sem, train)

  def __call__(self, x0: jax.Array, x_t: jax.Array, t: jax.Array,
               train: bool = False) -> jax.Array:
    return self.eps(x_t, t, self.encode(x0, train), train)
