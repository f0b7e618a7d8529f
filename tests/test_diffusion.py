"""Tests of cardiac_jax.diffusion: schedule values, respacing, q_sample, DDIM decode/inversion."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cardiac_jax import diffusion

FULL = diffusion.linear_schedule(1000, 1e-4, 0.02)


def _oracle_eps_fn(x_t, t, x0):
  """The exact eps of x_t given the known clean x0 (cond): (x_t - sqrt(abar) x0)/sqrt(1-abar)."""
  abar = FULL.alphas_cumprod[t].reshape((-1,) + (1,) * (x_t.ndim - 1))
  return (x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)


SIGMA_DATA = 0.5


def _gaussian_eps_fn(x_t, t, cond):
  """Optimal (linear) eps predictor for data ~ N(0, SIGMA_DATA^2 I): E[eps | x_t]."""
  del cond
  abar = FULL.alphas_cumprod[t].reshape((-1,) + (1,) * (x_t.ndim - 1))
  return jnp.sqrt(1.0 - abar) * x_t / (abar * SIGMA_DATA ** 2 + 1.0 - abar)


def test_linear_schedule_matches_closed_form():
  t = np.arange(1000, dtype=np.float64)
  betas = 1e-4 + (0.02 - 1e-4) * t / 999.0
  abar = np.cumprod(1.0 - betas)
  np.testing.assert_allclose(np.asarray(FULL.betas), betas, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(FULL.alphas_cumprod), abar, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(FULL.timesteps), np.arange(1000))
  # Known values of the DDPM linear schedule.
  assert float(FULL.alphas_cumprod[0]) == pytest.approx(0.9999, abs=1e-7)
  assert float(FULL.alphas_cumprod[-1]) == pytest.approx(4.0358e-5, rel=1e-3)
  assert FULL.betas.dtype == jnp.float32


def _reference_stride_grid(num_timesteps, num_steps):
  """DiffAE's "ddimN": the first integer stride whose range(0, T, stride) has N elements."""
  for stride in range(1, num_timesteps):
    if len(range(0, num_timesteps, stride)) == num_steps:
      return np.arange(0, num_timesteps, stride)
  return None


def test_default_ddim_grid_is_the_reference_stride_grid():
  grid = diffusion.ddim_timesteps(1000, 20)
  np.testing.assert_array_equal(grid, np.arange(0, 1000, 50))   # 0, 50, ..., 950
  np.testing.assert_array_equal(diffusion.ddim_schedule(1000, 20).timesteps, grid)
  for num_timesteps in (10, 100, 1000):
    for num_steps in range(1, num_timesteps + 1):
      expected = _reference_stride_grid(num_timesteps, num_steps)
      if expected is None:
        with pytest.raises(ValueError, match="no integer stride"):
          diffusion.ddim_timesteps(num_timesteps, num_steps, "stride")
      else:
        np.testing.assert_array_equal(
            diffusion.ddim_timesteps(num_timesteps, num_steps, "stride"), expected)
  with pytest.raises(ValueError, match="unknown DDIM grid"):
    diffusion.ddim_timesteps(1000, 20, "linear")


def test_ddim_grid_and_respacing_definition():
  grid = diffusion.ddim_timesteps(1000, 20, "even")
  assert grid[0] == 0 and grid[-1] == 999 and len(grid) == 20
  np.testing.assert_array_equal(grid, np.round(np.arange(20) * 999 / 19).astype(int))
  spaced = diffusion.respace(1000, grid)
  abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
  # Betas recomputed on the grid: beta'_i = 1 - abar[tau_i] / abar[tau_{i-1}].
  expected_betas = 1.0 - abar[grid] / np.concatenate([[1.0], abar[grid[:-1]]])
  np.testing.assert_allclose(np.asarray(spaced.betas), expected_betas, rtol=1e-5)
  # ... so the respaced process has the original abar at the grid points.
  np.testing.assert_allclose(np.cumprod(1.0 - np.asarray(spaced.betas, np.float64)),
                             abar[grid], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(spaced.alphas_cumprod), abar[grid], rtol=1e-5)
  # Respacing on every timestep is the original schedule.
  same = diffusion.respace(1000, np.arange(1000))
  np.testing.assert_allclose(np.asarray(same.betas), np.asarray(FULL.betas), rtol=1e-4)
  with pytest.raises(ValueError, match="increase strictly"):
    diffusion.respace(1000, [0, 10, 10])
  with pytest.raises(ValueError, match="num_steps"):
    diffusion.ddim_timesteps(1000, 0)


def test_q_sample_moments():
  x0 = jnp.full((3, 20000), 0.7)
  t = jnp.array([0, 500, 999])
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  x_t = diffusion.q_sample(FULL, x0, t, noise)
  abar = np.asarray(FULL.alphas_cumprod)[[0, 500, 999]]
  np.testing.assert_allclose(np.asarray(x_t.mean(axis=1)), 0.7 * np.sqrt(abar), atol=0.02)
  np.testing.assert_allclose(np.asarray(x_t.std(axis=1)), np.sqrt(1.0 - abar), rtol=0.03)
  # Exactly the formula for given noise.
  np.testing.assert_allclose(np.asarray(x_t[1]), np.sqrt(abar[1]) * 0.7
                             + np.sqrt(1.0 - abar[1]) * np.asarray(noise[1]), rtol=1e-5,
                             atol=1e-6)


