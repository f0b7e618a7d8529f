"""Unsupervised discovery of interpretable latent directions of a frozen generator.

A generator here is any pure function G: (B, d) latents -> (B, H, W, C) images (the DCGAN
generator, or a VAE decoder with z ~ N(0, I)). Three methods, as compared by Schoen et al.
("Interpreting Latent Spaces of Generative Models for Medical Images using Unsupervised
Methods", 2022):

1. Voynov & Babenko (ICML 2020), "Unsupervised discovery of interpretable directions in the GAN
   latent space". A direction matrix A (d x K, the "deformator") and a reconstructor R are trained
   jointly, G frozen: for z ~ N(0, I), k ~ U{0..K-1} and a shift eps,
     R(G(z), G(z + A (eps e_k))) -> (logits over k, predicted eps),
     L = CE(logits, k) + 0.25 * |eps_pred - eps|,
   so A is pushed towards directions whose effects R can tell apart, i.e. distinct, visible image
   changes. eps ~ 6 U[-1, 1], with |eps| < 0.5 moved to +-0.5 (too small a shift is invisible).
   Deformator variants: "linear" (A free; identity on the min(K, d) block or 0.1 N(0, 1) init),
   "proj" (columns normalised, so the shift has length |eps|), "ortho" (A = expm(S - S^T), an
   orthonormal basis, K = d), and the fixed baselines "identity" and "random" (a random
   orthonormal A). Adam 1e-4 for A and R (one Adam over both parameter sets equals two, Adam
   being elementwise).
   Reconstructors: "lenet" (LeNet-like: conv5 2C->6->16->120 with BN, ReLU and 2x2 max-pools,
   spatial mean, two linear heads) and "resnet" (a small residual network, `layers.ResBlock`).
2. GANSpace (Haerkoenen et al., NeurIPS 2020): PCA of features F(z) for z ~ N(0, I) (or of given
   latents, e.g. a VAE's posterior means), components sorted by variance and transferred to the
   latent space by least-squares regression of z on the PCA coordinates; an edit of t is t
   standard deviations of the component.
3. SeFa (Shen & Zhou, CVPR 2021): the eigenvectors of A^T A of the generator's first linear map
   z -> A z + b, with A's rows normalised, sorted by eigenvalue (unit directions, edits in
   [-3, 3]). No sampling: closed form from the weights.

`shift_grid` renders G(z + t v) for every direction v and shift t; `save_direction_grid` draws it.
`train_voynov_directions` trains the Voynov method and ranks its directions. Scoring directions
against ground-truth factors is `cardiac_jax.direction_scoring`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import struct

from cardiac_jax import io, layers

Generator = Callable[[jax.Array], jax.Array]
Metrics = dict[str, jax.Array]

DEFORMATOR_KINDS = ("linear", "proj", "ortho", "identity", "random")
DEFORMATOR_INITS = ("identity", "random")
RECONSTRUCTORS = ("lenet", "resnet")
# Voynov & Babenko's shift distribution (eps ~ 6 U[-1, 1], |eps| >= 0.5) and loss weights
# (CE + 0.25 L1): the defaults of `sample_shifts`, `direction_losses` and `VoynovConfig`.
SHIFT_SCALE, MIN_SHIFT = 6.0, 0.5
LABEL_WEIGHT, SHIFT_WEIGHT = 1.0, 0.25


# ------------------------------------------------------------------------------ deformator
@dataclasses.dataclass(frozen=True)
class Deformator:
  """Maps eps * e_k to a latent shift (B, d) through a direction matrix A (d, K).

  kind: one of DEFORMATOR_KINDS (module docstring). init: "identity" (the min(K, d) block of A is
  the identity, the rest 0; "proj" fills the columns beyond d with 0.1 N(0, 1) since a zero
  column has no direction) or "random" (A = 0.1 N(0, 1)); "ortho" starts at S = 0 (A = I) or
  S = 0.1 N(0, 1).
  """
  kind: str
  latent_dim: int
  num_directions: int
  init: str = "identity"

  def __post_init__(self):
    if self.kind not in DEFORMATOR_KINDS:
      raise ValueError(f"unknown deformator {self.kind!r} (one of {DEFORMATOR_KINDS})")
    if self.init not in DEFORMATOR_INITS:
      raise ValueError(f"unknown deformator init {self.init!r} (one of {DEFORMATOR_INITS})")
    if self.kind == "ortho" and self.num_directions != self.latent_dim:
      raise ValueError(f"the ortho deformator needs num_directions == latent_dim, got "
                       f"{self.num_directions} and {self.latent_dim}")
    if self.kind in ("identity", "random") and self.num_directions > self.latent_dim:
      raise ValueError(f"the {self.kind} deformator has at most latent_dim "
                       f"({self.latent_dim}) directions, got {self.num_directions}")

  @property
  def trainable(self) -> bool:
    return self.kind in ("linear", "proj", "ortho")

  def init_params(self, key: jax.Array) -> dict[str, jax.Array]:
    d, k = self.latent_dim, self.num_directions
    noise = 0.1 * jax.random.normal(key, (d, k), jnp.float32)
    if self.kind == "ortho":
      return {"skew": noise if self.init == "random" else jnp.zeros((d, d), jnp.float32)}
    if self.kind == "identity":
      return {}
    if self.kind == "random":
      q, r = jnp.linalg.qr(jax.random.normal(key, (d, d), jnp.float32))
      return {"fixed": (q * jnp.sign(jnp.diag(r)))[:, :k]}  # Haar-distributed columns.
    if self.init == "random":
      return {"matrix": noise}
    eye = jnp.eye(d, k, dtype=jnp.float32)
    if self.kind == "proj" and k > d:
      eye = eye.at[:, d:].set(noise[:, d:])
    return {"matrix": eye}

  def matrix(self, params: dict[str, jax.Array]) -> jax.Array:
    """The (d, K) matrix whose columns are the directions ("proj": unit columns)."""
    if self.kind == "ortho":
      skew = params["skew"]
      return jax.scipy.linalg.expm(skew - skew.T)
    if self.kind == "identity":
      return jnp.eye(self.latent_dim, self.num_directions, dtype=jnp.float32)
    if self.kind == "random":
      return jax.lax.stop_gradient(params["fixed"])
    a = params["matrix"]
    if self.kind == "proj":
      a = a / jnp.maximum(jnp.linalg.norm(a, axis=0, keepdims=True), 1e-8)
    return a

  def __call__(self, params: dict[str, jax.Array], k: jax.Array, eps: jax.Array) -> jax.Array:
    """Latent shifts A (eps_i e_{k_i}) for k (B,) int and eps (B,) -> (B, d)."""
    return self.matrix(params)[:, k].T * eps[:, None]


# --------------------------------------------------------------------------- reconstructor
class LeNetReconstructor(nn.Module):
  """(B, H, W, 2C) image pairs -> (logits (B, K), shift (B,)); LeNet-like (module docstring)."""
  num_directions: int
  width: int = 2
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    h = x
    for i, c in enumerate((3 * self.width, 8 * self.width, 60 * self.width)):
      h = layers.Conv(c, 5, impl=self.conv_impl, name=f"conv{i}")(h)
      h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                               name=f"bn{i}")(h))
      if i < 2:
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
    h = h.mean(axis=(1, 2))
    logits = nn.Dense(self.num_directions, name="direction_head")(h)
    shift = nn.Dense(1, name="shift_head")(h)[:, 0]
    return logits, shift


class ResNetReconstructor(nn.Module):
  """(B, H, W, 2C) image pairs -> (logits (B, K), shift (B,)); stem conv3x3 + BN + ReLU, then
  per entry of `channels` a residual block and 2x2 average pooling, spatial mean, two heads."""
  num_directions: int
  channels: Sequence[int] = (16, 32, 64)
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    h = layers.Conv(self.channels[0], 3, use_bias=False, impl=self.conv_impl, name="stem")(x)
    h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             name="stem_bn")(h))
    for i, c in enumerate(self.channels):
      h = layers.ResBlock(c, conv_impl=self.conv_impl, name=f"block{i}")(h, train)
      if h.shape[1] >= 2 and h.shape[1] % 2 == 0:
        h = layers.avg_pool2(h)
    h = h.mean(axis=(1, 2))
    logits = nn.Dense(self.num_directions, name="direction_head")(h)
    shift = nn.Dense(1, name="shift_head")(h)[:, 0]
    return logits, shift


def make_reconstructor(name: str, num_directions: int, width: int = 2) -> nn.Module:
  """"lenet": channels (3, 8, 60) * width (width 2 is LeNet's 6-16-120); "resnet": channels
  (16, 32, 64) * width / 2."""
  if name == "lenet":
    return LeNetReconstructor(num_directions, width=width)
  if name == "resnet":
    return ResNetReconstructor(num_directions,
                               channels=tuple(max(1, c * width // 2) for c in (16, 32, 64)))
  raise ValueError(f"unknown reconstructor {name!r} (one of {RECONSTRUCTORS})")


# --------------------------------------------------------------------------- sampling, loss
def sample_shifts(key: jax.Array, batch_size: int, num_directions: int,
                  shift_scale: float = SHIFT_SCALE,
                  min_shift: float = MIN_SHIFT) -> tuple[jax.Array, jax.Array]:
  """k ~ U{0..K-1} (B,) int32 and eps ~ shift_scale * U[-1, 1] with |eps| < min_shift moved to
  +-min_shift keeping its sign (0 goes to +min_shift) (B,) float32."""
  k_key, eps_key = jax.random.split(key)
  k = jax.random.randint(k_key, (batch_size,), 0, num_directions, jnp.int32)
  eps = shift_scale * jax.random.uniform(eps_key, (batch_size,), jnp.float32, -1.0, 1.0)
  sign = jnp.where(eps < 0, -1.0, 1.0)
  eps = jnp.where(jnp.abs(eps) < min_shift, sign * min_shift, eps)
  return k, eps


def direction_losses(logits: jax.Array, shift_prediction: jax.Array, k: jax.Array,
                     eps: jax.Array, label_weight: float = LABEL_WEIGHT,
                     shift_weight: float = SHIFT_WEIGHT) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(total, cross-entropy on k, mean |eps_pred - eps|): total = label_weight * CE +
  shift_weight * L1. logits (B, K), shift_prediction, k, eps (B,)."""
  ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, k))
  l1 = jnp.mean(jnp.abs(shift_prediction - eps))
  return label_weight * ce + shift_weight * l1, ce, l1


