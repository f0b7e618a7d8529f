"""Latent DDIM over the semantic codes of a diffusion autoencoder: training, sampling, storage.

Diffusion Autoencoders (Preechakul et al., CVPR 2022, Sec. 3.3) sample new images by sampling a
semantic code z_sem from a second, small diffusion model fitted to the codes of the training
set, then decoding it with x_T ~ N(0, I). Here, for codes z_1..z_N in R^D (one per training
subject, from the EMA encoder):

- Normalisation, per dimension d (population statistics of the training codes):
    m_d = mean_n z_{n,d},  s_d = max(std_n z_{n,d}, std_floor),  u = (z - m) / s,
  and back, z = m + s u. The floor keeps a dimension the encoder does not use (constant over
  the cohort) finite: it is mapped to 0 and sampled back as m_d + floor u_d.
- Forward process on u: the linear schedule of `cardiac_jax.diffusion` (T = num_timesteps,
  betas beta_start..beta_end), u_t = sqrt(abar_t) u + sqrt(1 - abar_t) eps. With beta_start =
  beta_end = 0.008 it is the constant schedule of the original latent DDIM ("const0.008" of
  the DiffAE latent templates; abar_{T-1} = 3.3e-4, against 4.0e-5 for the image model's
  1e-4..0.02): the configs' choice, because at the top of the grid a DDIM step multiplies the
  error of eps_hat in x0_hat by sqrt((1 - abar_t) / abar_t), 55 there against 157, and short
  runs then sample codes with the training codes' spread (docs/configs.md, diffae3d).
- Loss of one step over a batch of B codes drawn uniformly with replacement from the N codes,
  t_b ~ U{0..T-1}, eps_b ~ N(0, I_D), with eps_theta = `models.latent_ddim.MLPSkipNet`:
    L = mean_{b,d} |eps_{b,d} - eps_theta(u_t, t)_{b,d}|      ("l1", the reference)
    or mean_{b,d} (eps - eps_theta)^2                          ("l2").
  Adam, or AdamW with weight_decay > 0 (the reference: 0.01), at learning_rate, with global
  gradient-norm clipping at grad_clip_norm (0 = off), then the exponential moving average
  ema <- d ema + (1 - d) params (d = ema_decay; 0: the EMA is the parameters). Sampling uses
  the EMA parameters, as the reference.
- Sampling: u_T ~ N(0, I_D), eta = 0 DDIM decoding (`diffusion.ddim_decode`) over the
  `sample_steps`-step grid, without clipping x0_hat (the codes are not bounded; the
  reference's `latent_clip_sample = False`), then z = m + s u. Deterministic DDIM
  under-disperses with few steps even with the exact eps, less the more steps it takes
  (docs/configs.md, diffae3d).

State: the project's `TrainState` with params {"net", "ema"}, opt_state {"net"}, rng = the
training key; the minibatch, timesteps and noise of step k come from fold_in(rng, k), so a run
resumed from a checkpoint continues exactly as an uninterrupted one. Steps run in chunks of
`log_every` updates under one `lax.scan` (one compiled call per chunk).

Files of `train_latent_ddim(z_train, latent_config, key, directory)`:
  directory/checkpoints/<step>/   the TrainState (`cardiac_jax.checkpointing.Checkpointer`),
                                  every `checkpoint_every` steps and at the end;
  directory/normalization.json    {"mean", "std", "std_floor", "num_codes", "dim"};
  directory/metrics.jsonl         per chunk: step, loss (mean over the chunk), grad_norm_net,
                                  steps_per_second;
  directory/training.json         settings, final step, training time.
A directory whose newest checkpoint has reached `num_steps` is restored, not trained again; one
with fewer steps resumes. Rerunning on codes whose statistics differ from the stored
normalisation is an error (the network was fitted to the stored ones).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cardiac_jax import checkpointing, diffusion
from cardiac_jax import runtime
from cardiac_jax.metric_logging import MetricWriter
from cardiac_jax.models.latent_ddim import MLPSkipNet
from cardiac_jax.train_state import TrainState, finish_step, make_optimizer, optimizer_step

LOSSES = ("l1", "l2")
NORMALIZATION_FILE = "normalization.json"
TRAINING_FILE = "training.json"


@dataclasses.dataclass(frozen=True)
class LatentStepSettings:
  """What a train step reads: network, schedule, loss, optimiser and batch size.

  Hashable, the static argument of the jitted steps: runs that differ only in the fields
  `LatentSettings` adds (length, logging, checkpointing, sampling) share one compilation. The
  network's defaults are the reference MLP's (`MLPSkipNet`).
  """
  num_layers: int = MLPSkipNet.num_layers
  hidden_units: int = MLPSkipNet.hidden_units
  time_embed_dim: int = MLPSkipNet.time_embed_dim
  num_timesteps: int = 1000
  beta_start: float = 0.008
  beta_end: float = 0.008
  loss: str = "l1"
  learning_rate: float = 1e-4
  weight_decay: float = 0.0
  grad_clip_norm: float = 1.0
  ema_decay: float = 0.9999
  batch_size: int = 256

  def network(self, dim: int) -> MLPSkipNet:
    return MLPSkipNet(dim=int(dim), num_layers=self.num_layers, hidden_units=self.hidden_units,
                      time_embed_dim=self.time_embed_dim)

  def schedule(self) -> diffusion.Schedule:
    """The full T-step training schedule."""
    return diffusion.linear_schedule(self.num_timesteps, self.beta_start, self.beta_end)

  def optimizer(self):
    return make_optimizer(ml_collections.ConfigDict(
        {"name": "adamw" if self.weight_decay else "adam", "learning_rate": self.learning_rate,
         "weight_decay": self.weight_decay, "grad_clip_norm": self.grad_clip_norm}))


@dataclasses.dataclass(frozen=True)
class LatentSettings(LatentStepSettings):
  """The `latent` section of a diffae3d config (experiments/configs/diffae3d.py), checked: the
  step's settings, then the run's length, logging, checkpointing, normalisation and sampling."""
  num_steps: int = 10000
  log_every: int = 100
  checkpoint_every: int = 1000
  std_floor: float = 1e-6
  sample_steps: int = 20
  ddim_grid: str = "stride"        # The DDIM grid of sampling (`diffusion.ddim_timesteps`).
  image_decode_steps: int = 20

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f"latent.loss must be one of {LOSSES}, got {self.loss!r}")
    for name in ("num_layers", "hidden_units", "time_embed_dim", "batch_size", "log_every",
                 "checkpoint_every", "image_decode_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"latent.{name} must be >= 1, got {getattr(self, name)}")
    if self.num_layers < 2:
      raise ValueError(f"latent.num_layers must be >= 2, got {self.num_layers}")
    if self.num_steps < 0:
      raise ValueError(f"latent.num_steps must be >= 0, got {self.num_steps}")
    if not 1 <= self.sample_steps <= self.num_timesteps:
      raise ValueError(f"latent.sample_steps must be in [1, latent.num_timesteps = "
                       f"{self.num_timesteps}], got {self.sample_steps}")
    try:
      diffusion.ddim_timesteps(self.num_timesteps, self.sample_steps, self.ddim_grid)
    except ValueError as e:
      raise ValueError(f"latent.sample_steps = {self.sample_steps} on latent.ddim_grid = "
                       f"{self.ddim_grid!r}: {e}") from None
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"latent.ema_decay must be in [0, 1), got {self.ema_decay}")
    if (self.learning_rate <= 0 or self.grad_clip_norm < 0 or self.std_floor <= 0
        or self.weight_decay < 0):
      raise ValueError(f"need latent.learning_rate > 0, latent.weight_decay >= 0, "
                       f"latent.grad_clip_norm >= 0 and latent.std_floor > 0, got "
                       f"{self.learning_rate}, {self.weight_decay}, {self.grad_clip_norm}, "
                       f"{self.std_floor}")
    diffusion.linear_betas(self.num_timesteps, self.beta_start, self.beta_end)  # Checks them.

  @classmethod
  def from_config(cls, latent_config: Mapping[str, Any] | None) -> "LatentSettings":
    """From a ConfigDict or dict; missing fields keep the defaults above, unknown ones fail."""
    values = dict(latent_config.items() if latent_config is not None else {})
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
      raise ValueError(f"unknown latent config fields {unknown} (known: {sorted(names)})")
    kinds = {f.name: type(f.default) for f in dataclasses.fields(cls)}
    converted = {}
    for k, v in values.items():
      converted[k] = kinds[k](v)
      if kinds[k] is int and converted[k] != v:
        raise ValueError(f"latent.{k} must be an integer, got {v!r}")
    return cls(**converted)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def step_settings(self) -> LatentStepSettings:
    """The fields a train step reads: the static argument of `train_steps`."""
    return LatentStepSettings(**{f.name: getattr(self, f.name)
                                 for f in dataclasses.fields(LatentStepSettings)})

  def ddim_schedule(self, num_steps: int | None = None) -> diffusion.Schedule:
    """The respaced DDIM grid of `num_steps` (default sample_steps) steps."""
    return diffusion.ddim_schedule(self.num_timesteps, int(num_steps or self.sample_steps),
                                   self.beta_start, self.beta_end, self.ddim_grid)


# ------------------------------------------------------------------------------ normalisation
def normalization_stats(z: np.ndarray, std_floor: float = 1e-6) -> dict[str, np.ndarray]:
  """{"mean": (D,), "std": (D,)} float64 per-dimension statistics of (N, D) codes, the std
  (population, ddof = 0) floored at `std_floor`."""
  z = np.asarray(z, np.float64)
  if z.ndim != 2 or z.shape[0] < 1 or z.shape[1] < 1:
    raise ValueError(f"codes must be a non-empty (N, D) array, got shape {z.shape}")
  if not np.all(np.isfinite(z)):
    raise ValueError("codes contain non-finite values")
  if std_floor <= 0:
    raise ValueError(f"std_floor must be > 0, got {std_floor}")
  return {"mean": z.mean(axis=0), "std": np.maximum(z.std(axis=0), std_floor)}


def normalize(z, stats: Mapping[str, Any]):
  """u = (z - mean) / std, per dimension (numpy or JAX arrays, dtype of z)."""
  mean, std = (np.asarray(stats[k], np.float64) for k in ("mean", "std"))
  xp = jnp if isinstance(z, jax.Array) else np
  return ((z - xp.asarray(mean, z.dtype)) / xp.asarray(std, z.dtype)).astype(z.dtype)


def denormalize(u, stats: Mapping[str, Any]):
  """z = mean + std u, per dimension (inverse of `normalize`)."""
  mean, std = (np.asarray(stats[k], np.float64) for k in ("mean", "std"))
  xp = jnp if isinstance(u, jax.Array) else np
  return (xp.asarray(mean, u.dtype) + xp.asarray(std, u.dtype) * u).astype(u.dtype)


# ------------------------------------------------------------------------------ state and steps
@functools.partial(jax.jit, static_argnames=("settings", "dim"))
def init_state(settings: LatentStepSettings, dim: int, key: jax.Array) -> TrainState:
  """Fresh state: network parameters from fold_in(key, 0), the EMA equal to them."""
  net = settings.network(dim)
  params = net.init(jax.random.fold_in(key, 0), jnp.zeros((1, dim), jnp.float32),
                    jnp.zeros((1,), jnp.int32))["params"]
  return TrainState(step=jnp.zeros((), jnp.int32),
                    params={"net": params, "ema": jax.tree.map(jnp.copy, params)},
                    batch_stats={"net": {}}, opt_state={"net": settings.optimizer().init(params)},
                    rng=key, skipped_nonfinite=jnp.zeros((), jnp.int32))


def eps_loss(settings: LatentStepSettings, params, u0: jax.Array, t: jax.Array,
             noise: jax.Array) -> jax.Array:
  """Scalar L1 (or L2) eps loss of the network `params` on clean normalised codes u0 (B, D)
  at timesteps t (B,) with noise (B, D)."""
  u_t = diffusion.q_sample(settings.schedule(), u0, t, noise)
  eps_hat = settings.network(u0.shape[-1]).apply({"params": params}, u_t, t)
  diff = noise - eps_hat
  return jnp.mean(jnp.abs(diff)) if settings.loss == "l1" else jnp.mean(jnp.square(diff))


def train_step(settings: LatentStepSettings, state: TrainState,
               u_train: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
  """One Adam update on a minibatch of the (N, D) normalised codes, then the EMA."""
  key = jax.random.fold_in(state.rng, state.step)
  k_idx, k_t, k_eps = jax.random.split(key, 3)
  index = jax.random.randint(k_idx, (settings.batch_size,), 0, u_train.shape[0])
  u0 = u_train[index]
  t = jax.random.randint(k_t, (settings.batch_size,), 0, settings.num_timesteps)
  noise = jax.random.normal(k_eps, u0.shape, u0.dtype)
  params = state.params["net"]
  loss, grads = jax.value_and_grad(functools.partial(eps_loss, settings))(params, u0, t, noise)
  new_params, opt_state, grads = optimizer_step(settings.optimizer(), grads,
                                                state.opt_state["net"], params, None)
  d = settings.ema_decay
  ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.params["ema"], new_params)
  new_state = state.replace(params={"net": new_params, "ema": ema},
                            opt_state={"net": opt_state})
  return finish_step(state, new_state, {"net": grads}, {"loss": loss}, skip_nonfinite=False,
                     axis_name=None)


@functools.partial(jax.jit, static_argnames=("settings", "num_steps"))
def train_steps(settings: LatentStepSettings, state: TrainState, u_train: jax.Array,
                num_steps: int) -> tuple[TrainState, dict[str, jax.Array]]:
  """`num_steps` train steps under one lax.scan; metrics averaged over them."""
  def body(s, _):
    return train_step(settings, s, u_train)
  state, metrics = jax.lax.scan(body, state, None, length=num_steps)
  return state, jax.tree.map(lambda m: jnp.mean(m.astype(jnp.float32)), metrics)


# ------------------------------------------------------------------------------ sampling
@dataclasses.dataclass(frozen=True)
class LatentEps:
  """`diffusion.EpsFn` of a latent network: cond = its parameters. Hashable (the jitted
  samplers take it as a static argument)."""
  net: MLPSkipNet

  def __call__(self, u_t: jax.Array, t: jax.Array, params) -> jax.Array:
    return self.net.apply({"params": params}, u_t, t)


def ddim_sample(eps_fn: diffusion.EpsFn, cond: Any, key: jax.Array, num: int, dim: int,
                schedule: diffusion.Schedule) -> jax.Array:
  """(num, dim) codes: u_T ~ N(0, I) from `key`, eta = 0 DDIM decoding over `schedule` with
  the noise model `eps_fn(u_t, t, cond)`, x0_hat not clipped."""
  u_T = jax.random.normal(key, (int(num), int(dim)), jnp.float32)
  return diffusion.ddim_decode(eps_fn, u_T, cond, schedule, clip=False)


def sample_normalized(settings: LatentSettings, params, key: jax.Array, num: int, dim: int,
                      num_steps: int | None = None) -> jax.Array:
  """(num, dim) normalised codes sampled with the network `params` over `num_steps` (default
  settings.sample_steps) DDIM steps (`ddim_sample`)."""
  return ddim_sample(LatentEps(settings.network(dim)), params, key, num, dim,
                     settings.ddim_schedule(num_steps))


# ------------------------------------------------------------------------------ training driver
@dataclasses.dataclass
class TrainedLatentDDIM:
  """A fitted latent DDIM: EMA parameters, normalisation and settings."""
  settings: LatentSettings
  params: Any
  stats: dict[str, np.ndarray]
  dim: int
  step: int
  trained_steps: int      # Updates run by this call (0: restored a finished checkpoint).
  final_loss: float | None
  directory: str

  def sample(self, key: jax.Array, num: int, num_steps: int | None = None,
             normalized: bool = False) -> np.ndarray:
    """(num, D) float32 sampled codes in z_sem units (or normalised with `normalized`)."""
    u = np.asarray(sample_normalized(self.settings, self.params, key, num, self.dim, num_steps))
    return u if normalized else denormalize(u, self.stats)


_log = runtime.phase_logger('latent_ddim')


def _write_json(path: str, data: dict) -> None:
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2)
  os.replace(path + ".tmp", path)


def _stored_stats(path: str, stats: dict[str, np.ndarray], settings: LatentSettings,
                  num_codes: int) -> dict[str, np.ndarray]:
  """The normalisation the directory's network was fitted to (written now if new); an error
  if `stats` of the current codes differ from it."""
  if not os.path.exists(path):
    _write_json(path, {"mean": stats["mean"].tolist(), "std": stats["std"].tolist(),
                       "std_floor": settings.std_floor, "num_codes": int(num_codes),
                       "dim": int(stats["mean"].shape[0])})
    return stats
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  stored = {k: np.asarray(saved[k], np.float64) for k in ("mean", "std")}
  same = (stored["mean"].shape == stats["mean"].shape
          and np.allclose(stored["mean"], stats["mean"], rtol=1e-4,
                          atol=1e-4 * float(np.max(stats["std"])))
          and np.allclose(stored["std"], stats["std"], rtol=1e-3, atol=settings.std_floor))
  if not same:
    raise ValueError(f"{path}: the latent DDIM in {os.path.dirname(path)} was fitted to codes "
                     f"of {saved.get('num_codes')} x {saved.get('dim')} with other statistics "
                     f"than the {num_codes} x {stats['mean'].shape[0]} codes given now; delete "
                     "that directory or use another one")
  return stored


def train_latent_ddim(z_train: np.ndarray, latent_config, key: jax.Array, directory: str, *,
                      log: Callable[[str], None] = _log) -> TrainedLatentDDIM:
  """Fits (or restores, or resumes) the latent DDIM of (N, D) codes in `directory`.

  Args:
    z_train: (N, D) training codes z_sem (one per subject).
    latent_config: the config's `latent` section (ConfigDict, dict or LatentSettings).
    key: root key of the training (minibatches, timesteps, noise, initialisation).
    directory: where checkpoints, normalization.json, metrics.jsonl and training.json live
      (module docstring).
    log: progress messages.

  Returns:
    TrainedLatentDDIM with the EMA parameters of the newest checkpoint, which has
    max(num_steps, steps already saved) steps.
  """
  settings = (latent_config if isinstance(latent_config, LatentSettings)
              else LatentSettings.from_config(latent_config))
  z_train = np.asarray(z_train, np.float32)
  stats = normalization_stats(z_train, settings.std_floor)
  num_codes, dim = z_train.shape
  os.makedirs(directory, exist_ok=True)
  stats = _stored_stats(os.path.join(directory, NORMALIZATION_FILE), stats, settings, num_codes)
  u_train = jnp.asarray(normalize(z_train, stats))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          jax.eval_shape(functools.partial(init_state, settings.step_settings(),
                                                           dim), key))
  writer = MetricWriter(directory, tensorboard=False)
  start = time.time()
  trained, loss = 0, None
  with checkpointing.Checkpointer(os.path.join(directory, "checkpoints")) as checkpointer:
    restored = checkpointer.restore_latest(abstract)
    if restored is None:
      # Committed to the device like a restored state, so both share one compiled step.
      state, step = jax.device_put(init_state(settings.step_settings(), dim, key), device), 0
    else:
      state, step = restored
      log(f"restored the latent DDIM at step {step} from {directory}")
    writer.truncate_after(step)
    if step < settings.num_steps:
      log(f"training the latent DDIM ({settings.num_layers} x {settings.hidden_units}) on "
          f"{num_codes} codes of size {dim}, steps {step} -> {settings.num_steps}")
    while step < settings.num_steps:
      chunk = min(settings.log_every, settings.num_steps - step,
                  settings.checkpoint_every - step % settings.checkpoint_every)
      tick = time.time()
      state, metrics = train_steps(settings.step_settings(), state, u_train, chunk)
      loss = float(metrics["loss"])
      if not math.isfinite(loss):
        raise FloatingPointError(f"latent DDIM loss is {loss} at step {step + chunk}")
      step += chunk
      trained += chunk
      writer.write(step, {"loss": loss, "grad_norm_net": metrics["grad_norm_net"],
                          "steps_per_second": chunk / max(time.time() - tick, 1e-9)})
      if step % settings.checkpoint_every == 0 or step == settings.num_steps:
        checkpointer.save(step, state)
    checkpointer.wait()
  writer.close()
  seconds = time.time() - start
  if trained:
    log(f"latent DDIM: {trained} steps in {seconds:.1f} s, final loss {loss:.4f}")
    _write_json(os.path.join(directory, TRAINING_FILE),
                {"settings": settings.to_dict(), "step": step, "num_codes": num_codes,
                 "dim": dim, "final_loss": loss, "seconds_last_run": seconds})
  elif loss is None and os.path.exists(os.path.join(directory, TRAINING_FILE)):
    with open(os.path.join(directory, TRAINING_FILE), encoding="utf-8") as f:
      loss = json.load(f).get("final_loss")
  return TrainedLatentDDIM(settings=settings, params=state.params["ema"], stats=stats, dim=dim,
                           step=int(step), trained_steps=trained, final_loss=loss,
                           directory=directory)


def nearest_distances(queries: np.ndarray, reference: np.ndarray,
                      exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(distance, index) of the nearest reference row of every query row (Euclidean);
  `exclude_self` skips the same index (queries = reference: leave-one-out)."""
  queries, reference = (np.asarray(a, np.float64) for a in (queries, reference))
  if queries.ndim != 2 or reference.ndim != 2 or queries.shape[1] != reference.shape[1]:
    raise ValueError(f"need (M, D) queries and (N, D) reference rows, got {queries.shape} and "
                     f"{reference.shape}")
  if len(reference) < (2 if exclude_self else 1):
    raise ValueError(f"{len(reference)} reference rows are too few")
  d2 = (np.sum(queries ** 2, 1)[:, None] + np.sum(reference ** 2, 1)[None]
        - 2.0 * queries @ reference.T)
  if exclude_self:
    np.fill_diagonal(d2, np.inf)
  index = np.argmin(d2, axis=1)
  return np.sqrt(np.maximum(d2[np.arange(len(d2)), index], 0.0)), index
