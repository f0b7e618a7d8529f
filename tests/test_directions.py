"""Direction discovery: deformator variants, shift sampling, losses, Voynov training on a toy
generator with known factors, and SeFa / GANSpace / PCA recovering known directions."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cardiac_jax import directions as dl

LATENT_DIM, SIZE = 8, 16


def blob_patterns() -> np.ndarray:
  """(d, S*S) Gaussian blobs at distinct places: factor k moves the brightness of blob k."""
  yy, xx = np.mgrid[:SIZE, :SIZE]
  centres = [(4, 4), (4, 12), (12, 4), (12, 12), (8, 8), (2, 8), (14, 8), (8, 2)]
  return np.stack([np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4.0)
                   for cy, cx in centres]).reshape(LATENT_DIM, -1).astype(np.float32)


def linear_generator(patterns: np.ndarray):
  p = jnp.asarray(patterns)
  return lambda z: (0.5 + 0.08 * z @ p).reshape(z.shape[0], SIZE, SIZE, 1)


def abs_cos(a, b) -> float:
  return float(abs(np.dot(a, b)) / (np.linalg.norm(a) * np.linalg.norm(b)))


# ----------------------------------------------------------------------------- deformators
def test_ortho_deformator_is_orthogonal_from_random_skew():
  deformator = dl.Deformator("ortho", 6, 6, init="random")
  a = np.asarray(deformator.matrix(deformator.init_params(jax.random.key(0))), np.float64)
  assert np.abs(a - np.eye(6)).max() > 0.05  # A real rotation, not the identity.
  np.testing.assert_allclose(a.T @ a, np.eye(6), atol=1e-5)
  identity_start = dl.Deformator("ortho", 6, 6)
  np.testing.assert_allclose(identity_start.matrix(identity_start.init_params(
      jax.random.key(0))), np.eye(6), atol=1e-6)
  with pytest.raises(ValueError, match="num_directions == latent_dim"):
    dl.Deformator("ortho", 6, 4)


@pytest.mark.parametrize("init,k", [("random", 5), ("identity", 12)])
def test_proj_deformator_columns_are_unit_and_shift_has_length_eps(init, k):
  deformator = dl.Deformator("proj", 6, k, init=init)
  params = deformator.init_params(jax.random.key(1))
  a = np.asarray(deformator.matrix(params))
  np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.ones(k), atol=1e-6)
  shifts = deformator(params, jnp.array([0, k - 1, 2]), jnp.array([2.5, -0.5, 6.0]))
  np.testing.assert_allclose(np.linalg.norm(shifts, axis=1), [2.5, 0.5, 6.0], rtol=1e-5)
  np.testing.assert_allclose(shifts[1], -0.5 * a[:, k - 1], rtol=1e-5)


def test_linear_identity_init_is_identity_on_the_min_block():
  wide = dl.Deformator("linear", 4, 6)
  a = np.asarray(wide.matrix(wide.init_params(jax.random.key(0))))
  np.testing.assert_array_equal(a[:, :4], np.eye(4))
  np.testing.assert_array_equal(a[:, 4:], 0.0)
  tall = dl.Deformator("linear", 6, 4)
  np.testing.assert_array_equal(tall.matrix(tall.init_params(jax.random.key(0))), np.eye(6, 4))
  noisy = dl.Deformator("linear", 6, 4, init="random")
  a = np.asarray(noisy.matrix(noisy.init_params(jax.random.key(0))))
  assert 0.05 < a.std() < 0.15  # 0.1 * N(0, 1).


def test_fixed_deformators_and_bad_names():
  rnd = dl.Deformator("random", 5, 3)
  a = np.asarray(rnd.matrix(rnd.init_params(jax.random.key(3))))
  np.testing.assert_allclose(a.T @ a, np.eye(3), atol=1e-5)
  with pytest.raises(ValueError, match="unknown deformator"):
    dl.Deformator("cayley", 4, 4)
  with pytest.raises(ValueError, match="at most latent_dim"):
    dl.Deformator("identity", 4, 5)


# --------------------------------------------------------------------------- shifts, losses
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), k=st.integers(1, 40))
def test_shift_sampling_range(seed, k):
  directions, eps = jax.device_get(dl.sample_shifts(jax.random.key(seed), 256, k))
  assert directions.dtype == np.int32 and directions.min() >= 0 and directions.max() < k
  assert np.all(np.abs(eps) >= 0.5) and np.all(np.abs(eps) <= 6.0)


def test_shift_sampling_distribution():
  directions, eps = jax.device_get(dl.sample_shifts(jax.random.key(0), 60000, 10))
  # P(|eps| < 0.5) = 1/12 before the push: that mass sits at exactly +-0.5, split by sign.
  clamped = np.abs(eps) == 0.5
  assert abs(clamped.mean() - 1 / 12) < 0.005
  assert abs((eps[clamped] > 0).mean() - 0.5) < 0.03
  assert abs((eps > 0).mean() - 0.5) < 0.01
  np.testing.assert_allclose(np.bincount(directions, minlength=10) / 60000, 0.1, atol=0.006)


def test_direction_losses_match_numpy():
  logits = np.array([[2.0, -1.0, 0.5], [0.0, 0.0, 3.0]], np.float32)
  k = np.array([0, 1])
  pred, eps = np.array([1.0, -2.0], np.float32), np.array([0.5, -3.5], np.float32)
  total, ce, l1 = dl.direction_losses(jnp.asarray(logits), jnp.asarray(pred), jnp.asarray(k),
                                      jnp.asarray(eps))
  log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  expected_ce = -np.mean(log_softmax[np.arange(2), k])
  np.testing.assert_allclose(ce, expected_ce, rtol=1e-5)
  np.testing.assert_allclose(l1, 1.0, rtol=1e-6)
  np.testing.assert_allclose(total, expected_ce + 0.25, rtol=1e-5)


# ------------------------------------------------------------------------ Voynov training
@pytest.fixture(scope="module")
def trained_voynov():
  generator = linear_generator(blob_patterns())
  config = dl.VoynovConfig(num_directions=LATENT_DIM, deformator="linear", batch_size=16,
                           reconstructor_width=1, learning_rate=1e-3)
  discovery = dl.VoynovDiscovery(generator, LATENT_DIM, config)
  state = discovery.init(jax.random.key(0))
  before = discovery.evaluate(state, jax.random.key(7), num_batches=8)
  trained, history = discovery.train(state, jax.random.key(1), 200, log_every=50)
  return discovery, state, trained, history, before


def test_voynov_reaches_accuracy_well_above_chance(trained_voynov):
  discovery, _, trained, history, before = trained_voynov
  after = discovery.evaluate(trained, jax.random.key(7), num_batches=8)
  assert before["accuracy"] < 0.3  # An untrained reconstructor is near chance (1/8).
  assert after["accuracy"] > 0.5, after  # Chance is 0.125.
  assert history[-1]["direction_loss"] < history[0]["direction_loss"]
  assert after["shift_mae"] < before["shift_mae"]
  assert len(after["accuracy_per_direction"]) == LATENT_DIM


def test_voynov_step_trains_only_deformator_and_reconstructor(trained_voynov):
  discovery, state, trained, _, _ = trained_voynov
  assert set(trained.params) == {"deformator", "reconstructor"}
  assert int(trained.step) == 200
  moved = np.abs(discovery.directions(trained) - discovery.directions(state)).max()
  assert moved > 1e-3
  fixed = dl.VoynovDiscovery(discovery.generator, LATENT_DIM, dl.VoynovConfig(
      num_directions=4, deformator="identity", reconstructor_width=1, batch_size=8))
  s0 = fixed.init(jax.random.key(0))
  s1, metrics = fixed.train_step(s0, jax.random.key(1))
  np.testing.assert_array_equal(fixed.directions(s1), np.eye(LATENT_DIM, 4).T)
  assert np.isfinite(float(metrics["loss"]))


def test_ortho_deformator_trains_and_stays_orthogonal():
  discovery = dl.VoynovDiscovery(linear_generator(blob_patterns()), LATENT_DIM, dl.VoynovConfig(
      num_directions=LATENT_DIM, deformator="ortho", deformator_init="random",
      reconstructor_width=1, batch_size=4, learning_rate=1e-2))
  state = discovery.init(jax.random.key(0))
  before = discovery.directions(state)
  for i in range(3):
    state, metrics = discovery.train_step(state, jax.random.key(i))
  assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm_deformator"]) > 0
  a = discovery.directions(state)
  assert np.abs(a - before).max() > 1e-3
  np.testing.assert_allclose(a @ a.T, np.eye(LATENT_DIM), atol=1e-5)


def test_resnet_reconstructor_heads():
  model = dl.make_reconstructor("resnet", 5, width=1)
  x = jax.random.normal(jax.random.key(0), (3, SIZE, SIZE, 2))
  variables = jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.key(1), x)
  logits, shift = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert logits.shape == (3, 5) and shift.shape == (3,)
  assert np.all(np.isfinite(logits)) and np.all(np.isfinite(shift))
  with pytest.raises(ValueError, match="unknown reconstructor"):
    dl.make_reconstructor("vgg", 5)


# --------------------------------------------------------------------------- closed forms
def known_first_map(rng):
  """Kernel (d, F) = V diag(s) H^T with equal row norms of A = kernel^T (H: Hadamard columns),
  so the rows of V^T are SeFa's answer even after row normalisation."""
  h = np.array([[1.0]])
  while h.shape[0] < 16:
    h = np.block([[h, h], [h, -h]])
  h = h[:, :LATENT_DIM] / 4.0  # (16, d) orthonormal columns, every entry +-1/4.
  v, _ = np.linalg.qr(rng.normal(size=(LATENT_DIM, LATENT_DIM)))
  s = np.array([8.0, 6.0, 4.5, 3.0, 2.0, 1.5, 1.0, 0.5])
  return v @ np.diag(s) @ h.T, v