# ------------------------------------------------------------------------ Voynov training
@dataclasses.dataclass(frozen=True)
class VoynovConfig:
  """Hyperparameters of the Voynov-Babenko discovery (Schoen et al.: 3000 steps, batch 128,
  K = 100 with "proj" or K = d with "ortho")."""
  num_directions: int
  deformator: str = "proj"
  deformator_init: str = "identity"
  reconstructor: str = "lenet"
  reconstructor_width: int = 2
  batch_size: int = 32
  shift_scale: float = SHIFT_SCALE
  min_shift: float = MIN_SHIFT
  label_weight: float = LABEL_WEIGHT
  shift_weight: float = SHIFT_WEIGHT
  learning_rate: float = 1e-4


@struct.dataclass
class DirectionState:
  step: jax.Array     # int32 scalar
  params: Any         # {"deformator": ..., "reconstructor": ...}
  batch_stats: Any    # reconstructor BatchNorm statistics
  opt_state: Any


class VoynovDiscovery:
  """Trains a deformator and a reconstructor against a frozen generator (module docstring).

  `generator` must be a pure function (B, latent_dim) -> (B, H, W, C) whose parameters are closed
  over as constants (so they are never trained). `train_step(state, key) -> (state, metrics)` is
  pure and jit-compiled once.
  """

  def __init__(self, generator: Generator, latent_dim: int, config: VoynovConfig):
    self.generator = generator
    self.latent_dim = int(latent_dim)
    self.config = config
    self.deformator = Deformator(config.deformator, self.latent_dim, config.num_directions,
                                 config.deformator_init)
    self.reconstructor = make_reconstructor(config.reconstructor, config.num_directions,
                                            config.reconstructor_width)
    self.tx = optax.adam(config.learning_rate)
    self.train_step = jax.jit(self._train_step)
    self._predict = jax.jit(self._predict_batch)

  def image_shape(self) -> tuple[int, ...]:
    shape = jax.eval_shape(self.generator, jnp.zeros((1, self.latent_dim), jnp.float32)).shape
    if len(shape) != 4:
      raise ValueError(f"the generator must return (B, H, W, C) images, got shape {shape}")
    return tuple(shape[1:])

  def init(self, key: jax.Array) -> DirectionState:
    h, w, c = self.image_shape()
    d_key, r_key = jax.random.split(key)
    variables = self.reconstructor.init(r_key, jnp.zeros((1, h, w, 2 * c), jnp.float32),
                                        train=False)
    params = {"deformator": self.deformator.init_params(d_key),
              "reconstructor": variables["params"]}
    return DirectionState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=variables.get("batch_stats", {}),
                          opt_state=self.tx.init(params))

  def _pairs(self, deformator_params, key: jax.Array, batch_size: int):
    """(G(z) ++ G(z + shift) on channels (B, H, W, 2C), k, eps)."""
    z_key, shift_key = jax.random.split(key)
    z = jax.random.normal(z_key, (batch_size, self.latent_dim), jnp.float32)
    k, eps = sample_shifts(shift_key, batch_size, self.config.num_directions,
                           self.config.shift_scale, self.config.min_shift)
    shifted = z + self.deformator(deformator_params, k, eps)
    # Two generator calls: G(z) does not depend on the deformator, so the backward pass runs
    # through G(z + shift) only (one call on the concatenated batch would back-propagate
    # through both halves).
    base = jax.lax.stop_gradient(self.generator(z))
    images = jnp.concatenate([base, self.generator(shifted)], axis=-1)
    return images, k, eps

  def loss_fn(self, params, batch_stats, key: jax.Array):
    cfg = self.config
    images, k, eps = self._pairs(params["deformator"], key, cfg.batch_size)
    (logits, shift_pred), updates = self.reconstructor.apply(
        {"params": params["reconstructor"], "batch_stats": batch_stats}, images, train=True,
        mutable=["batch_stats"])
    loss, ce, l1 = direction_losses(logits, shift_pred, k, eps, cfg.label_weight,
                                    cfg.shift_weight)
    accuracy = jnp.mean((jnp.argmax(logits, -1) == k).astype(jnp.float32))
    return loss, (updates["batch_stats"], {"loss": loss, "direction_loss": ce,
                                           "shift_loss": l1, "train_accuracy": accuracy})

  def _train_step(self, state: DirectionState, key: jax.Array) -> tuple[DirectionState, Metrics]:
    grads, (batch_stats, metrics) = jax.grad(self.loss_fn, has_aux=True)(
        state.params, state.batch_stats, key)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm_deformator"] = optax.global_norm(grads["deformator"])
    metrics["grad_norm_reconstructor"] = optax.global_norm(grads["reconstructor"])
    return DirectionState(step=state.step + 1, params=params, batch_stats=batch_stats,
                          opt_state=opt_state), metrics

  def _predict_batch(self, state: DirectionState, key: jax.Array):
    images, k, eps = self._pairs(state.params["deformator"], key, self.config.batch_size)
    logits, shift_pred = self.reconstructor.apply(
        {"params": state.params["reconstructor"], "batch_stats": state.batch_stats}, images,
        train=False)
    return jnp.argmax(logits, -1), shift_pred, k, eps

  def train(self, state: DirectionState, key: jax.Array, num_steps: int,
            log_every: int = 0, log: Callable[[int, dict], None] | None = None
            ) -> tuple[DirectionState, list[dict[str, float]]]:
    """Runs `num_steps` steps with keys fold_in(key, step); returns the state and the logged
    metric means (every `log_every` steps, if > 0)."""
    history, sums, count = [], {}, 0
    for _ in range(num_steps):
      step = int(state.step)
      state, metrics = self.train_step(state, jax.random.fold_in(key, step))
      if log_every:
        for name, value in jax.device_get(metrics).items():
          sums[name] = sums.get(name, 0.0) + float(value)
        count += 1
        if (step + 1) % log_every == 0:
          row = {"step": step + 1, **{n: v / count for n, v in sums.items()}}
          history.append(row)
          if log is not None:
            log(step + 1, row)
          sums, count = {}, 0
    return state, history

  def evaluate(self, state: DirectionState, key: jax.Array,
               num_batches: int = 10) -> dict[str, float]:
    """Reconstructor accuracy on fresh pairs (BatchNorm in inference mode): direction accuracy
    (chance is 1/K), mean |eps_pred - eps|, and the accuracy per direction."""
    predicted, shifts, true_k, true_eps = [], [], [], []
    for i in range(num_batches):
      p, s, k, e = jax.device_get(self._predict(state, jax.random.fold_in(key, i)))
      predicted.append(p), shifts.append(s), true_k.append(k), true_eps.append(e)
    predicted, shifts = np.concatenate(predicted), np.concatenate(shifts)
    true_k, true_eps = np.concatenate(true_k), np.concatenate(true_eps)
    correct = predicted == true_k
    per_direction = [float(correct[true_k == j].mean()) if np.any(true_k == j) else float("nan")
                     for j in range(self.config.num_directions)]
    return {"accuracy": float(correct.mean()), "chance": 1.0 / self.config.num_directions,
            "shift_mae": float(np.abs(shifts - true_eps).mean()),
            "accuracy_per_direction": per_direction, "num_pairs": int(len(true_k))}

  def directions(self, state: DirectionState) -> np.ndarray:
    """(K, d) latent directions (rows), as the deformator maps eps = 1."""
    return np.asarray(self.deformator.matrix(state.params["deformator"])).T


