"""DCGAN generator and discriminator for short-axis slices (Radford et al., ICLR 2016).

The GAN of "Interpreting Latent Spaces of Generative Models for Medical Images using
Unsupervised Methods" (Schoen et al. 2022): z (32) -> 128 x 128 images, BatchNorm + ReLU in the
generator, strided convolutions + BatchNorm + LeakyReLU(0.2) in the discriminator.

Generator (B, latent_dim) -> (B, S, S, C), with ch = channels and n = len(ch):
  Dense(ch[-1] * s * s) -> BN -> ReLU, s = S / 2**n;
  for c in reversed(ch[:-1]): nearest x2 -> conv3x3(c) -> BN -> ReLU;
  nearest x2 -> conv3x3(C) -> output activation.
The DCGAN's fractionally strided convolutions are replaced by nearest-neighbour upsampling +
convolution (`cardiac_jax.layers`): transposed convolutions are an order of magnitude slower on
XLA:CPU and cause checkerboard artefacts. Output activation "sigmoid" gives images in [0, 1]
(the data's range); "tanh" gives [-1, 1], the DCGAN convention, and the training family then
shows the discriminator real images mapped to [-1, 1] too.

Discriminator (B, S, S, C) -> (B,) logits:
  for i, c in enumerate(ch): conv4x4 stride 2 (c) -> BN (not on the first layer, as in DCGAN)
  -> LeakyReLU(0.2);  flatten;  Dense(1).

Weights start from N(0, 0.02) (convolutions, dense layers) and BN scales from N(1, 0.02), the
DCGAN initialisation.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from cardiac_jax import layers
from cardiac_jax.models import vae

OUTPUT_ACTIVATIONS = ("sigmoid", "tanh")

_weight_init = nn.initializers.normal(0.02)


def _bn_scale_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def _batch_norm(train: bool, dtype: Any, axis_name: str | None, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                      axis_name=axis_name, scale_init=_bn_scale_init, name=name)


def bottleneck_size(image_size: int, num_levels: int) -> int:
  """Side of the generator's first feature map: image_size / 2**num_levels."""
  return vae.bottleneck_size(image_size, num_levels, "doubling")


class Generator(vae.ImageDecoder):
  """The DCGAN generator of the module docstring, (B, latent_dim) -> (B, S, S, out_channels)."""

  def _norm(self, train: bool, name: str) -> nn.BatchNorm:
    return _batch_norm(train, self.dtype, self.bn_axis_name, name)

  @nn.compact
  def __call__(self, z: jax.Array, train: bool) -> jax.Array:
    if self.output_activation not in OUTPUT_ACTIVATIONS:
      raise ValueError(f"unknown output_activation {self.output_activation!r} "
                       f"(one of {OUTPUT_ACTIVATIONS})")
    size = bottleneck_size(self.image_size, len(self.channels))
    h = nn.Dense(self.channels[-1] * size * size, kernel_init=_weight_init,
                 name="from_latent")(z)
    h = nn.relu(self._norm(train, "from_latent_bn")(h))
    # The first block's activations (B, ch[-1] * s * s): GANSpace's feature space.
    self.sow("intermediates", "first_block", h)
    h = h.reshape(z.shape[0], size, size, self.channels[-1]).astype(self.dtype or h.dtype)
    conv = lambda c, name: layers.Conv(c, 3, impl=self.conv_impl, dtype=self.dtype,
                                       kernel_init=_weight_init, name=name)
    for i, c in enumerate(reversed(tuple(self.channels[:-1]))):
      h = conv(c, f"up{i}")(layers.upsample_nearest2(h))
      h = nn.relu(self._norm(train, f"up{i}_bn")(h))
    y = conv(self.out_channels, "to_image")(layers.upsample_nearest2(h)).astype(jnp.float32)
    return nn.sigmoid(y) if self.output_activation == "sigmoid" else jnp.tanh(y)


class Discriminator(nn.Module):
  """(B, S, S, C) images (in the generator's output range) -> (B,) real/fake logits."""
  channels: Sequence[int]
  dtype: Any = None
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    h = x.astype(self.dtype or x.dtype)
    for i, c in enumerate(self.channels):
      # 4x4 stride 2 with one pixel of padding halves the size exactly (DCGAN).
      h = nn.Conv(c, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=i == 0,
                  kernel_init=_weight_init, dtype=self.dtype, name=f"down{i}")(h)
      if i:
        h = _batch_norm(train, self.dtype, self.bn_axis_name, f"down{i}_bn")(h)
      h = nn.leaky_relu(h, 0.2)
    h = h.reshape(h.shape[0], -1).astype(jnp.float32)
    return nn.Dense(1, kernel_init=_weight_init, name="to_logit")(h)[:, 0]


class DCGAN(vae.LatentImageModel):
  """Generator + discriminator; `__call__` only creates both parameter sets at init."""
  conv_impl: str = "auto"
  dtype: Any = None
  bn_axis_name: str | None = None

  def setup(self):
    self.generator = Generator(
        channels=tuple(self.channels), image_size=self.image_size,
        out_channels=self.image_channels, output_activation=self.output_activation,
        conv_impl=self.conv_impl, dtype=self.dtype, bn_axis_name=self.bn_axis_name)
    self.discriminator = Discriminator(channels=tuple(self.channels), dtype=self.dtype,
                                       bn_axis_name=self.bn_axis_name)

  def generate(self, z: jax.Array, train: bool) -> jax.Array:
    return self.generator(z, train)

  def discriminate(self, x: jax.Array, train: bool) -> jax.Array:
    return self.discriminator(x, train)

  def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
    return self.discriminator(self.generator(z, train), train)