def test_sefa_recovers_the_top_directions():
  kernel, v = known_first_map(np.random.default_rng(0))
  found = dl.sefa_directions(kernel)
  assert np.all(np.diff(found.values) <= 0)
  for i in range(3):
    assert abs_cos(found.vectors[i], v[:, i]) > 0.99


def test_ganspace_recovers_the_top_directions_of_a_linear_feature_map():
  kernel, v = known_first_map(np.random.default_rng(1))
  k = jnp.asarray(kernel, jnp.float32)
  found = dl.ganspace_directions(lambda z: z @ k, jax.random.key(0), LATENT_DIM,
                                 num_samples=4096)
  assert np.all(np.diff(found.values) <= 0)
  for i in range(3):
    assert abs_cos(found.vectors[i], v[:, i]) > 0.99
  # One sigma of component i is a latent step of about 1 (z ~ N(0, I), orthonormal V).
  np.testing.assert_allclose(found.scales[:3], 1.0, atol=0.05)


def test_pca_of_latents_recovers_axes_and_sigmas():
  rng = np.random.default_rng(2)
  v, _ = np.linalg.qr(rng.normal(size=(LATENT_DIM, LATENT_DIM)))
  sigmas = np.array([5.0, 3.0, 2.0, 1.0, 0.8, 0.6, 0.4, 0.2])
  latents = (rng.normal(size=(20000, LATENT_DIM)) * sigmas) @ v.T
  found = dl.pca_latent_directions(latents, num_components=4)
  assert found.vectors.shape == (4, LATENT_DIM)
  for i in range(3):
    assert abs_cos(found.vectors[i], v[:, i]) > 0.99
  np.testing.assert_allclose(found.scales[:3], sigmas[:3], rtol=0.03)


def test_shift_grid_renders_every_direction_and_shift(tmp_path):
  patterns = blob_patterns()
  generator = linear_generator(patterns)
  z = np.random.default_rng(0).normal(size=LATENT_DIM).astype(np.float32)
  dirs = np.eye(LATENT_DIM, dtype=np.float32)[:3] * 2.0
  shifts = [-3.0, 0.0, 1.5]
  grid = dl.shift_grid(generator, z, dirs, shifts)
  assert grid.shape == (3, 3, SIZE, SIZE, 1)
  for i in range(3):
    for j, t in enumerate(shifts):
      expected = np.asarray(generator(jnp.asarray((z + t * dirs[i])[None])))[0]
      np.testing.assert_allclose(grid[i, j], expected, atol=1e-6)
  path = dl.save_direction_grid(str(tmp_path / "grid.png"), grid, shifts, ["a", "b", "c"])
  assert os.path.getsize(path) > 1000
  with pytest.raises(ValueError, match="directions must be"):
    dl.shift_grid(generator, z, dirs[:, :4], shifts)