# --------------------------------------------------------------------------- closed forms
@dataclasses.dataclass
class DirectionSet:
  """Latent directions of one method.

  vectors: (K, d) unit-norm latent directions, most important first.
  scales: (K,) latent length of one edit unit (one standard deviation for PCA, 1 for SeFa and
    Voynov), so an edit of t moves z by t * scales[k] * vectors[k].
  values: (K,) the ranking quantity (variance, eigenvalue, or reconstructor accuracy).
  method: "pca", "ganspace", "sefa" or "voynov".
  """
  vectors: np.ndarray
  scales: np.ndarray
  values: np.ndarray
  method: str

  def scaled(self) -> np.ndarray:
    return self.vectors * self.scales[:, None]


def save_direction_set(path: str, found: DirectionSet) -> None:
  """Writes `found` to an .npz file (vectors, scales, values, method) atomically."""
  io.write_npz(path, vectors=found.vectors, scales=found.scales, values=found.values,
               method=np.asarray(found.method))


def load_direction_set(path: str) -> DirectionSet:
  """The DirectionSet written by `save_direction_set`."""
  with np.load(path) as data:
    return DirectionSet(data["vectors"], data["scales"], data["values"], str(data["method"]))


def train_voynov_directions(generator: Generator, latent_dim: int, config: VoynovConfig,
                            key: jax.Array, num_steps: int,
                            log: Callable[[str], None] | None = None
                            ) -> tuple[DirectionSet, dict[str, Any]]:
  """Trains a Voynov-Babenko deformator and reconstructor for `num_steps` (init, train and
  evaluate keys folded in as 0, 1, 2); (DirectionSet ranked by the reconstructor's accuracy
  per direction, {"reconstructor": evaluate(), "history": [...], "source_index": [...]}), the
  source index being each ranked direction's column of the deformator."""
  log = log or (lambda message: None)
  discovery = VoynovDiscovery(generator, latent_dim, config)
  state = discovery.init(jax.random.fold_in(key, 0))
  every = max(1, num_steps // 10)
  state, history = discovery.train(
      state, jax.random.fold_in(key, 1), num_steps, log_every=every,
      log=lambda step, row: log(f"voynov step {step}: loss {row['loss']:.4f}, accuracy "
                                f"{row['train_accuracy']:.3f}"))
  evaluation = discovery.evaluate(state, jax.random.fold_in(key, 2))
  matrix = discovery.directions(state)                          # (K, d)
  lengths = np.linalg.norm(matrix, axis=1)
  accuracy = np.nan_to_num(np.asarray(evaluation["accuracy_per_direction"], np.float64), nan=0.0)
  order = np.argsort(-accuracy, kind="stable")
  found = DirectionSet(vectors=(matrix / np.maximum(lengths, 1e-12)[:, None])[order],
                       scales=lengths[order], values=accuracy[order], method="voynov")
  log(f"voynov reconstructor accuracy {evaluation['accuracy']:.3f} (chance "
      f"{evaluation['chance']:.3f})")
  return found, {"reconstructor": evaluation, "history": history,
                 "source_index": order.tolist()}


def _fix_signs(vectors: np.ndarray) -> np.ndarray:
  """Each row's largest-magnitude entry positive (PCA/eigenvector signs are arbitrary)."""
  signs = np.sign(vectors[np.arange(len(vectors)), np.argmax(np.abs(vectors), axis=1)])
  return vectors * np.where(signs == 0, 1.0, signs)[:, None]


def principal_components(samples: np.ndarray,
                         num_components: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """PCA of (N, F) samples: (components (K, F) unit rows, variances (K,)), by variance."""
  samples = np.asarray(samples, np.float64)
  if samples.ndim != 2 or len(samples) < 2:
    raise ValueError(f"PCA needs (N >= 2, F) samples, got shape {samples.shape}")
  centred = samples - samples.mean(axis=0)
  _, singular, vt = np.linalg.svd(centred, full_matrices=False)
  k = min(num_components or len(singular), len(singular))
  return _fix_signs(vt[:k]), singular[:k] ** 2 / (len(samples) - 1)


def pca_latent_directions(latents: np.ndarray, num_components: int | None = None) -> DirectionSet:
  """PCA of latent codes (e.g. a VAE's posterior means of real images) (N, d)."""
  components, variances = principal_components(latents, num_components)
  return DirectionSet(components, np.sqrt(variances), variances, "pca")


def ganspace_directions(feature_fn: Callable[[jax.Array], jax.Array], key: jax.Array,
                        latent_dim: int, num_samples: int = 4096,
                        num_components: int | None = None,
                        batch_size: int = 512) -> DirectionSet:
  """GANSpace: PCA of features F(z) (B, ...) for z ~ N(0, I), transferred to the latent space.

  With Y = F(Z) and X = (Y - mean) U^T the PCA coordinates, the latent basis V solves the least
  squares problem X V = Z; row V_k is the latent change per unit of coordinate k, so one standard
  deviation sigma_k of the component is a latent step sigma_k V_k (Haerkoenen et al. 2020).
  """
  z = np.asarray(jax.random.normal(key, (num_samples, latent_dim), jnp.float32), np.float64)
  fn = jax.jit(feature_fn)
  features = np.concatenate([
      np.asarray(fn(jnp.asarray(z[i:i + batch_size], jnp.float32))).reshape(
          min(batch_size, num_samples - i), -1)
      for i in range(0, num_samples, batch_size)]).astype(np.float64)
  k = min(num_components or latent_dim, latent_dim, features.shape[1])
  components, variances = principal_components(features, k)
  coords = (features - features.mean(axis=0)) @ components.T
  basis, *_ = np.linalg.lstsq(coords, z - z.mean(axis=0), rcond=None)  # (K, d)
  lengths = np.linalg.norm(basis, axis=1)
  vectors = _fix_signs(basis / np.maximum(lengths, 1e-12)[:, None])
  return DirectionSet(vectors, lengths * np.sqrt(variances), variances, "ganspace")


def sefa_directions(kernel: np.ndarray, num_components: int | None = None) -> DirectionSet:
  """SeFa from the first linear map's kernel (d, F) (features = z @ kernel + b, i.e. A =
  kernel^T (F, d)): eigenvectors of A^T A with the rows of A normalised, by eigenvalue."""
  kernel = np.asarray(kernel, np.float64)
  if kernel.ndim != 2:
    raise ValueError(f"SeFa needs a (latent_dim, F) kernel, got shape {kernel.shape}")
  a = kernel.T
  a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
  eigenvalues, eigenvectors = np.linalg.eigh(a.T @ a)  # Ascending.
  order = np.argsort(eigenvalues)[::-1][:num_components or len(eigenvalues)]
  vectors = _fix_signs(eigenvectors[:, order].T)
  return DirectionSet(vectors, np.ones(len(order)), eigenvalues[order], "sefa")


# ------------------------------------------------------------------------------ rendering
def shift_grid(generator: Generator, z: np.ndarray | jax.Array, directions,
               shifts: Sequence[float], batch_size: int = 64) -> np.ndarray:
  """G(z + t v) for every direction v (rows of `directions` (D, d), already scaled) and shift t
  (S,), from one base latent z (d,). Returns (D, S, H, W, C)."""
  z = np.asarray(z, np.float32).reshape(-1)
  directions = np.asarray(directions, np.float32)
  shifts = np.asarray(shifts, np.float32)
  if directions.ndim != 2 or directions.shape[1] != z.shape[0]:
    raise ValueError(f"directions must be (D, {z.shape[0]}), got shape {directions.shape}")
  latents = (z[None, None] + shifts[None, :, None] * directions[:, None, :]).reshape(
      -1, z.shape[0])
  fn = jax.jit(generator)
  images = np.concatenate([np.asarray(fn(jnp.asarray(latents[i:i + batch_size])))
                           for i in range(0, len(latents), batch_size)])
  return images.reshape(len(directions), len(shifts), *images.shape[1:])


def save_direction_grid(path: str, images: np.ndarray, shifts: Sequence[float],
                        labels: Sequence[str] | None = None, channel: int = 0,
                        title: str | None = None) -> str:
  """Draws `shift_grid` output (D, S, H, W, C), one channel: rows directions, columns shifts."""
  from cardiac_jax import viz  # pylint: disable=g-import-not-at-top (matplotlib on demand)
  images = np.asarray(images)
  if images.ndim != 5:
    raise ValueError(f"{path!r}: direction grid images must be (D, S, H, W, C), got shape "
                     f"{images.shape}")
  labels = list(labels) if labels is not None else [f"d{i}" for i in range(len(images))]
  return viz.save_traversal_grid(path, images[..., channel], labels, list(shifts), title=title)
