"""The DCGAN family at toy size: initialisation, generator output range, the first linear map
and first-block features used by direction discovery, the loss formulas, each update lowering
its own loss, and whole train steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cardiac_jax.families import dcgan as dcgan_family
from experiments.configs import get_config

SIZE, BATCH = 16, 4


def tiny_config(output_activation: str = "sigmoid"):
  config = get_config("dcgan:smoke")
  config.data.image_size = SIZE
  config.model.channels = (4, 8)
  config.model.output_activation = output_activation
  config.train.batch_size = BATCH
  return config


def disc_images(seed: int) -> np.ndarray:
  """(B, S, S, 1) bright discs of random radius on a dark background, in [0, 1]."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:SIZE, :SIZE]
  radii = rng.uniform(2.5, 5.0, BATCH)
  return np.stack([(np.hypot(yy - 7.5, xx - 7.5) < r) * 0.9 for r in radii])[..., None].astype(
      np.float32)


@pytest.fixture(scope="module")
def family_and_state():
  family = dcgan_family.DCGANFamily(tiny_config())
  return family, jax.jit(family.init_state)(jax.random.key(0))


def test_init_follows_dcgan_and_generates_images_in_range(family_and_state):
  family, state = family_and_state
  kernel = np.asarray(family.first_linear_kernel(state))
  # Latent 8 -> ch[-1] * s * s with s = 16 / 2**2 = 4.
  assert kernel.shape == (8, 8 * 4 * 4)
  assert 0.015 < kernel.std() < 0.025  # N(0, 0.02) weights.
  assert int(state.step) == 0 and set(state.params) == {"generator", "discriminator"}
  z = jax.random.normal(jax.random.key(1), (BATCH, 8))
  images = np.asarray(jax.jit(family.generate)(state, z))
  assert images.shape == (BATCH, SIZE, SIZE, 1)
  assert images.min() >= 0.0 and images.max() <= 1.0
  # The same parameters under a tanh output are mapped back to [0, 1] too.
  tanh_family = dcgan_family.DCGANFamily(tiny_config("tanh"))
  tanh_images = np.asarray(jax.jit(tanh_family.generate)(state, z))
  assert tanh_images.min() >= 0.0 and tanh_images.max() <= 1.0
  logits = np.asarray(jax.jit(family.discriminate)(state, jnp.asarray(images)))
  assert logits.shape == (BATCH,) and np.all(np.isfinite(logits))


def test_first_block_features_are_the_first_linear_map_after_bn_and_relu(family_and_state):
  family, state = family_and_state
  z = jax.random.normal(jax.random.key(2), (3, 8))
  features = np.asarray(jax.jit(family.first_block_features)(state, z))
  g = state.params["generator"]
  stats = state.batch_stats["generator"]["from_latent_bn"]
  linear = np.asarray(z) @ np.asarray(g["from_latent"]["kernel"]) + np.asarray(
      g["from_latent"]["bias"])
  normalised = (linear - np.asarray(stats["mean"])) / np.sqrt(np.asarray(stats["var"]) + 1e-5)
  expected = np.maximum(normalised * np.asarray(g["from_latent_bn"]["scale"])
                        + np.asarray(g["from_latent_bn"]["bias"]), 0.0)
  np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-6)


def test_loss_formulas():
  zeros = jnp.zeros(5)
  np.testing.assert_allclose(dcgan_family.discriminator_loss(zeros, zeros, jnp.ones(5)),
                             2 * np.log(2.0), rtol=1e-6)
  np.testing.assert_allclose(dcgan_family.generator_loss(jnp.array([0.0, 2.0])),
                             np.mean(np.log1p(np.exp(-np.array([0.0, 2.0])))), rtol=1e-6)
  # A confident, correct discriminator has a small loss; a fooled one a large loss.
  assert float(dcgan_family.discriminator_loss(jnp.full(5, 8.0), jnp.full(5, -8.0),
                                            jnp.ones(5))) < 1e-3
  assert float(dcgan_family.discriminator_loss(jnp.full(5, -8.0), jnp.full(5, 8.0),
                                            jnp.ones(5))) > 15.0
  rng = np.random.default_rng(0)
  same = dcgan_family.gaussian_mmd2(rng.normal(size=(200, 3)), rng.normal(size=(200, 3)))
  shifted = dcgan_family.gaussian_mmd2(rng.normal(size=(200, 3)), rng.normal(2.0, 1.0, (200, 3)))
  assert abs(same) < 0.02 and shifted > 0.3


def test_each_update_lowers_its_own_loss_on_the_batch(family_and_state):
  family, state = family_and_state
  real = jnp.asarray(disc_images(0))
  z = jax.random.normal(jax.random.key(3), (BATCH, 8))
  labels = jnp.full((BATCH,), 0.95)

  @jax.jit
  def check(state):
    fake = family._apply("generator", state.params, state.batch_stats, z, True)
    before, _ = family.discriminator_loss_fn(state.params["discriminator"], state, real, fake,
                                             labels)
    after_d, _, _ = family.discriminator_update(state, real, z, labels)
    after, _ = family.discriminator_loss_fn(after_d.params["discriminator"], after_d, real,
                                            fake, labels)
    g_before, _ = family.generator_loss_fn(after_d.params["generator"], after_d, z)
    after_g, _, _ = family.generator_update(after_d, z)
    g_after, _ = family.generator_loss_fn(after_g.params["generator"], after_g, z)
    unchanged = jax.tree.map(lambda a, b: jnp.all(a == b), after_d.params["generator"],
                             state.params["generator"])
    return before, after, g_before, g_after, unchanged

  before, after, g_before, g_after, unchanged = check(state)
  assert float(after) < float(before)           # The D step on this batch lowers L_D...
  assert all(jax.tree.leaves(unchanged))        # ...and leaves the generator alone;
  assert float(g_after) < float(g_before)       # the G step lowers L_G against that D.


def test_train_steps_run_and_update_both_networks(family_and_state):
  family, state = family_and_state
  step = jax.jit(family.train_step)
  batch = {"image": jnp.asarray(disc_images(1))}
  new, metrics = step(state, batch, jax.random.key(4))
  for _ in range(2):
    new, metrics = step(new, batch, jax.random.key(int(new.step) + 4))
  metrics = jax.device_get(metrics)
  assert int(new.step) == 3
  for name in ("d_loss", "g_loss", "d_real", "d_fake", "loss"):
    assert np.isfinite(metrics[name]), name
  assert 0.0 < metrics["d_real"] < 1.0 and 0.9 <= metrics["real_label_mean"] < 1.0
  for part in ("generator", "discriminator"):
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new.params[part],
                         state.params[part])
    assert max(jax.tree.leaves(moved)) > 0, part
  assert not np.allclose(new.batch_stats["generator"]["from_latent_bn"]["mean"],
                         state.batch_stats["generator"]["from_latent_bn"]["mean"])
