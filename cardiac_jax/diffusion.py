"""Gaussian diffusion for the diffusion autoencoder: schedules, q_sample, DDIM decode/inversion.

Follows DDPM (Ho, Jain & Abbeel 2020) for the forward process and the eps-prediction loss, DDIM
(Song, Meng & Ermon 2021, eta = 0) for deterministic decoding, and Diffusion Autoencoders
(Preechakul et al., CVPR 2022) for the deterministic inversion x_0 -> x_T ("stochastic encoding")
and the respaced step grids.

- Linear betas: beta_t = beta_start + (beta_end - beta_start) t / (T - 1), t = 0..T-1
  (T = 1000, 1e-4..0.02), alphas_cumprod abar_t = prod_{s <= t} (1 - beta_s), computed in
  float64 and stored as float32.
- Forward process: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.
- Loss weights (`p2_weights`, Choi et al., "Perception Prioritized Training of Diffusion
  Models", CVPR 2022): lambda_t = 1 / (k + SNR_t)^gamma with SNR_t = abar_t / (1 - abar_t);
  gamma = 0 is the plain eps loss of DDPM. gamma = 1, k = 1 scales the low-noise steps (SNR
  >> 1, where the eps loss is mostly the image's own unpredictable noise) by about 1 / SNR and
  leaves the steps with SNR << 1 (where the coarse content must be predicted) as they are.
- Respacing on a grid tau_0 < ... < tau_{N-1}: betas recomputed as
  beta'_i = 1 - abar_{tau_i} / abar_{tau_{i-1}} (abar_{tau_{-1}} = 1), so the respaced process
  has exactly the original abar at the grid points; the model is always called with the
  original timestep tau_i.
- DDIM grids with N steps (`ddim_timesteps`): "stride", the grid of the DiffAE and ImLatent
  code ("ddimN"): tau = range(0, T, k) with k the smallest integer stride giving exactly N
  steps (k = T / N when N divides T: 0, 50, ..., 950 for N = 20), so the top step is below
  T - 1; "even": tau_i = round(i (T - 1) / (N - 1)), N steps from 0 to T - 1 inclusive.
- One DDIM step from the state at abar_t to abar_s (s before t when decoding, after t when
  inverting): x0_hat = clip((x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t), -1, 1);
  eps_tilde = (x_t / sqrt(abar_t) - x0_hat) / sqrt(1 / abar_t - 1);
  x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s) eps_tilde.
  Decoding runs the grid backwards with abar_prev of tau_0 equal to 1 (the last step returns
  x0_hat); inversion runs it forwards from x_0 taken as the state at tau_0 with abar_next of
  tau_{N-1} equal to 0, exactly as the DiffAE reference (`alphas_cumprod_next`), so N
  inversion steps give x_T = eps_tilde at the top of the grid.

Every sampler takes the noise model as `eps_fn(x_t, t, cond) -> eps_hat` with x_t (B, ...),
t (B,) int32 original timesteps and `cond` any pytree (the semantic code z_sem for the DiffAE),
so the module knows nothing about networks. Loops are `lax.scan` over the grid: one compiled
step whatever N is.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

EpsFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


@struct.dataclass
class Schedule:
  """A (possibly respaced) discrete diffusion schedule of N steps.

  timesteps: (N,) int32, the original timestep of each step (what the model is called with).
  betas: (N,) float32, the betas of this (respaced) process.
  alphas_cumprod: (N,) float32, abar at each step (equal to the original abar at `timesteps`).
  """
  timesteps: jax.Array
  betas: jax.Array
  alphas_cumprod: jax.Array

  @property
  def num_steps(self) -> int:
    return int(self.timesteps.shape[0])


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02) -> np.ndarray:
  """(T,) float64 linearly spaced betas from beta_start to beta_end inclusive (DDPM)."""
  if num_timesteps < 2:
    raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
  if not 0.0 < beta_start <= beta_end < 1.0:
    raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def _schedule_from_betas(timesteps: np.ndarray, betas: np.ndarray) -> Schedule:
  alphas_cumprod = np.cumprod(1.0 - betas)
  return Schedule(timesteps=jnp.asarray(timesteps, jnp.int32),
                  betas=jnp.asarray(betas, jnp.float32),
                  alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32))


def linear_schedule(num_timesteps: int = 1000, beta_start: float = 1e-4,
                    beta_end: float = 0.02) -> Schedule:
  """The full T-step linear schedule (timesteps 0..T-1)."""
  betas = linear_betas(num_timesteps, beta_start, beta_end)
  return _schedule_from_betas(np.arange(num_timesteps), betas)


DDIM_GRIDS = ("stride", "even")


def ddim_timesteps(num_timesteps: int, num_steps: int, grid: str = "stride") -> np.ndarray:
  """(N,) int32 increasing DDIM grid starting at 0: "stride" (the reference's range(0, T, k))
  or "even" (N steps from 0 to T - 1 inclusive); see the module docstring."""
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
  if grid == "stride":
    # The smallest k < T with len(range(0, T, k)) = ceil(T / k) = N (as the reference, which
    # has no 1-step grid: that would decode from t = 0).
    stride = -(-num_timesteps // num_steps)
    while stride < num_timesteps and -(-num_timesteps // stride) > num_steps:
      stride += 1
    if stride >= num_timesteps or -(-num_timesteps // stride) != num_steps:
      raise ValueError(f"no integer stride gives exactly {num_steps} of {num_timesteps} "
                       f"timesteps on the 'stride' DDIM grid; choose another step count or "
                       f"the 'even' grid")
    return np.arange(0, num_timesteps, stride, dtype=np.int32)
  if grid != "even":
    raise ValueError(f"unknown DDIM grid {grid!r}; expected one of {DDIM_GRIDS}")
  if num_steps == 1:
    return np.array([num_timesteps - 1], np.int32)
  spacing = (num_timesteps - 1) / (num_steps - 1)
  return np.round(np.arange(num_steps) * spacing).astype(np.int32)


def respace(num_timesteps: int, timesteps, beta_start: float = 1e-4,
            beta_end: float = 0.02) -> Schedule:
  """The linear schedule restricted to `timesteps` with betas recomputed on the grid.

  Args:
    num_timesteps: T of the original schedule.
    timesteps: strictly increasing original timesteps in [0, T).
    beta_start, beta_end: the original linear schedule.

  Returns:
    Schedule with beta'_i = 1 - abar_{tau_i} / abar_{tau_{i-1}} (abar_{tau_{-1}} = 1), so its
    alphas_cumprod equals the original abar at `timesteps` (computed in float64).
  """
  timesteps = np.asarray(timesteps, np.int64)
  if timesteps.ndim != 1 or timesteps.size == 0:
    raise ValueError(f"timesteps must be a non-empty 1-D grid, got shape {timesteps.shape}")
  if np.any(np.diff(timesteps) <= 0) or timesteps[0] < 0 or timesteps[-1] >= num_timesteps:
    raise ValueError(f"timesteps must increase strictly within [0, {num_timesteps}), got "
                     f"{timesteps.tolist()}")
  abar = np.cumprod(1.0 - linear_betas(num_timesteps, beta_start, beta_end))[timesteps]
  previous = np.concatenate([[1.0], abar[:-1]])
  return _schedule_from_betas(timesteps, 1.0 - abar / previous)


def ddim_schedule(num_timesteps: int, num_steps: int, beta_start: float = 1e-4,
                  beta_end: float = 0.02, grid: str = "stride") -> Schedule:
  """The respaced schedule of an N-step DDIM grid (`ddim_timesteps` + `respace`)."""
  return respace(num_timesteps, ddim_timesteps(num_timesteps, num_steps, grid), beta_start,
                 beta_end)


def _per_example(values: jax.Array, ndim: int) -> jax.Array:
  """(B,) -> (B, 1, ..., 1) broadcastable against a (B, ...) array of rank `ndim`."""
  return values.reshape(values.shape + (1,) * (ndim - 1))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.

  Args:
    schedule: the full schedule (step index == original timestep).
    x0: (B, ...) clean data.
    t: (B,) int32 step indices into `schedule`.
    noise: eps, same shape as x0.
  """
  abar = _per_example(schedule.alphas_cumprod[t], x0.ndim).astype(x0.dtype)
  return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


def p2_weights(schedule: Schedule, gamma: float = 0.0, k: float = 1.0) -> jax.Array:
  """(N,) float32 loss weights lambda_t = 1 / (k + SNR_t)^gamma (module docstring); all ones
  for gamma = 0."""
  if gamma < 0.0:
    raise ValueError(f"the P2 exponent gamma must be >= 0, got {gamma}")
  if gamma > 0.0 and k <= 0.0:
    raise ValueError(f"the P2 offset k must be > 0 when gamma > 0, got {k}")
  abar = np.asarray(schedule.alphas_cumprod, np.float64)
  if gamma == 0.0:
    return jnp.ones(abar.shape, jnp.float32)
  return jnp.asarray((k + abar / (1.0 - abar)) ** -gamma, jnp.float32)


def eps_loss_per_example(noise: jax.Array, eps_hat: jax.Array) -> jax.Array:
  """(B,) mean over voxels of (eps - eps_hat)^2, in float32 whatever the compute dtype."""
  diff = noise.astype(jnp.float32) - eps_hat.astype(jnp.float32)
  return jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))


