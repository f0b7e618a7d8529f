"""Attri-VAE's convolutional beta-VAE: the reference's size, its transposed convolutions, the
L1 weight penalty of its objective, and training through the VAE family."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cardiac_jax import families
from cardiac_jax.families import vae as vae_family
from cardiac_jax.models import attri_vae
from experiments import configs


def test_paper_network_has_the_parameter_count_of_the_reference():
  # The reference BetaVAE_H (additional layer, nc = 1, z_dim = 128), weights + biases:
  encoder = (4 * 4 * 1 * 32 + 32            # conv 1 -> 32, 128 -> 64
             + 4 * (4 * 4 * 32 * 32 + 32)   # four convs 32 -> 32, 64 -> 4
             + 4 * 4 * 32 * 256 + 256       # conv 32 -> 256, 4 -> 1
             + 256 * 2 * 128 + 2 * 128)     # Linear 256 -> 2 z
  decoder = (128 * 256 + 256                # Linear z -> 256
             + 256 * 32 * 4 * 4 + 32        # transposed conv 256 -> 32, 1 -> 4
             + 4 * (32 * 32 * 4 * 4 + 32)   # four transposed convs 32 -> 32, 4 -> 64
             + 32 * 1 * 4 * 4 + 1)          # transposed conv 32 -> 1, 64 -> 128
  assert (encoder, decoder) == (263_328, 230_305)
  family = families.make_family(configs.get_config("attri_vae:paper"))
  assert families.parameter_counts(family) == {"encoder": encoder, "decoder": decoder}
  assert "493,633 parameters" in families.parameter_summary(configs.get_config("attri_vae:paper"))


def test_transposed_convolution_is_the_scatter_definition():
  rng = np.random.default_rng(0)
  x, kernel = rng.normal(size=(2, 3, 4, 3)), rng.normal(size=(4, 4, 3, 2))
  # y[2i + ky - 1, 2j + kx - 1] += x[i, j] @ kernel[ky, kx], cropped by the padding of 1.
  full = np.zeros((2, 2 * 3 + 2, 2 * 4 + 2, 2))
  for i, j, ky, kx in np.ndindex(3, 4, 4, 4):
    full[:, 2 * i + ky, 2 * j + kx] += x[:, i, j] @ kernel[ky, kx]
  expected = full[:, 1:-1, 1:-1]
  for impl in ("xla", "im2col"):
    y = attri_vae.conv_transpose_stride2(jnp.asarray(x, jnp.float32),
                                         jnp.asarray(kernel, jnp.float32), impl)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


def test_strided_convolution_is_the_correlation_definition():
  rng = np.random.default_rng(1)
  x, kernel = rng.normal(size=(1, 6, 8, 2)), rng.normal(size=(4, 4, 2, 3))
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  expected = np.zeros((1, 3, 4, 3))
  for i, j in np.ndindex(3, 4):
    window = padded[:, 2 * i:2 * i + 4, 2 * j:2 * j + 4]
    expected[:, i, j] = np.einsum("bhwc,hwcd->bd", window, kernel)
  y = attri_vae.conv_stride2(jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32))
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


def test_image_size_must_reach_four_pixels():
  config = configs.get_config("attri_vae:smoke")
  config.data.image_size = 64
  with pytest.raises(ValueError, match=r"data.image_size = 4 \* 2\*\*len\(model.channels\)"):
    families.make_family(config)
  config = configs.get_config("attri_vae:smoke")
  config.model.remat = "blocks"
  with pytest.raises(ValueError, match="model.remat"):
    families.make_family(config)


def _toy_config():
  config = configs.get_config("attri_vae:smoke")
  config.data.image_size, config.model.channels = 16, (4, 8)
  return config


def _batch(seed: int = 0, size: int = 8):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:16, :16]
  radius = rng.uniform(2, 6, size=size)
  images = ((yy - 8) ** 2 + (xx - 8) ** 2 < radius[:, None, None] ** 2).astype(np.float32)
  return {"image": jnp.asarray(images[..., None]),
          "attributes": jnp.asarray(np.stack([radius, radius ** 2, -radius], 1), jnp.float32)}


def test_loss_adds_the_l1_norm_of_every_parameter_with_zero_gradient_at_zero():
  config = _toy_config()
  family = families.make_family(config)
  state = family.init_state(jax.random.key(0))
  _, m = jax.jit(family.train_step)(state, _batch(), jax.random.key(1))
  norm = sum(np.abs(np.asarray(p)).sum() for p in jax.tree.leaves(state.params))
  assert float(m["weight_l1_norm"]) == pytest.approx(norm, rel=1e-5)
  # Rec + beta KL + gamma AR + weight_l1 sum |theta| with the reference's weights.
  expected = (float(m["reconstruction_loss"]) + 2.0 * float(m["kl"])
              + 100.0 * float(m["ar_loss"]) + 5e-4 * norm)
  assert float(m["loss"]) == pytest.approx(expected, rel=1e-5)
  grads = jax.grad(vae_family.l1_norm)(state.params)
  bias = grads["decoder"]["to_image"]["bias"]  # Initialised to 0: no push from the penalty.
  np.testing.assert_array_equal(np.asarray(bias), 0.0)
  kernel = state.params["encoder"]["down0"]["kernel"]
  np.testing.assert_array_equal(np.asarray(grads["encoder"]["down0"]["kernel"]),
                                np.sign(np.asarray(kernel)))


def test_smoke_training_lowers_the_loss_and_the_analyses_run():
  config = _toy_config()
  config.optimizer.learning_rate = 2e-3  # Toy size: a few steps must show progress.
  family = families.make_family(config)
  state = family.init_state(jax.random.key(0))
  step = jax.jit(family.train_step)
  batch = _batch()
  losses, reconstruction = [], []
  for i in range(30):
    state, metrics = step(state, batch, jax.random.key(i))
    losses.append(float(metrics["loss"]))
    reconstruction.append(float(metrics["reconstruction_loss"]))
  # gamma 100 times the AR term of sampled codes dominates the loss and is noisy step to step.
  assert np.all(np.isfinite(losses)) and np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
  assert reconstruction[-1] < 0.7 * reconstruction[0]
  # The interface evaluate, traversals and direction discovery use.
  mu, logvar = family.encode(state, batch["image"])
  assert mu.shape == logvar.shape == (8, config.model.latent_dim)
  assert family.decode(state, mu).shape == batch["image"].shape
  out = jax.jit(family.eval_step)(state, batch)
  assert out["ssim"].shape == (8, 1) and np.isfinite(np.asarray(out["mse"])).all()
  assert set(state.params["decoder"]["from_latent"]) == {"kernel", "bias"}
