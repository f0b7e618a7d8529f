"""Pure train and eval steps of the DCGAN family (`config.model.family = "dcgan"`).

One train step (Radford et al. 2016, with the settings of Schoen et al. 2022): with z ~ N(0, I)
and real labels y ~ U[low, high) (one-sided label smoothing, Salimans et al. 2016; default
U[0.9, 1.0)),
  1. discriminator update (generator frozen), binary cross-entropy on logits:
       L_D = mean_i BCE(D(x_i), y_i) + mean_i BCE(D(G(z_i)), 0);
  2. generator update against the updated discriminator, the non-saturating loss
       L_G = mean_i BCE(D(G(z_i)), 1) = mean_i softplus(-D(G(z_i))),
     on the same z as step 1.
Each part has its own Adam optimizer (config.optimizer: 2e-4, betas (0.5, 0.999) in the paper).
The discriminator sees images in the generator's output range: data in [0, 1] are mapped to
[-1, 1] when the generator ends in tanh.

BatchNorm: both networks run in training mode (batch statistics) during the update. The
discriminator keeps the running statistics of its pass over real images, the generator those of
its pass in the generator update; samples for figures, evaluation and direction discovery use
the running statistics (inference mode), so G is a fixed function of z.

Per-replica execution (pmap, `axis_name` set): every replica draws the global batch's z and
labels from the shared key and keeps its rows, BatchNorm statistics are global, gradients and
scalar metrics are `lax.pmean`ed before the updates, so the update equals the jit one.

Evaluation (`eval_step`, `finalize_eval`): every real example gets one generated partner whose z
is derived from the example's pixels, so the generated set is the same at every evaluation of a
run. Reported: the mean discriminator probabilities on both sets and three distances between the
real and generated sets that need no pretrained network (none exists for cardiac MRI slices):
  intensity_mean_gap, intensity_std_gap: |difference| of the pooled pixel mean / std, which
    catch a wrong tissue contrast or background level at once;
  mmd2_thumbnail: unbiased squared maximum mean discrepancy (Gretton et al., JMLR 2012) with a
    Gaussian kernel (bandwidth: median pairwise distance of the pooled sets) between the images
    average-pooled to `gan.eval_thumbnail_size` pixels; it compares whole distributions of
    shapes (heart position, size, ring structure) and is 0 in expectation for equal
    distributions, and the pooling keeps it meaningful with a few hundred examples.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cardiac_jax import losses
from cardiac_jax.families.base import FamilyBase
from cardiac_jax.models import dcgan as dcgan_lib
from cardiac_jax.train_state import (TrainState, finish_step, make_optimizer, optimizer_step,
                                     replica_rows)

PARTS = ("generator", "discriminator")
Metrics = dict[str, jax.Array]


# --------------------------------------------------------------------------------- losses
def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array,
                       real_labels: jax.Array) -> jax.Array:
  """L_D = mean BCE(real_logits, real_labels) + mean BCE(fake_logits, 0); logits (B,)."""
  bce = losses.binary_cross_entropy_with_logits
  return (jnp.mean(bce(real_logits, real_labels))
          + jnp.mean(bce(fake_logits, jnp.zeros_like(fake_logits))))


def generator_loss(fake_logits: jax.Array) -> jax.Array:
  """Non-saturating L_G = mean BCE(fake_logits, 1) = mean softplus(-fake_logits)."""
  return jnp.mean(jax.nn.softplus(-fake_logits))


def smoothed_real_labels(key: jax.Array, shape, low: float, high: float) -> jax.Array:
  """Real-image targets ~ U[low, high) (one-sided label smoothing)."""
  return jax.random.uniform(key, shape, jnp.float32, low, high)


# ------------------------------------------------------------------------- set distances
def gaussian_mmd2(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 between samples x (N, F) and y (M, F), Gaussian kernel whose bandwidth is
  the median pairwise distance of the pooled samples. Needs N, M >= 2."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if len(x) < 2 or len(y) < 2:
    raise ValueError(f"MMD needs at least 2 samples per set, got {len(x)} and {len(y)}")
  pooled = np.concatenate([x, y])
  sq = np.sum(pooled ** 2, axis=1)
  d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * pooled @ pooled.T, 0.0)
  off_diagonal = d2[~np.eye(len(pooled), dtype=bool)]
  bandwidth2 = np.median(off_diagonal) if np.any(off_diagonal > 0) else 1.0
  k = np.exp(-d2 / (2.0 * bandwidth2))
  n = len(x)
  kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
  m = len(y)
  return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1))
               + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2.0 * kxy.mean())


def _pooled_std(moments: np.ndarray) -> tuple[float, float]:
  """Pooled pixel mean and std from per-example (mean, mean of squares) rows (N, 2)."""
  mean = float(moments[:, 0].mean())
  return mean, float(np.sqrt(max(moments[:, 1].mean() - mean ** 2, 0.0)))


def _thumbnail(x: jax.Array, size: int) -> jax.Array:
  """(B, S, S, C) -> (B, size * size * C) by average pooling (S divisible by size)."""
  b, s, _, c = x.shape
  if s % size:
    raise ValueError(f"gan.eval_thumbnail_size {size} must divide data.image_size {s}")
  f = s // size
  return x.reshape(b, size, f, size, f, c).mean(axis=(2, 4)).reshape(b, -1)


class DCGANFamily(FamilyBase):
  """The DCGAN family for one config: model, optimizers and pure steps (`base.ModelFamily`),
  plus `generate` (z -> images in [0, 1]) and the generator hooks of direction discovery."""

  eval_metric_keys = ("d_real", "d_fake")
  eval_keep_keys = ("real_moments", "fake_moments", "real_thumbnail", "fake_thumbnail")

  def __init__(self, config, axis_name: str | None = None):
    model_config = config.model
    self.config = config
    self.axis_name = axis_name
    self.image_size = int(config.data.image_size)
    self.image_channels = len(config.data.channels)
    self.latent_dim = int(model_config.latent_dim)
    self.output_activation = model_config.output_activation
    if self.output_activation not in dcgan_lib.OUTPUT_ACTIVATIONS:
      raise ValueError(f"model.output_activation {self.output_activation!r} is not one of "
                       f"{dcgan_lib.OUTPUT_ACTIVATIONS} for the dcgan family")
    self.model = dcgan_lib.DCGAN(
        channels=tuple(model_config.channels), latent_dim=self.latent_dim,
        image_size=self.image_size, image_channels=self.image_channels,
        output_activation=self.output_activation, conv_impl=model_config.conv_impl,
        dtype=jnp.dtype(model_config.compute_dtype), bn_axis_name=axis_name)
    dcgan_lib.bottleneck_size(self.image_size, len(model_config.channels))
    self.tx = {part: make_optimizer(config.optimizer) for part in PARTS}
    self.skip_nonfinite = bool(config.train.skip_nonfinite)
    gan = config.gan
    self.real_label_low, self.real_label_high = float(gan.real_label_low), float(
        gan.real_label_high)
    if not 0.0 <= self.real_label_low < self.real_label_high <= 1.0:
      raise ValueError(f"gan.real_label_low {self.real_label_low} and gan.real_label_high "
                       f"{self.real_label_high} must satisfy 0 <= low < high <= 1")
    self.thumbnail_size = int(gan.eval_thumbnail_size)
    if self.image_size % self.thumbnail_size:
      raise ValueError(f"gan.eval_thumbnail_size {self.thumbnail_size} must divide "
                       f"data.image_size {self.image_size}")

  # ------------------------------------------------------------------ model application
  def _apply(self, part: str, params, batch_stats, inputs, train: bool,
             update_stats: bool = False):
    variables = {"params": {part: params[part]}, "batch_stats": {part: batch_stats[part]}}
    method = "generate" if part == "generator" else "discriminate"
    fn = lambda module, inp: getattr(module, method)(inp, train)
    if not train:
      return self.model.apply(variables, inputs, method=fn)
    out, updates = self.model.apply(variables, inputs, method=fn, mutable=["batch_stats"])
    return (out, updates["batch_stats"][part]) if update_stats else out

  def to_model_range(self, images: jax.Array) -> jax.Array:
    """Data-range [0, 1] images -> the generator's output range."""
    return 2.0 * images - 1.0 if self.output_activation == "tanh" else images

  def to_data_range(self, images: jax.Array) -> jax.Array:
    return 0.5 * (images + 1.0) if self.output_activation == "tanh" else images

  # ------------------------------------------------------------------------------ state
  def init_state(self, key: jax.Array) -> TrainState:
    init_key = jax.random.fold_in(key, 0)
    z = jnp.zeros((1, self.latent_dim), jnp.float32)
    variables = self.model.init(init_key, z, train=False)
    params = dict(variables["params"])
    batch_stats = dict(variables.get("batch_stats", {}))
    for part in PARTS:
      batch_stats.setdefault(part, {})
    opt_state = {part: self.tx[part].init(params[part]) for part in PARTS}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=opt_state, rng=key, skipped_nonfinite=jnp.zeros((), jnp.int32))

  # ------------------------------------------------------------------------ inference
  def generate(self, state: TrainState, z: jax.Array) -> jax.Array:
    """(B, latent_dim) -> (B, S, S, C) images in [0, 1], BatchNorm in inference mode."""
    out = self._apply("generator", state.params, state.batch_stats, z, train=False)
    return self.to_data_range(out)

  def generator(self, state: TrainState):
    return lambda z: self.generate(state, z)

  def discriminate(self, state: TrainState, images: jax.Array) -> jax.Array:
    """(B, S, S, C) images in [0, 1] -> (B,) logits, BatchNorm in inference mode."""
    return self._apply("discriminator", state.params, state.batch_stats,
                       self.to_model_range(images), train=False)

  def first_block_features(self, state: TrainState, z: jax.Array) -> jax.Array:
    """(B, latent_dim) -> (B, F) activations after the generator's first linear map, BatchNorm
    (inference mode) and ReLU: the feature space of GANSpace."""
    variables = {"params": {"generator": state.params["generator"]},
                 "batch_stats": {"generator": state.batch_stats["generator"]}}
    _, inter = self.model.apply(variables, z, method=lambda m, v: m.generate(v, False),
                                mutable=["intermediates"])
    return inter["intermediates"]["generator"]["first_block"][0]

  def first_linear_kernel(self, state: TrainState) -> jax.Array:
    """(latent_dim, F) kernel of the generator's first linear map (features = z @ kernel + b)."""
    return state.params["generator"]["from_latent"]["kernel"]

  def _content_latents(self, images: jax.Array) -> jax.Array:
    """One z per example, a deterministic function of the example's pixels (B, latent_dim)."""
    flat = images.reshape(images.shape[0], -1).astype(jnp.float32)
    weights = jax.random.uniform(jax.random.key(0), (flat.shape[1],), jnp.float32, 0.5, 1.5)
    seeds = jax.lax.bitcast_convert_type(flat @ weights, jnp.uint32)
    base = jax.random.key(int(self.config.seed))
    keys = jax.vmap(lambda s: jax.random.fold_in(base, s))(seeds)
    return jax.vmap(lambda k: jax.random.normal(k, (self.latent_dim,)))(keys)

  def eval_step(self, state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-example: D probabilities of the real example and of its generated partner, pixel
    moments (B, 2) and thumbnails (B, t * t * C) of both (module docstring)."""
    real = batch["image"]
    fake = self.generate(state, self._content_latents(real))
    moments = lambda x: jnp.stack([x.mean(axis=(1, 2, 3)), (x ** 2).mean(axis=(1, 2, 3))], -1)
    return {
        "d_real": jax.nn.sigmoid(self.discriminate(state, real)),
        "d_fake": jax.nn.sigmoid(self.discriminate(state, fake)),
        "real_moments": moments(real), "fake_moments": moments(fake),
        "real_thumbnail": _thumbnail(real, self.thumbnail_size),
        "fake_thumbnail": _thumbnail(fake, self.thumbnail_size),
    }

  def finalize_eval(self, outputs: dict[str, Any]) -> dict[str, float]:
    """Distances between the real and generated sets of a whole split (module docstring)."""
    real_mean, real_std = _pooled_std(np.asarray(outputs["real_moments"]))
    fake_mean, fake_std = _pooled_std(np.asarray(outputs["fake_moments"]))
    metrics = {"intensity_mean_gap": abs(fake_mean - real_mean),
               "intensity_std_gap": abs(fake_std - real_std)}
    if len(outputs["real_thumbnail"]) >= 2:
      metrics["mmd2_thumbnail"] = gaussian_mmd2(outputs["real_thumbnail"],
                                                outputs["fake_thumbnail"])
    return metrics

  def save_figures(self, state: TrainState, examples: dict[str, Any], figures_dir: str,
                   step: int, key: jax.Array) -> None:
    """Samples from the same 16 codes at every call (the loop passes a fixed key), and the
    real examples beside them for comparison."""
    from cardiac_jax import viz  # pylint: disable=g-import-not-at-top (matplotlib on demand)
    z = jax.random.normal(key, (16, self.latent_dim))
    samples = np.asarray(jax.jit(self.generate)(state, z))
    names = [str(c).upper() for c in self.config.data.channels]
    viz.save_samples_figure(os.path.join(figures_dir, f"samples_{step:07d}.png"), samples,
                            channel_names=names, title=f"DCGAN samples, step {step}")
    if step == 0 or not os.path.exists(os.path.join(figures_dir, "real_examples.png")):
      viz.save_samples_figure(os.path.join(figures_dir, "real_examples.png"),
                              np.asarray(examples["image"]), channel_names=names,
                              title="real examples")

  # -------------------------------------------------------------------------- training
  def _update(self, state: TrainState, part: str, grads, params):
    return optimizer_step(self.tx[part], grads, state.opt_state[part], params, self.axis_name)

  def discriminator_loss_fn(self, d_params, state: TrainState, real: jax.Array,
                            fake: jax.Array, real_labels: jax.Array):
    """L_D as a function of the discriminator parameters; real and fake in the model range.
    Returns (loss, (running statistics of the real pass, real logits, fake logits))."""
    params = {**state.params, "discriminator": d_params}
    real_logits, d_stats = self._apply("discriminator", params, state.batch_stats, real, True,
                                       update_stats=True)
    fake_logits = self._apply("discriminator", params, state.batch_stats, fake, True)
    loss = discriminator_loss(real_logits, fake_logits, real_labels)
    return loss, (d_stats, real_logits, fake_logits)

  def generator_loss_fn(self, g_params, state: TrainState, z: jax.Array):
    """L_G as a function of the generator parameters against the discriminator of `state`.
    Returns (loss, (generator running statistics, fake logits))."""
    params = {**state.params, "generator": g_params}
    fake, g_stats = self._apply("generator", params, state.batch_stats, z, True,
                                update_stats=True)
    fake_logits = self._apply("discriminator", params, state.batch_stats, fake, True)
    return generator_loss(fake_logits), (g_stats, fake_logits)

  def discriminator_update(self, state: TrainState, real: jax.Array, z: jax.Array,
                           real_labels: jax.Array) -> tuple[TrainState, Any, Metrics]:
    """Step 1: (state with new discriminator parameters, optimizer state and statistics,
    discriminator gradients, metrics). The generator part of `state` is returned unchanged.
    real: (B, S, S, C) in the model range; z: (B, latent_dim); real_labels: (B,)."""
    fake = jax.lax.stop_gradient(
        self._apply("generator", state.params, state.batch_stats, z, True))
    (loss, (d_stats, real_logits, fake_logits)), grads = jax.value_and_grad(
        self.discriminator_loss_fn, has_aux=True)(state.params["discriminator"], state, real,
                                                  fake, real_labels)
    params, opt_state, grads = self._update(state, "discriminator", grads,
                                            state.params["discriminator"])
    new = state.replace(params={**state.params, "discriminator": params},
                        opt_state={**state.opt_state, "discriminator": opt_state},
                        batch_stats={**state.batch_stats, "discriminator": d_stats})
    metrics = {"d_loss": loss, "d_real": jnp.mean(jax.nn.sigmoid(real_logits)),
               "d_fake": jnp.mean(jax.nn.sigmoid(fake_logits))}
    return new, grads, metrics

  def generator_update(self, state: TrainState,
                       z: jax.Array) -> tuple[TrainState, Any, Metrics]:
    """Step 2: (state with new generator parameters, optimizer state and statistics, generator
    gradients, metrics). The discriminator part of `state` is returned unchanged."""
    (loss, (g_stats, fake_logits)), grads = jax.value_and_grad(
        self.generator_loss_fn, has_aux=True)(state.params["generator"], state, z)
    params, opt_state, grads = self._update(state, "generator", grads,
                                            state.params["generator"])
    new = state.replace(params={**state.params, "generator": params},
                        opt_state={**state.opt_state, "generator": opt_state},
                        batch_stats={**state.batch_stats, "generator": g_stats})
    metrics = {"g_loss": loss, "d_fake_after_d_update": jnp.mean(jax.nn.sigmoid(fake_logits))}
    return new, grads, metrics

  def sample_step_noise(self, key: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
    """(z (rows, latent_dim), smoothed real labels (rows,)) of one step for this replica."""
    k_z, k_labels = jax.random.split(key)
    z = replica_rows(lambda s: jax.random.normal(k_z, s), (rows, self.latent_dim),
                     self.axis_name)
    labels = replica_rows(
        lambda s: smoothed_real_labels(k_labels, s, self.real_label_low, self.real_label_high),
        (rows,), self.axis_name)
    return z, labels

  def train_step(self, state: TrainState, batch: dict[str, jax.Array],
                 key: jax.Array) -> tuple[TrainState, Metrics]:
    """Discriminator update, then generator update on the same z (module docstring)."""
    real = self.to_model_range(batch["image"])
    z, labels = self.sample_step_noise(key, real.shape[0])
    after_d, d_grads, d_metrics = self.discriminator_update(state, real, z, labels)
    after_g, g_grads, g_metrics = self.generator_update(after_d, z)
    metrics = {**d_metrics, **g_metrics, "real_label_mean": jnp.mean(labels)}
    # A monitoring sum (a GAN has no single objective); finite iff both losses are.
    metrics["loss"] = metrics["d_loss"] + metrics["g_loss"]
    grads = {"generator": g_grads, "discriminator": d_grads}
    return finish_step(state, after_g, grads, metrics, skip_nonfinite=self.skip_nonfinite,
                       axis_name=self.axis_name)