def predict_x0(x_t: jax.Array, eps_hat: jax.Array, abar_t: jax.Array,
               clip: bool = True) -> jax.Array:
  """x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t), clipped to [-1, 1] if `clip`."""
  x0 = (x_t - jnp.sqrt(1.0 - abar_t) * eps_hat) / jnp.sqrt(abar_t)
  return jnp.clip(x0, -1.0, 1.0) if clip else x0


def ddim_step(x_t: jax.Array, eps_hat: jax.Array, abar_t: jax.Array, abar_target: jax.Array,
              clip: bool = True) -> tuple[jax.Array, jax.Array]:
  """One eta = 0 DDIM move from abar_t to abar_target (either direction).

  Returns (x_target, x0_hat). eps is re-derived from the (clipped) x0_hat so that the move is
  consistent with the prediction that was actually used.
  """
  x0_hat = predict_x0(x_t, eps_hat, abar_t, clip)
  eps_tilde = (x_t / jnp.sqrt(abar_t) - x0_hat) / jnp.sqrt(1.0 / abar_t - 1.0)
  x_target = jnp.sqrt(abar_target) * x0_hat + jnp.sqrt(1.0 - abar_target) * eps_tilde
  return x_target, x0_hat


def _scan_ddim(eps_fn: EpsFn, x: jax.Array, cond: Any, timesteps: jax.Array,
               abar_from: jax.Array, abar_to: jax.Array, clip: bool) -> jax.Array:
  batch = x.shape[0]

  def body(x_t, step):
    t, abar_t, abar_target = step
    eps_hat = eps_fn(x_t, jnp.full((batch,), t, jnp.int32), cond)
    x_next, _ = ddim_step(x_t.astype(jnp.float32), eps_hat.astype(jnp.float32), abar_t,
                          abar_target, clip)
    return x_next.astype(x.dtype), None

  x, _ = jax.lax.scan(body, x, (timesteps, abar_from, abar_to))
  return x