def test_p2_weights_match_the_closed_form():
  abar = np.asarray(FULL.alphas_cumprod, np.float64)
  snr = abar / (1.0 - abar)
  np.testing.assert_array_equal(np.asarray(diffusion.p2_weights(FULL)), 1.0)
  for gamma, k in ((1.0, 1.0), (0.5, 1.0), (1.0, 5.0)):
    weights = np.asarray(diffusion.p2_weights(FULL, gamma, k))
    assert weights.dtype == np.float32 and weights.shape == (1000,)
    np.testing.assert_allclose(weights, (k + snr) ** -gamma, rtol=1e-6)
  weights = np.asarray(diffusion.p2_weights(FULL, 1.0, 1.0))
  # Low noise (SNR ~ 1e4 at t = 0) is scaled down by ~1 / SNR, high noise kept (~1).
  assert weights[0] < 2e-4 and weights[-1] > 0.999 and np.all(np.diff(weights) > 0)
  with pytest.raises(ValueError, match="gamma"):
    diffusion.p2_weights(FULL, -1.0)
  with pytest.raises(ValueError, match="offset k"):
    diffusion.p2_weights(FULL, 1.0, 0.0)


def test_eps_loss_per_example():
  noise = jnp.zeros((2, 3, 4))
  eps_hat = jnp.stack([jnp.ones((3, 4)), 2.0 * jnp.ones((3, 4))])
  np.testing.assert_allclose(np.asarray(diffusion.eps_loss_per_example(noise, eps_hat)),
                             [1.0, 4.0])


@pytest.mark.parametrize("num_steps,grid", [(1, "even"), (5, "stride"), (20, "stride"),
                                            (20, "even")])
def test_ddim_decode_with_oracle_reconstructs_x0(num_steps, grid):
  key_x, key_n = jax.random.split(jax.random.key(2))
  x0 = jax.random.uniform(key_x, (2, 3, 8, 8, 1), minval=-0.9, maxval=0.9)
  x_T = jax.random.normal(key_n, x0.shape)
  schedule = diffusion.ddim_schedule(1000, num_steps, grid=grid)
  out = diffusion.ddim_decode(_oracle_eps_fn, x_T, x0, schedule)
  np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=2e-4)
  # Decoding from pure noise with the oracle leaves no trace of x_T.
  assert out.shape == x0.shape


def test_oracle_inversion_is_the_forward_process():
  """With the exact eps, each inversion step lands on sqrt(abar_next) x0 + sqrt(1-abar_next) eps
  for one fixed eps; with abar_next = 0 at the top, x_T = eps itself."""
  x0 = jnp.linspace(-0.8, 0.8, 2 * 64).reshape(2, 64)
  eps = jax.random.normal(jax.random.key(3), x0.shape)
  abar0 = FULL.alphas_cumprod[0]
  x_start = jnp.sqrt(abar0) * x0 + jnp.sqrt(1 - abar0) * eps  # The state at tau_0 = 0.
  schedule = diffusion.ddim_schedule(1000, 10)
  x_T = diffusion.ddim_invert(_oracle_eps_fn, x_start, x0, schedule)
  np.testing.assert_allclose(np.asarray(x_T), np.asarray(eps), atol=2e-3)
  back = diffusion.ddim_decode(_oracle_eps_fn, x_T, x0, schedule)
  np.testing.assert_allclose(np.asarray(back), np.asarray(x0), atol=2e-4)


def test_clipping_of_x0_prediction():
  # An eps model that predicts zero noise makes x0_hat = x_t / sqrt(abar) (out of range).
  zero_eps = lambda x_t, t, cond: jnp.zeros_like(x_t)
  x_T = jnp.full((1, 4), 3.0)
  schedule = diffusion.ddim_schedule(1000, 4, grid="even")
  clipped = diffusion.ddim_decode(zero_eps, x_T, None, schedule, clip=True)
  unclipped = diffusion.ddim_decode(zero_eps, x_T, None, schedule, clip=False)
  np.testing.assert_allclose(np.asarray(clipped), 1.0)
  assert float(unclipped.max()) > 100.0


def test_inversion_then_decoding_is_near_identity_for_gaussian_data():
  """For N(0, s^2) data the optimal eps model is linear and the DDIM ODE is a bijection: the
  discretised round trip converges to the identity as the grid is refined."""
  x0 = SIGMA_DATA * jax.random.normal(jax.random.key(4), (4, 256))
  errors = []
  for num_steps in (10, 50, 200):
    schedule = diffusion.ddim_schedule(1000, num_steps)
    x_T = diffusion.ddim_invert(_gaussian_eps_fn, x0, None, schedule, clip=False)
    back = diffusion.ddim_decode(_gaussian_eps_fn, x_T, None, schedule, clip=False)
    errors.append(float(jnp.sqrt(jnp.mean(jnp.square(back - x0)))))
  assert errors[0] > errors[1] > errors[2]
  assert errors[2] < 0.03 * 1.0  # RMS error under 3 % of the [-1, 1] range (data std 0.5).
  # The inverted code has the unit scale of noise.
  assert 0.9 < float(jnp.std(x_T)) < 1.1


def test_diffae_runs_use_the_reference_grid_and_old_runs_keep_theirs():
  from cardiac_jax import families
  from experiments.configs import diffae3d
  for variant in ("paper", "smoke", None):
    assert families.make_family(diffae3d.get_config(variant)).ddim_grid == "stride"
  # A run saved before eval.ddim_grid existed was evaluated on the "even" grid.
  old = diffae3d.get_config("smoke")
  del old.eval["ddim_grid"]
  assert families.make_family(old).ddim_grid == "even"
  bad = diffae3d.get_config("smoke")
  bad.eval.decode_steps = 333
  # A user error (one line from a command, no traceback), not a bare ValueError.
  from cardiac_jax import config_checks
  with pytest.raises(config_checks.ConfigError,
                     match="eval.decode_steps = 333 on the 'stride' DDIM grid"):
    families.make_family(bad)
  with pytest.raises(config_checks.ConfigError, match="--decode_steps must be in"):
    families.make_family(diffae3d.get_config("smoke")).with_ddim(decode_steps=0)
