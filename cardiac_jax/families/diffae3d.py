"""Pure train and eval steps of the 3D diffusion autoencoder (`config.model.family = "diffae3d"`).

Model: `cardiac_jax.models.diffae3d` (semantic encoder Enc and conditional UNet eps_theta);
diffusion: `cardiac_jax.diffusion` (linear betas, T = config.diffusion.num_timesteps). Input:
the cine batch field of config.data.view ("la_4ch" -> "la_image", "sa_mid" -> "sa_mid_image"),
x_0 of shape (B, T, S, S, 1) in [-1, 1]; horizontal flips (data.augment.flip_prob) are done by
the cine input pipeline.

Objective (Preechakul et al. 2022, eps-prediction DDPM loss with the semantic code as a
condition), per batch of B volumes:
  t_b ~ U{0, ..., T-1},  eps_b ~ N(0, I),  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,
  L = mean_b lambda_{t_b} mean_voxels (eps_b - eps_theta(x_t, t_b, Enc(x_0)))^2,
with lambda = 1 (the reference) or the P2 weights 1 / (k + SNR_t)^gamma
(config.diffusion.p2_gamma, p2_k; `diffusion.p2_weights`); the training metrics report L as
"loss" and the unweighted mean as "eps_loss". The encoder is trained only through L, jointly
with the UNet, by one Adam optimizer over both (config.optimizer: Adam 1e-4, global
gradient-norm clipping at grad_clip_norm = 1). After each
update the exponential moving average of the parameters moves by
  ema <- d ema + (1 - d) params,  d = config.model.ema_decay (0.9999 in the reference),
starting from the initial parameters.

State: TrainState.params = {"encoder", "unet", "ema": {"encoder", "unet"}}; gradients and the
optimizer state (opt_state["model"], of `optax.flatten`: the moments of all trained parameters
as one vector) cover "encoder" and "unet" only, so the EMA is carried and checkpointed with the
rest of the state without ever being differentiated.

Inference (`encode`, `invert`, `decode`, `reconstruct`, evaluation and figures) uses the EMA
parameters unless told otherwise: z_sem = Enc(x_0) (deterministic); x_T = DDIM inversion of x_0
under z_sem and x_0' = DDIM decoding of x_T, with the step counts of config.eval (20 + 20 in
the reference).

Evaluation (`eval_step`, per example, EMA parameters unless eval.use_ema is False):
- eps_loss_t<t>: the loss above at each fixed timestep of config.eval.loss_timesteps with a
  fixed noise draw, and eps_loss, their mean;
- ssim, nrmse, psnr of the reconstruction x_0' against x_0, both mapped to [0, 1] by
  (x + 1) / 2: SSIM of the whole (T, S, S) volume (`metrics.reconstruction.ssim3d`, Gaussian
  window of 11 taps, sigma 1.5, along every axis that is long enough, else the largest odd
  length that fits), NRMSE = ||x - x'||_2 / ||x||_2 (scikit-image's "euclidean"
  normalisation, as the reference), PSNR = 10 log10(1 / MSE) (data range 1);
- z_sem (kept over the split): `finalize_eval` reports z_sem_std, the mean over dimensions of
  the across-subject standard deviation of the code (near 0 when the encoder ignores x_0).

Per-replica execution (pmap, `axis_name` set): every replica draws the global batch's
timesteps and noise from the shared key and keeps its rows, gradients and metrics are
averaged over the replicas before the update, so the update equals the jit one, except for the
dropout masks of the UNet, which each replica draws from the step key folded with its index
(the same distribution, not the same numbers; identical with model.dropout = 0).
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cardiac_jax import config_checks, diffusion, io, training
from cardiac_jax.families.base import FamilyBase
from cardiac_jax.metrics import reconstruction as recon_metrics
from cardiac_jax.models import diffae3d as model_lib
from cardiac_jax.train_state import (TrainState, finish_step, make_optimizer, optimizer_step,
                                     replica_rows)

PARTS = ("encoder", "unet")
# config.data.view -> the batch field holding its (B, T, S, S, 1) cine in [-1, 1].
VIEW_FIELDS = {"la_4ch": "la_image", "sa_mid": "sa_mid_image"}
SSIM_WINDOW = 11
Metrics = dict[str, jax.Array]


def to_unit_range(x: jax.Array) -> jax.Array:
  """[-1, 1] -> [0, 1]: (x + 1) / 2, in float32."""
  return (x.astype(jnp.float32) + 1.0) / 2.0


def ssim_window(length: int, window: int = SSIM_WINDOW) -> int:
  """`window` taps, or the largest odd number of taps <= `length` on a shorter axis."""
  size = min(window, length)
  return size if size % 2 else size - 1


def volume_metrics(x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
  """SSIM, NRMSE and PSNR per example of two (B, T, H, W, C) volumes in [0, 1] (module
  docstring); each (B,)."""
  axes = tuple(range(1, x.ndim))
  x, y = x.astype(jnp.float32), y.astype(jnp.float32)
  sq_err = jnp.sum(jnp.square(x - y), axis=axes)
  nrmse = jnp.sqrt(sq_err) / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=axes), 1e-12))
  mse = sq_err / np.prod(x.shape[1:])
  sizes = tuple(ssim_window(n) for n in x.shape[1:4])
  ssim = recon_metrics.ssim3d(x, y, data_range=1.0, filter_size=sizes).mean(axis=-1)
  return {"ssim": ssim, "nrmse": nrmse, "psnr": 10.0 * jnp.log10(1.0 / mse)}


class DiffAEFamily(FamilyBase):
  """Model family "diffae3d" (`base.ModelFamily`), plus `encode`, `invert`, `decode`,
  `reconstruct` and `evaluate_run` for analyses of trained runs."""

  eval_keep_keys = ("z_sem",)

  def __init__(self, config, axis_name: str | None = None):
    self.config = config
    self.axis_name = axis_name
    data, model, dcfg, ecfg = config.data, config.model, config.diffusion, config.eval
    view = data.view
    if view not in VIEW_FIELDS:
      raise ValueError(f"data.view must be one of {tuple(VIEW_FIELDS)}, got {view!r}")
    self.field = VIEW_FIELDS[view]
    self.batch_fields = (self.field,)  # The only cine array field it reads.
    self.num_frames = int(data.num_frames)
    self.image_size = int(data.image_size)
    self.z_sem_dim = int(model.z_sem_dim)
    if model.conv_impl not in model_lib.CONV_IMPLS:
      raise ValueError(f"model.conv_impl must be one of {model_lib.CONV_IMPLS} for the 3D "
                       f"convolutions of diffae3d, got {model.conv_impl!r}")
    if model.remat not in model_lib.REMAT_MODES:
      raise ValueError(f"model.remat must be one of {model_lib.REMAT_MODES}, got "
                       f"{model.remat!r}")
    dtype = jnp.dtype(model.compute_dtype)
    common = dict(image_size=self.image_size, base_channels=int(model.base_channels),
                  num_heads=int(model.num_heads),
                  attention_block_size=int(model.attention_block_size), dtype=dtype,
                  remat=model.remat, conv_impl=model.conv_impl)
    self.model = model_lib.DiffAE3D(
        unet=model_lib.ConditionalUNet(
            channel_mult=tuple(int(m) for m in model.channel_mult),
            num_res_blocks=int(model.num_res_blocks),
            attention_resolutions=tuple(int(r) for r in model.attention_resolutions),
            out_channels=1, time_embed_dim=int(model.time_embed_dim),
            dropout=float(model.dropout), **common),
        encoder=model_lib.SemanticEncoder(
            channel_mult=tuple(int(m) for m in model.encoder_channel_mult),
            num_res_blocks=int(model.encoder_num_res_blocks),
            attention_resolutions=tuple(int(r) for r in model.encoder_attention_resolutions),
            z_sem_dim=self.z_sem_dim, head=str(model.get("encoder_head", "pool")), **common))
    self._check_sizes(model)
    self.ema_decay = float(model.ema_decay)
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"model.ema_decay must be in [0, 1), got {self.ema_decay}")
    self.num_timesteps = int(dcfg.num_timesteps)
    self.beta_start, self.beta_end = float(dcfg.beta_start), float(dcfg.beta_end)
    self.schedule = diffusion.linear_schedule(self.num_timesteps, self.beta_start,
                                              self.beta_end)
    # Training loss weight of each timestep (P2; all ones by default).
    p2_gamma, p2_k = float(dcfg.get("p2_gamma", 0.0)), float(dcfg.get("p2_k", 1.0))
    if p2_gamma < 0.0 or (p2_gamma > 0.0 and p2_k <= 0.0):
      raise ValueError(f"diffusion.p2_gamma must be >= 0 and diffusion.p2_k > 0, got "
                       f"{p2_gamma} and {p2_k}")
    self.loss_weights = diffusion.p2_weights(self.schedule, p2_gamma, p2_k)
    self.inversion_steps = int(ecfg.inversion_steps)
    self.decode_steps = int(ecfg.decode_steps)
    # Runs saved before the field existed were evaluated on the "even" grid.
    self.ddim_grid = str(ecfg.get("ddim_grid", "even"))
    self.check_ddim_steps(self.inversion_steps, self.decode_steps, self.ddim_grid)
    self.loss_timesteps = tuple(int(t) for t in ecfg.loss_timesteps)
    if not self.loss_timesteps or any(not 0 <= t < self.num_timesteps
                                      for t in self.loss_timesteps):
      raise ValueError(f"eval.loss_timesteps {self.loss_timesteps} must be a non-empty list of "
                       f"timesteps in [0, {self.num_timesteps})")
    self.eval_use_ema = bool(ecfg.use_ema)
    self.eval_metric_keys = (("eps_loss",) + tuple(f"eps_loss_t{t}" for t in self.loss_timesteps)
                             + ("eps_loss_other_z", "ssim", "nrmse", "psnr"))
    # One flat vector for the optimizer: the same update (clipping uses the global norm
    # either way), one fused kernel per step instead of one per parameter array, which XLA:CPU
    # also compiles in less than half the time.
    self.tx = optax.flatten(make_optimizer(config.optimizer))
    self.skip_nonfinite = bool(config.train.skip_nonfinite)

  def _check_sizes(self, model) -> None:
    """Clear errors for sizes the networks cannot take, before anything is traced."""
    for mult_field, resolution_field in (("channel_mult", "attention_resolutions"),
                                         ("encoder_channel_mult",
                                          "encoder_attention_resolutions")):
      mults = tuple(model[mult_field])
      if not mults:
        raise ValueError(f"model.{mult_field} must be non-empty")
      sizes = model_lib.level_sizes(self.image_size, len(mults), f"model.{mult_field}")
      model_lib.check_attention_resolutions(model[resolution_field], sizes,
                                            f"model.{resolution_field}")

  # ---------------------------------------------------------------------------- batches
  def model_input(self, batch: dict[str, jax.Array]) -> jax.Array:
    """The configured cine field as float32 (B, T, S, S, 1), checked against the config."""
    if self.field not in batch:
      raise ValueError(f"the batch has no field {self.field!r} (data.view="
                       f"{self.config.data.view!r}); fields: {sorted(batch)}")
    x = batch[self.field]
    expected = (self.num_frames, self.image_size, self.image_size, 1)
    if tuple(x.shape[1:]) != expected:
      raise ValueError(f"batch field {self.field!r} has shape {tuple(x.shape)}; the config "
                       f"expects (B, {', '.join(map(str, expected))}) (data.num_frames, "
                       "data.image_size, one channel)")
    return x.astype(jnp.float32)

  # ---------------------------------------------------------------------------- application
  @staticmethod
  def trainable(params) -> dict[str, Any]:
    """The differentiated parameters {"encoder", "unet"} of a state's params."""
    return {part: params[part] for part in PARTS}

  def inference_params(self, state: TrainState, ema: bool = True) -> dict[str, Any]:
    """{"encoder", "unet"}: the EMA parameters, or the trained ones with ema=False."""
    return state.params["ema"] if ema else self.trainable(state.params)

  def apply_encoder(self, encoder_params, x0: jax.Array) -> jax.Array:
    """(B, T, S, S, 1) -> (B, z_sem_dim) with the given encoder parameters."""
    return self.model.apply({"params": {"encoder": encoder_params}}, x0,
                            method=model_lib.DiffAE3D.encode)

  def apply_unet(self, unet_params, x_t: jax.Array, t: jax.Array, z_sem: jax.Array,
                 dropout_key: jax.Array | None = None) -> jax.Array:
    """eps_hat (B, T, S, S, 1) float32; dropout active when `dropout_key` is given."""
    train = dropout_key is not None
    return self.model.apply({"params": {"unet": unet_params}}, x_t, t, z_sem, train,
                            method=model_lib.DiffAE3D.eps,
                            rngs={"dropout": dropout_key} if train else None)

  def eps_fn(self, x_t: jax.Array, t: jax.Array, cond) -> jax.Array:
    """The sampler interface of `cardiac_jax.diffusion`: cond = (unet params, z_sem)."""
    unet_params, z_sem = cond
    return self.apply_unet(unet_params, x_t, t, z_sem)

  # ---------------------------------------------------------------------------- state
  def init_state(self, key: jax.Array) -> TrainState:
    """Fresh state: parameters from fold_in(key, 0), the EMA equal to them."""
    x = jnp.zeros((1, self.num_frames, self.image_size, self.image_size, 1), jnp.float32)
    variables = self.model.init(jax.random.fold_in(key, 0), x, x, jnp.zeros((1,), jnp.int32))
    trainable = self.trainable(variables["params"])
    # A copy, not the same arrays: the train step donates the state buffers.
    ema = jax.tree.map(jnp.copy, trainable)
    return TrainState(step=jnp.zeros((), jnp.int32), params={**trainable, "ema": ema},
                      batch_stats={part: {} for part in PARTS},
                      opt_state={"model": self.tx.init(trainable)}, rng=key,
                      skipped_nonfinite=jnp.zeros((), jnp.int32))

  # ---------------------------------------------------------------------------- inference
  def check_ddim_steps(self, inversion_steps: int, decode_steps: int, grid: str) -> None:
    """Raises ConfigError (a one-line user error) naming the setting when a step count has no
    grid of kind `grid`."""
    for name, count in (("inversion_steps", inversion_steps), ("decode_steps", decode_steps)):
      try:
        diffusion.ddim_timesteps(self.num_timesteps, int(count), grid)
      except ValueError as e:
        raise config_checks.ConfigError(f"eval.{name} = {count} on the {grid!r} DDIM grid of "
                         f"diffusion.num_timesteps = {self.num_timesteps}: {e}") from None

  def with_ddim(self, inversion_steps: int | None = None, decode_steps: int | None = None,
                grid: str | None = None) -> "DiffAEFamily":
    """A copy of the family whose evaluation uses these DDIM settings (None: this family's);
    ConfigError naming the setting when a count is out of range or has no such grid."""
    for name, value in (("inversion_steps", inversion_steps), ("decode_steps", decode_steps)):
      if value is not None and not 1 <= int(value) <= self.num_timesteps:
        raise config_checks.ConfigError(
            f"--{name} must be in [1, {self.num_timesteps}], got {value}")
    family = copy.copy(self)
    family.inversion_steps = int(inversion_steps or self.inversion_steps)
    family.decode_steps = int(decode_steps or self.decode_steps)
    family.ddim_grid = grid or self.ddim_grid
    family.check_ddim_steps(family.inversion_steps, family.decode_steps, family.ddim_grid)
    return family

  def evaluate_run(self, state, mesh, split_batches, out_dir, options, header) -> dict:
    """Each subject's cine encoded to z_sem, inverted to x_T with options.inversion_steps DDIM
    steps and decoded with options.decode_steps (default: config.eval): metrics.json holds
    SSIM, NRMSE and PSNR of the reconstructions (`eval_step`), the eps losses with the
    subject's own and another subject's z_sem, z_sem_std, the step counts and their grid;
    out_dir/reconstructions_<step>.png shows two subjects (`save_figures`)."""
    family = self.with_ddim(options.inversion_steps, options.decode_steps, options.ddim_grid)
    ddim = f"ddim{family.inversion_steps}x{family.decode_steps}_{family.ddim_grid}"
    cache_dir = os.path.join(out_dir, f"partial_{header['split']}_step{int(state.step)}_{ddim}")
    metrics, outputs = training.evaluate(family, state, split_batches(None), mesh,
                                         cache_dir=cache_dir, keep=("subject",))
    grids = {name: diffusion.ddim_timesteps(family.num_timesteps, steps,
                                            family.ddim_grid).tolist()
             for name, steps in (("inversion", family.inversion_steps),
                                 ("decoding", family.decode_steps))}
    result = {**header, "num_subjects": int(len(outputs["subject"])),
              "inversion_steps": family.inversion_steps, "decode_steps": family.decode_steps,
              "ddim_grid": family.ddim_grid, "ddim_timesteps": grids,
              "ema": family.eval_use_ema,
              "reconstruction": {k: metrics[k] for k in ("ssim", "nrmse", "psnr")},
              "eps_loss": {k: v for k, v in metrics.items() if k.startswith("eps_loss")},
              "z_sem_std": metrics.get("z_sem_std")}
    first = next(iter(split_batches(2)))
    family.save_figures(state, {family.field: first[family.field]}, out_dir, int(state.step),
                        jax.random.key(self.config.seed))
    io.write_json(os.path.join(out_dir, "metrics.json"), result)
    shutil.rmtree(cache_dir, ignore_errors=True)
    return result

  def evaluation_summary(self, result: dict) -> str:
    rec = result["reconstruction"]
    return (f"{result['config']} step {result['step']} on {result['num_subjects']} "
            f"{result['split']} subjects ({result['inversion_steps']} inversion + "
            f"{result['decode_steps']} decoding steps, {result['ddim_grid']} grid): "
            f"SSIM {rec['ssim']:.4f}  PSNR {rec['psnr']:.2f} dB  NRMSE {rec['nrmse']:.4f}")

  def encode(self, state: TrainState, x0: jax.Array, ema: bool = True) -> jax.Array:
    """(B, T, S, S, 1) in [-1, 1] -> z_sem (B, z_sem_dim), deterministic."""
    return self.apply_encoder(self.inference_params(state, ema)["encoder"], x0)

  def invert(self, state: TrainState, x0: jax.Array, z_sem: jax.Array, num_steps: int,
             ema: bool = True) -> jax.Array:
    """DDIM inversion x_0 -> x_T (B, T, S, S, 1) under z_sem with `num_steps` steps."""
    schedule = diffusion.ddim_schedule(self.num_timesteps, int(num_steps), self.beta_start,
                                       self.beta_end, self.ddim_grid)
    cond = (self.inference_params(state, ema)["unet"], z_sem)
    return diffusion.ddim_invert(self.eps_fn, x0.astype(jnp.float32), cond, schedule)

  def decode(self, state: TrainState, x_T: jax.Array, z_sem: jax.Array, num_steps: int,
             ema: bool = True) -> jax.Array:
    """DDIM decoding x_T -> x_0 (B, T, S, S, 1) in [-1, 1] under z_sem with `num_steps`
    steps (x_T ~ N(0, I) samples new cines with the semantics of z_sem)."""
    schedule = diffusion.ddim_schedule(self.num_timesteps, int(num_steps), self.beta_start,
                                       self.beta_end, self.ddim_grid)
    cond = (self.inference_params(state, ema)["unet"], z_sem)
    return diffusion.ddim_decode(self.eps_fn, x_T.astype(jnp.float32), cond, schedule)

  def reconstruct(self, state: TrainState, x0: jax.Array, inversion_steps: int | None = None,
                  decode_steps: int | None = None,
                  ema: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(reconstruction x_0', z_sem, x_T): encode, invert, decode (config.eval step counts by
    default)."""
    z_sem = self.encode(state, x0, ema)
    x_T = self.invert(state, x0, z_sem, inversion_steps or self.inversion_steps, ema)
    return self.decode(state, x_T, z_sem, decode_steps or self.decode_steps, ema), z_sem, x_T

  # ---------------------------------------------------------------------------- training
  def loss_terms(self, trainable, x0: jax.Array, t: jax.Array, noise: jax.Array,
                 dropout_key: jax.Array | None = None) -> dict[str, jax.Array]:
    """{"eps_loss": (B,), "z_sem": (B, Z), "eps_hat"} for given timesteps and noise."""
    z_sem = self.apply_encoder(trainable["encoder"], x0)
    x_t = diffusion.q_sample(self.schedule, x0, t, noise)
    eps_hat = self.apply_unet(trainable["unet"], x_t, t, z_sem, dropout_key)
    return {"eps_loss": diffusion.eps_loss_per_example(noise, eps_hat), "z_sem": z_sem,
            "eps_hat": eps_hat}

  def sample_step_noise(self, key: jax.Array, shape) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(t (B,) int32, eps (B, T, S, S, 1), dropout key) of one step for this replica."""
    k_t, k_eps, k_drop = jax.random.split(key, 3)
    t = replica_rows(lambda s: jax.random.randint(k_t, s, 0, self.num_timesteps),
                     (shape[0],), self.axis_name)
    noise = replica_rows(lambda s: model_lib.flat_normal(k_eps, s), tuple(shape), self.axis_name)
    if self.axis_name is not None:
      k_drop = jax.random.fold_in(k_drop, jax.lax.axis_index(self.axis_name))
    return t, noise, k_drop

  def ema_update(self, ema, params):
    """ema <- d ema + (1 - d) params, leafwise."""
    d = self.ema_decay
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)

  def train_step(self, state: TrainState, batch: dict[str, jax.Array],
                 key: jax.Array) -> tuple[TrainState, Metrics]:
    """One Adam update of encoder and UNet on the eps loss, then the EMA (module docstring)."""
    x0 = self.model_input(batch)
    t, noise, dropout_key = self.sample_step_noise(key, x0.shape)

    def loss_fn(trainable):
      terms = self.loss_terms(trainable, x0, t, noise, dropout_key)
      loss = jnp.mean(self.loss_weights[t] * terms["eps_loss"])
      metrics = {"loss": loss, "eps_loss": jnp.mean(terms["eps_loss"]),
                 "z_sem_rms": jnp.sqrt(jnp.mean(jnp.square(terms["z_sem"]))),
                 "t_mean": jnp.mean(t.astype(jnp.float32))}
      return loss, metrics

    trainable = self.trainable(state.params)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(trainable)
    new_trainable, opt_state, grads = optimizer_step(self.tx, grads, state.opt_state["model"],
                                                     trainable, self.axis_name)
    ema = self.ema_update(state.params["ema"], new_trainable)
    new_state = state.replace(params={**new_trainable, "ema": ema},
                              opt_state={"model": opt_state})
    return finish_step(state, new_state, grads, metrics, skip_nonfinite=self.skip_nonfinite,
                       axis_name=self.axis_name)


  # ---------------------------------------------------------------------------- evaluation
  def eval_step(self, state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-example eps losses at the fixed timesteps, the same losses with the z_sem of the
    batch's next example ("eps_loss_other_z": equal to eps_loss when the UNet ignores the
    semantic code, larger when it relies on it), reconstruction metrics and z_sem."""
    x0 = self.model_input(batch)
    params = self.inference_params(state, self.eval_use_ema)
    z_sem = self.apply_encoder(params["encoder"], x0)
    out: dict[str, jax.Array] = {"z_sem": z_sem}
    base = jax.random.key(0)
    # The next example's code (cyclically): how much the UNet relies on the subject's z_sem.
    z_other = jnp.roll(z_sem, 1, axis=0)
    losses, losses_other = [], []
    for i, timestep in enumerate(self.loss_timesteps):
      noise = model_lib.flat_normal(jax.random.fold_in(base, i), x0.shape)
      t = jnp.full((x0.shape[0],), timestep, jnp.int32)
      x_t = diffusion.q_sample(self.schedule, x0, t, noise)
      eps_hat = self.apply_unet(params["unet"], x_t, t, z_sem)
      out[f"eps_loss_t{timestep}"] = diffusion.eps_loss_per_example(noise, eps_hat)
      losses.append(out[f"eps_loss_t{timestep}"])
      losses_other.append(diffusion.eps_loss_per_example(
          noise, self.apply_unet(params["unet"], x_t, t, z_other)))
    out["eps_loss"] = jnp.mean(jnp.stack(losses), axis=0)
    out["eps_loss_other_z"] = jnp.mean(jnp.stack(losses_other), axis=0)
    cond = (params["unet"], z_sem)
    inversion = diffusion.ddim_schedule(self.num_timesteps, self.inversion_steps,
                                        self.beta_start, self.beta_end, self.ddim_grid)
    decoding = diffusion.ddim_schedule(self.num_timesteps, self.decode_steps,
                                       self.beta_start, self.beta_end, self.ddim_grid)
    x_T = diffusion.ddim_invert(self.eps_fn, x0, cond, inversion)
    recon = diffusion.ddim_decode(self.eps_fn, x_T, cond, decoding)
    out.update(volume_metrics(to_unit_range(x0), to_unit_range(recon)))
    return out

  def finalize_eval(self, outputs: dict[str, np.ndarray]) -> dict[str, float]:
    """z_sem_std: mean over dimensions of the across-subject std of z_sem (>= 2 subjects)."""
    z = np.asarray(outputs.get("z_sem", np.zeros((0, self.z_sem_dim))), np.float64)
    if len(z) < 2:
      return {}
    return {"z_sem_std": float(z.std(axis=0).mean())}

  def save_figures(self, state: TrainState, examples: dict[str, np.ndarray], figures_dir: str,
                   step: int, key: jax.Array) -> None:
    """For the first two subjects, at up to 8 evenly spaced frames: the input, its EMA
    reconstruction (inversion + decoding) and a decoding of random x_T ~ N(0, I) with the
    subject's z_sem (what the semantic code alone fixes), all on [0, 1]."""
    from cardiac_jax import viz  # pylint: disable=g-import-not-at-top (matplotlib on demand)
    x0 = jnp.asarray(np.asarray(examples[self.field])[:2], jnp.float32)
    recon, z_sem, _ = jax.jit(self.reconstruct)(state, x0)
    x_T = model_lib.flat_normal(key, x0.shape)
    decode = jax.jit(functools.partial(self.decode, num_steps=self.decode_steps))
    sample = decode(state, x_T, z_sem)
    x0, recon, sample = (np.asarray(to_unit_range(a)) for a in (x0, recon, sample))
    frames = np.unique(np.linspace(0, self.num_frames - 1, min(8, self.num_frames)).astype(int))
    rows, titles = [], []
    for i in range(x0.shape[0]):
      for name, volume in (("input", x0), ("recon", recon), ("random x_T", sample)):
        rows.append([volume[i, t, :, :, 0] for t in frames])
        titles.append(f"subject {i} {name}")
    viz.save_image_grid(os.path.join(figures_dir, f"reconstructions_{step:07d}.png"), rows,
                        row_titles=titles, col_titles=[f"t={t}" for t in frames], vmin=0.0,
                        vmax=1.0, title=f"step {step}")