@functools.partial(jax.jit, static_argnames=("eps_fn", "clip"))
def ddim_decode(eps_fn: EpsFn, x_T: jax.Array, cond: Any, schedule: Schedule,
                clip: bool = True) -> jax.Array:
  """DDIM decoding x_T -> x_0 over the grid of `schedule`, from its last step to its first.

  Args:
    eps_fn: `(x_t (B, ...), t (B,) int32, cond) -> eps_hat (B, ...)`.
    x_T: (B, ...) the state at the last grid step (noise, or an inverted code).
    cond: conditioning passed unchanged to `eps_fn` (z_sem (B, D) for the DiffAE).
    schedule: respaced schedule (`ddim_schedule`).
    clip: clip x0_hat to [-1, 1] at every step.

  Returns:
    (B, ...) x_0: the x0_hat of the last step (abar_prev of the first grid step is 1).
  """
  abar = schedule.alphas_cumprod
  abar_prev = jnp.concatenate([jnp.ones((1,), abar.dtype), abar[:-1]])
  return _scan_ddim(eps_fn, x_T, cond, schedule.timesteps[::-1], abar[::-1], abar_prev[::-1],
                    clip)


@functools.partial(jax.jit, static_argnames=("eps_fn", "clip"))
def ddim_invert(eps_fn: EpsFn, x0: jax.Array, cond: Any, schedule: Schedule,
                clip: bool = True) -> jax.Array:
  """Deterministic DDIM inversion x_0 -> x_T (DiffAE "stochastic encoding", eta = 0).

  x_0 is taken as the state at the first grid step; each step evaluates eps at the current
  state and moves to the next grid step's abar; the last step moves to abar = 0, as in the
  reference, so the output is the eps_tilde implied at the top of the grid.

  Args and shapes as `ddim_decode`; returns (B, ...) x_T.
  """
  abar = schedule.alphas_cumprod
  abar_next = jnp.concatenate([abar[1:], jnp.zeros((1,), abar.dtype)])
  return _scan_ddim(eps_fn, x0, cond, schedule.timesteps, abar, abar_next, clip)
