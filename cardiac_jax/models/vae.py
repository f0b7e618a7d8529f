"""Residual image VAE shared by the VAE, beta-VAE, AR-VAE, Soft-IntroVAE and AR-SIVAE configs.

Architecture of the Soft-IntroVAE image model as used by AR-SIVAE (Di Folco et al., MICCAI 2024):

Encoder (B, H, W, C_in) -> mu, logvar (B, zdim):
  conv5x5 (C_in -> ch[0]) -> BN -> LeakyReLU(0.2) -> avgpool2;
  for c in ch[1:]: ResBlock(c) -> avgpool2;  ResBlock(ch[-1]);  flatten;  Dense(2 * zdim).
Decoder (B, zdim) -> (B, H, W, C_out):
  Dense(ch[-1] * s * s) -> ReLU, s = H / 2**len(ch);
  for c in reversed(ch): ResBlock(c) -> nearest x2;  ResBlock(ch[0]);  conv5x5 -> C_out
  (sigmoid output for images in [0, 1], as in the ACDC version).

With ch = (64, 128, 256, 512, 512) and 128 px this is the reference model (4x4 bottleneck).

Rematerialisation (`remat="blocks"`): every ResBlock of the encoder and decoder is wrapped in
`nn.remat`, so its backward pass recomputes the block's activations from the block input instead
of keeping them: activation memory drops to about one tensor per block for the price of one more
forward pass of each block. The parameters and their names are the same either way, so a
checkpoint trained with one setting restores with the other.
The encoder and decoder are separate submodules ("encoder", "decoder") so that Soft-IntroVAE can
give each its own optimizer.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from cardiac_jax import layers

INITIALIZERS = {
    "lecun_normal": nn.initializers.lecun_normal(),
    "xavier_normal": nn.initializers.xavier_normal(),
    "he_normal": nn.initializers.he_normal(),
}


REMAT_MODES = ("none", "blocks")


def _block_class(remat: str) -> type[nn.Module]:
  """ResBlock, or ResBlock under nn.remat (its `train` argument, index 2 after self and x, is a
  Python bool and must stay static)."""
  if remat not in REMAT_MODES:
    raise ValueError(f"model.remat must be one of {REMAT_MODES}, got {remat!r}")
  if remat == "blocks":
    return nn.remat(layers.ResBlock, static_argnums=(2,))
  return layers.ResBlock


def bottleneck_size(image_size: int, num_levels: int, resampling: str = "halving") -> int:
  """Side of the smallest feature map of `num_levels` x2 levels: image_size / 2**num_levels.
  `resampling` ("halving", "doubling") names a level in the error message."""
  size, remainder = divmod(image_size, 2 ** num_levels)
  if remainder or size < 1:
    raise ValueError(f"image_size {image_size} must be divisible by 2**{num_levels} "
                     f"(one {resampling} per entry of model.channels)")
  return size


def apply_output_activation(y: jax.Array, output_activation: str) -> jax.Array:
  """"sigmoid" (images in [0, 1]) or "none" (linear output) on the decoder's last layer."""
  if output_activation == "sigmoid":
    return nn.sigmoid(y)
  if output_activation == "none":
    return y
  raise ValueError(f"unknown output_activation {output_activation!r}")


class ImageDecoder(nn.Module):
  """(B, latent_dim) codes -> (B, image_size, image_size, out_channels) images: the settings
  of a decoder (this module's, the DCGAN generator's); subclasses add the network."""
  channels: Sequence[int]
  image_size: int
  out_channels: int
  output_activation: str = "sigmoid"
  conv_impl: str = "auto"
  dtype: Any = None
  bn_axis_name: str | None = None


class LatentImageModel(nn.Module):
  """The settings of a model between (B, latent_dim) codes and (B, image_size, image_size,
  image_channels) images (the VAEs here, the DCGAN); subclasses add the networks."""
  channels: Sequence[int]
  latent_dim: int
  image_size: int
  image_channels: int
  output_activation: str = "sigmoid"


