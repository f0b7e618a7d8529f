"""Pure train and eval steps of the temporal VAE-classifier (Clough et al. 2019).

Model: `cardiac_jax.models.temporal_classifier`. Input: the cine batch of
`data_pipelines.cine`, "sa_label" (B, T, S, S, 3) int labels (default, one-hot per slice) or
"sa_image" (B, T, S, S, 3) floats in [0, 1] (config.data.input), and "group" (B,) int32; the
disease target is y = group in config.data.positive_groups.

Objective (Clough et al. eq. 1), for a batch of B sequences of T frames:
  L = mean_{b,t}[ Rec(x_bt, D(z_bt)) + beta KL(q(z_bt | x_bt) || N(0, I)) ] + gamma BCE(y_b, C(M_b))
with z_bt = mu_bt + sigma_bt * eps (decoder, training), M_b = [mu_b1 .. mu_bT] (classifier, always
the means, as in the paper) and
- Rec: per frame, the cross-entropy of the decoder's per-slice class logits against the input
  labels summed over pixels and slices (segmentations), or the squared error summed over pixels
  and slices (images, `losses.reconstruction_per_sample` "mse"): the per-sample-sum convention
  of every reconstruction loss in this project;
- KL: `losses.kl_per_sample` per frame; beta = config.loss.beta_kl (0.2 in the paper);
- BCE: binary cross-entropy of the logit, gamma = config.loss.gamma (1 in the paper).
Two stages: during the first config.train.stage1_steps steps `warmup_train_step` trains the VAE
alone (gamma = 0, classifier parameters and optimizer state untouched); then `train_step`
trains everything jointly. Augmentation (random shifts up to config.data.augment.max_shift_px,
5 px in the paper, one per sequence) is done by the cine input pipeline, not here.

Evaluation (inference uses mu only): per-subject reconstruction loss, KL, BCE, accuracy and Dice
per structure (RV, LV myocardium, LV blood pool over all frames and slices) or MSE for images,
and the AUC of the logits over the whole split (`finalize_eval`, rank-based).

Per-replica execution (pmap, `axis_name` set): gradients and metrics are averaged over the
replicas, BatchNorm uses global statistics, and every replica draws the global batch's noise
and keeps its rows, so the update equals the jit one.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cardiac_jax import losses, structures
from cardiac_jax.families.base import FamilyBase
from cardiac_jax.metrics import classification
from cardiac_jax.models import temporal_classifier as model_lib
from cardiac_jax.train_state import TrainState, finish_step, make_optimizer, replica_rows

PARTS = ("encoder", "decoder", "classifier")
NUM_SLICES = 3
INPUTS = ("sa_label", "sa_image")
# Structures scored by Dice, in this order (val/dice_ch0 .. ch2).
DICE_STRUCTURES = (structures.RV_BLOOD_POOL, structures.LV_MYOCARDIUM, structures.LV_BLOOD_POOL)
Metrics = dict[str, jax.Array]


# ------------------------------------------------------------------------------ pure terms
def one_hot_slices(labels: jax.Array) -> jax.Array:
  """(..., S, S, 3) int labels -> (..., S, S, 3 * NUM_LABELS) float one-hot, slice-major."""
  one_hot = jax.nn.one_hot(labels, structures.NUM_LABELS, dtype=jnp.float32)
  return one_hot.reshape(labels.shape[:-1] + (labels.shape[-1] * structures.NUM_LABELS,))


def label_cross_entropy_per_frame(labels: jax.Array, logits: jax.Array) -> jax.Array:
  """Cross-entropy summed over pixels and slices, per frame.

  Args:
    labels: (B, T, S, S, 3) int labels.
    logits: (B, T, S, S, 3 * NUM_LABELS) decoder outputs (slice-major class logits).
  Returns:
    (B, T).
  """
  logits = logits.reshape(labels.shape + (structures.NUM_LABELS,)).astype(jnp.float32)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_p, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return -jnp.sum(picked, axis=(2, 3, 4))


def image_squared_error_per_frame(images: jax.Array, reconstruction: jax.Array) -> jax.Array:
  """(B, T, S, S, C) images and reconstructions -> (B, T) per-frame summed squared error."""
  b, t = images.shape[:2]
  per_frame = losses.reconstruction_per_sample(
      images.reshape((b * t,) + images.shape[2:]),
      reconstruction.reshape((b * t,) + reconstruction.shape[2:]), "mse")
  return per_frame.reshape(b, t)


def dice_per_structure(labels: jax.Array, predicted: jax.Array) -> jax.Array:
  """(B, ...) true and predicted label maps -> (B, 3) Dice of RV, LV myocardium, LV blood pool
  over all frames and slices of each subject (1 when a structure is absent from both)."""
  axes = tuple(range(1, labels.ndim))
  out = []
  for value in DICE_STRUCTURES:
    a, b = labels == value, predicted == value
    overlap = jnp.sum(a & b, axis=axes).astype(jnp.float32)
    total = (jnp.sum(a, axis=axes) + jnp.sum(b, axis=axes)).astype(jnp.float32)
    out.append(jnp.where(total > 0, 2 * overlap / jnp.maximum(total, 1), 1.0))
  return jnp.stack(out, axis=-1)


class TemporalClassifierFamily(FamilyBase):
  """Model family "temporal_classifier" (`base.ModelFamily`), plus `encode`,
  `decode`, `concepts`, `head` and `logits` for the TCAV analysis."""

  eval_keep_keys = ("logit", "label")

  def __init__(self, config, axis_name: str | None = None):
    self.config = config
    self.axis_name = axis_name
    data, model, loss = config.data, config.model, config.loss
    self.input = data.input
    if self.input not in INPUTS:
      raise ValueError(f"data.input must be one of {INPUTS}, got {self.input!r}")
    # The array fields of a cine batch this family reads (the pipeline skips the others).
    self.batch_fields = (self.input,)
    self.num_frames = int(data.num_frames)
    self.image_size = int(data.image_size)
    self.latent_dim = int(model.latent_dim)
    unknown = sorted(set(data.positive_groups) - set(structures.GROUPS))
    if unknown or not data.positive_groups:
      raise ValueError(f"data.positive_groups {tuple(data.positive_groups)} must be a non-empty "
                       f"subset of {structures.GROUPS}")
    self.positive_groups = tuple(structures.GROUP_INDEX[g] for g in data.positive_groups)
    self.beta = float(loss.beta_kl)
    self.gamma = float(loss.gamma)
    self.stage1_steps = int(config.train.stage1_steps)
    self.warmup_steps = self.stage1_steps
    labels_in = self.input == "sa_label"
    self.in_channels = NUM_SLICES * (structures.NUM_LABELS if labels_in else 1)
    self.model = model_lib.TemporalVAEClassifier(
        channels=tuple(model.channels), latent_dim=self.latent_dim, image_size=self.image_size,
        in_channels=self.in_channels, out_channels=self.in_channels,
        output_activation="none" if labels_in else "sigmoid",
        frame_units=tuple(model.frame_units), sequence_units=tuple(model.sequence_units),
        concept_units=int(model.concept_units), head_units=tuple(model.head_units),
        conv_impl=model.conv_impl, dtype=jnp.dtype(model.compute_dtype),
        bn_axis_name=axis_name, initializer=model.initializer)
    self.tx = {part: make_optimizer(config.optimizer) for part in PARTS}
    self.skip_nonfinite = bool(config.train.skip_nonfinite)
    self.eval_metric_keys = ("reconstruction_loss", "kl", "bce", "accuracy",
                             "dice" if labels_in else "mse")

  # ---------------------------------------------------------------------------- batches
  def raw_input(self, batch: dict[str, jax.Array]) -> jax.Array:
    """The configured input field, checked against (B, T, S, S, 3)."""
    x = batch[self.input]
    expected = (self.num_frames, self.image_size, self.image_size, NUM_SLICES)
    if tuple(x.shape[1:]) != expected:
      raise ValueError(f"batch field {self.input!r} has shape {tuple(x.shape)}; the config "
                       f"expects (B, {', '.join(map(str, expected))}) (data.num_frames, "
                       "data.image_size and 3 slices)")
    return x

  def model_input(self, raw: jax.Array) -> jax.Array:
    """(B, T, S, S, 3) labels or images -> (B, T, S, S, C_in) float network input."""
    if self.input == "sa_label":
      return one_hot_slices(raw)
    return raw.astype(jnp.float32)

  def disease_label(self, batch: dict[str, jax.Array]) -> jax.Array:
    """(B,) float32: 1 for the groups in data.positive_groups, else 0."""
    group = batch["group"]
    return jnp.isin(group, jnp.asarray(self.positive_groups)).astype(jnp.float32)

  def reconstruction_per_frame(self, raw: jax.Array, output: jax.Array) -> jax.Array:
    if self.input == "sa_label":
      return label_cross_entropy_per_frame(raw, output)
    return image_squared_error_per_frame(raw.astype(jnp.float32), output)

  # ---------------------------------------------------------------------------- application
  def _apply(self, params, batch_stats, method, inputs, mutable: bool = False):
    variables = {"params": params, "batch_stats": batch_stats}
    if mutable:
      return self.model.apply(variables, inputs, method=method, mutable=["batch_stats"])
    return self.model.apply(variables, inputs, method=method)

  def init_state(self, key: jax.Array) -> TrainState:
    x = jnp.zeros((1, self.num_frames, self.image_size, self.image_size, self.in_channels),
                  jnp.float32)
    variables = self.model.init(jax.random.fold_in(key, 0), x, train=False)
    params = dict(variables["params"])
    batch_stats = {part: variables.get("batch_stats", {}).get(part, {}) for part in PARTS}
    opt_state = {part: self.tx[part].init(params[part]) for part in PARTS}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=opt_state, rng=key, skipped_nonfinite=jnp.zeros((), jnp.int32))

  def encode(self, state: TrainState, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, T, S, S, C_in) network input -> mu, logvar (B, T, latent_dim), inference mode."""
    return self._apply(state.params, state.batch_stats, lambda m, v: m.encode(v, False), x)

  def decode(self, state: TrainState, z: jax.Array) -> jax.Array:
    """(B, T, latent_dim) -> (B, T, S, S, C_in) class logits (labels) or images."""
    return self._apply(state.params, state.batch_stats, lambda m, v: m.decode(v, False), z)

  def concepts(self, state: TrainState, means: jax.Array) -> jax.Array:
    """(B, T, latent_dim) means -> (B, concept_units) concept-layer activations."""
    return self._apply(state.params, state.batch_stats,
                       lambda m, v: m.classifier.concepts(v), means)

  def head(self, classifier_params, concepts: jax.Array) -> jax.Array:
    """(B, concept_units) -> (B,) logits: a pure function of the concept activations, the one
    TCAV differentiates."""
    return self.model.apply({"params": {"classifier": classifier_params}}, concepts,
                            method=lambda m, v: m.classifier.head(v))

  def logits(self, state: TrainState, means: jax.Array) -> jax.Array:
    return self.head(state.params["classifier"], self.concepts(state, means))

  def decode_labels(self, state: TrainState, z: jax.Array) -> jax.Array:
    """(B, T, latent_dim) -> (B, T, S, S, 3) int labels (argmax per slice); labels input only."""
    out = self.decode(state, z)
    return jnp.argmax(out.reshape(out.shape[:-1] + (NUM_SLICES, structures.NUM_LABELS)), -1)

  # ---------------------------------------------------------------------------- loss
  def loss_terms(self, params, batch_stats, raw: jax.Array, label: jax.Array,
                 noise: jax.Array, train: bool = True) -> tuple[dict[str, jax.Array], Any]:
    """Per-example loss terms for a fixed noise (B, T, latent_dim).

    Returns ({reconstruction (B, T), kl (B, T), bce (B,), logit (B,), mu, logvar, output},
    new batch_stats).
    """
    x = self.model_input(raw)
    (mu, logvar), enc_updates = self._apply(params, batch_stats,
                                            lambda m, v: m.encode(v, train), x, mutable=True)
    z = mu + jnp.exp(0.5 * logvar) * noise
    output, dec_updates = self._apply(params, batch_stats, lambda m, v: m.decode(v, train), z,
                                      mutable=True)
    logit = self._apply(params, batch_stats, lambda m, v: m.classify(v), mu)
    b, t = mu.shape[:2]
    kl = losses.kl_per_sample(mu.reshape(b * t, -1), logvar.reshape(b * t, -1)).reshape(b, t)
    terms = {"reconstruction": self.reconstruction_per_frame(raw, output), "kl": kl,
             "bce": losses.binary_cross_entropy_with_logits(logit, label), "logit": logit,
             "mu": mu, "logvar": logvar, "output": output}
    new_stats = {"encoder": enc_updates["batch_stats"]["encoder"],
                 "decoder": dec_updates["batch_stats"]["decoder"],
                 "classifier": batch_stats["classifier"]}
    return terms, new_stats

  def total_loss(self, terms: dict[str, jax.Array], gamma: float) -> jax.Array:
    """mean_{b,t}[rec + beta KL] + gamma mean_b BCE (module docstring)."""
    return (jnp.mean(terms["reconstruction"] + self.beta * terms["kl"])
            + gamma * jnp.mean(terms["bce"]))

  def _step(self, state: TrainState, batch: dict[str, jax.Array], key: jax.Array,
            joint: bool) -> tuple[TrainState, Metrics]:
    raw = self.raw_input(batch)
    label = self.disease_label(batch)
    noise = replica_rows(lambda shape: jax.random.normal(key, shape),
                         (raw.shape[0], self.num_frames, self.latent_dim), self.axis_name)
    gamma = self.gamma if joint else 0.0

    def loss_fn(params):
      terms, new_stats = self.loss_terms(params, state.batch_stats, raw, label, noise)
      loss = self.total_loss(terms, gamma)
      correct = ((terms["logit"] > 0) == (label > 0.5)).astype(jnp.float32)
      metrics = {"loss": loss, "reconstruction_loss": jnp.mean(terms["reconstruction"]),
                 "kl": jnp.mean(terms["kl"]), "bce": jnp.mean(terms["bce"]),
                 "accuracy": jnp.mean(correct), "stage": jnp.float32(2.0 if joint else 1.0)}
      return loss, (new_stats, metrics)

    grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
    if self.axis_name is not None:  # Every part's, for the norms of stage 1 too.
      grads = jax.lax.pmean(grads, self.axis_name)
    params, opt_state = dict(state.params), dict(state.opt_state)
    # Stage 1 leaves the classifier and its optimizer state exactly as they are.
    for part in (PARTS if joint else ("encoder", "decoder")):
      updates, opt_state[part] = self.tx[part].update(grads[part], state.opt_state[part],
                                                      state.params[part])
      params[part] = optax.apply_updates(state.params[part], updates)
    new_state = state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state)
    return finish_step(state, new_state, grads, metrics, skip_nonfinite=self.skip_nonfinite,
                       axis_name=self.axis_name)

  def vae_train_step(self, state: TrainState, batch: dict[str, jax.Array],
                     key: jax.Array) -> tuple[TrainState, Metrics]:
    """Stage 1: encoder and decoder on mean_t[rec + beta KL] (gamma = 0)."""
    return self._step(state, batch, key, joint=False)

  def joint_train_step(self, state: TrainState, batch: dict[str, jax.Array],
                       key: jax.Array) -> tuple[TrainState, Metrics]:
    """Stage 2: every part on the full objective."""
    return self._step(state, batch, key, joint=True)

  @property
  def train_step(self) -> Callable[..., tuple[TrainState, Metrics]]:
    return self.joint_train_step

  @property
  def warmup_train_step(self) -> Callable[..., tuple[TrainState, Metrics]] | None:
    return self.vae_train_step if self.stage1_steps > 0 else None

  # ---------------------------------------------------------------------------- evaluation
  def eval_step(self, state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-subject metrics of the posterior-mean reconstruction and the classifier."""
    raw = self.raw_input(batch)
    label = self.disease_label(batch)
    terms, _ = self.loss_terms(state.params, state.batch_stats, raw, label,
                               jnp.zeros(raw.shape[:2] + (self.latent_dim,)), train=False)
    logit = terms["logit"]
    out = {"reconstruction_loss": jnp.mean(terms["reconstruction"], axis=1),
           "kl": jnp.mean(terms["kl"], axis=1), "bce": terms["bce"],
           "accuracy": ((logit > 0) == (label > 0.5)).astype(jnp.float32),
           "logit": logit, "label": label, "mu": terms["mu"]}
    if self.input == "sa_label":
      output = terms["output"]
      predicted = jnp.argmax(
          output.reshape(output.shape[:-1] + (NUM_SLICES, structures.NUM_LABELS)), axis=-1)
      out["dice"] = dice_per_structure(raw, predicted)
    else:
      out["mse"] = jnp.mean(jnp.square(terms["output"] - raw.astype(jnp.float32)),
                            axis=(1, 2, 3, 4))
    return out

  def finalize_eval(self, outputs: dict[str, np.ndarray]) -> dict[str, float]:
    """AUC of the logits over the split (omitted when a class is missing)."""
    auc = classification.roc_auc(outputs["logit"], outputs["label"])
    return {} if np.isnan(auc) else {"auc": auc}

  def save_figures(self, state: TrainState, examples: dict[str, np.ndarray], figures_dir: str,
                   step: int, key: jax.Array) -> None:
    """Input vs posterior-mean reconstruction of the middle slice at up to 8 frames for the
    first two subjects (labels drawn as grey levels 0..3, images as they are)."""
    del key
    from cardiac_jax import viz  # pylint: disable=g-import-not-at-top (matplotlib on demand)
    raw = np.asarray(examples[self.input])[:2]
    x = self.model_input(jnp.asarray(raw))
    mu, _ = jax.jit(self.encode)(state, x)
    if self.input == "sa_label":
      recon = np.asarray(jax.jit(self.decode_labels)(state, mu))
      vmax = structures.NUM_LABELS - 1
    else:
      recon = np.asarray(jax.jit(self.decode)(state, mu))
      vmax = 1.0
    frames = np.unique(np.linspace(0, self.num_frames - 1, min(8, self.num_frames)).astype(int))
    rows, titles = [], []
    for i in range(raw.shape[0]):
      rows.append([raw[i, t, :, :, 1] for t in frames])
      rows.append([recon[i, t, :, :, 1] for t in frames])
      titles += [f"subject {i} input", f"subject {i} recon"]
    viz.save_image_grid(os.path.join(figures_dir, f"reconstructions_{step:07d}.png"), rows,
                        row_titles=titles, col_titles=[f"t={t}" for t in frames], vmin=0.0,
                        vmax=float(vmax), title=f"step {step}")