class ImageVAE(LatentImageModel):
  """An encoder ((B, H, W, C) -> mu, logvar) and a decoder ((B, latent_dim) -> images) as the
  submodules "encoder" and "decoder", created by the subclass's `setup`; `__call__` is only
  used to create both parameter sets at init."""

  def encode(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    return self.encoder(x, train)

  def decode(self, z: jax.Array, train: bool) -> jax.Array:
    return self.decoder(z, train)

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    mu, _ = self.encoder(x, train)
    return self.decoder(mu, train)


class Encoder(nn.Module):
  """(B, H, W, C) images -> (mu, logvar), each (B, latent_dim)."""
  channels: Sequence[int]
  latent_dim: int
  conv_impl: str = "auto"
  dtype: Any = None
  bn_axis_name: str | None = None
  initializer: str = "lecun_normal"
  remat: str = "none"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    bottleneck_size(x.shape[1], len(self.channels))
    kernel_init = INITIALIZERS[self.initializer]
    h = layers.Conv(self.channels[0], 5, use_bias=False, impl=self.conv_impl, dtype=self.dtype,
                    kernel_init=kernel_init, name="stem")(x.astype(self.dtype or x.dtype))
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                     dtype=self.dtype, axis_name=self.bn_axis_name, name="stem_bn")(h)
    h = layers.avg_pool2(nn.leaky_relu(h, 0.2))
    block_class = _block_class(self.remat)
    block = lambda c, name: block_class(
        c, conv_impl=self.conv_impl, dtype=self.dtype, bn_axis_name=self.bn_axis_name,
        kernel_init=kernel_init, name=name)
    for i, c in enumerate(self.channels[1:]):
      h = layers.avg_pool2(block(c, f"down{i}")(h, train))
    h = block(self.channels[-1], "bottleneck")(h, train)
    h = h.reshape(h.shape[0], -1).astype(jnp.float32)
    stats = nn.Dense(2 * self.latent_dim, kernel_init=kernel_init, name="to_latent")(h)
    mu, logvar = jnp.split(stats, 2, axis=-1)
    return mu, logvar


class Decoder(ImageDecoder):
  """The residual decoder of the module docstring, (B, latent_dim) -> (B, S, S, out_channels)."""
  initializer: str = "lecun_normal"
  remat: str = "none"

  @nn.compact
  def __call__(self, z: jax.Array, train: bool) -> jax.Array:
    size = bottleneck_size(self.image_size, len(self.channels))
    kernel_init = INITIALIZERS[self.initializer]
    h = nn.Dense(self.channels[-1] * size * size, kernel_init=kernel_init, name="from_latent")(z)
    h = nn.relu(h).reshape(z.shape[0], size, size, self.channels[-1])
    h = h.astype(self.dtype or h.dtype)
    block_class = _block_class(self.remat)
    block = lambda c, name: block_class(
        c, conv_impl=self.conv_impl, dtype=self.dtype, bn_axis_name=self.bn_axis_name,
        kernel_init=kernel_init, name=name)
    for i, c in enumerate(reversed(self.channels)):
      h = layers.upsample_nearest2(block(c, f"up{i}")(h, train))
    h = block(self.channels[0], "head_block")(h, train)
    y = layers.Conv(self.out_channels, 5, impl=self.conv_impl, dtype=self.dtype,
                    kernel_init=kernel_init, name="to_image")(h).astype(jnp.float32)
    return apply_output_activation(y, self.output_activation)


class VAE(ImageVAE):
  """The residual encoder and decoder above (`ImageVAE`'s interface)."""
  conv_impl: str = "auto"
  dtype: Any = None
  bn_axis_name: str | None = None
  initializer: str = "lecun_normal"
  remat: str = "none"

  def setup(self):
    common = dict(channels=tuple(self.channels), conv_impl=self.conv_impl, dtype=self.dtype,
                  bn_axis_name=self.bn_axis_name, initializer=self.initializer,
                  remat=self.remat)
    self.encoder = Encoder(latent_dim=self.latent_dim, **common)
    self.decoder = Decoder(image_size=self.image_size, out_channels=self.image_channels,
                           output_activation=self.output_activation, **common)


def reparameterize(key: jax.Array, mu: jax.Array, logvar: jax.Array) -> jax.Array:
  """z = mu + exp(logvar / 2) * eps, eps ~ N(0, I)."""
  return mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape, mu.dtype)
