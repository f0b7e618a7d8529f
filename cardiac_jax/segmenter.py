"""A small U-Net segmenter of short-axis slices, to measure generated images.

Maps (B, S, S, 1) images in [0, 1] to (B, S, S, 4) logits over the canonical labels
(0 background, 1 RV, 2 LV myocardium, 3 LV blood pool; `cardiac_jax.structures`).

Network (channels c = config.channels, L = len(c), S divisible by 2**(L - 1)):
  encoder level i: [conv3x3 -> GroupNorm -> ReLU] x 2 with c[i] channels, then 2x2 average
    pooling (not after the last level);
  decoder level i = L-2 .. 0: nearest x2 upsampling, concatenation with the encoder level i
    output, [conv3x3 -> GroupNorm -> ReLU] x 2 with c[i] channels;
  a 1x1 convolution to the class logits.
GroupNorm (as many groups as the largest divisor of c up to config.groups) keeps the network a
pure function of its parameters: no running statistics, and one image is segmented the same
whatever the rest of its batch.

Training (`train_segmenter`): He-normal initial kernels, Adam on the pixel-mean softmax
cross-entropy. Each step applies one of the 8 rotations by multiples of 90 degrees and
reflections to the whole batch (the label map moves with the image), a per-image intensity scale
~ U[1 - s, 1 + s] (config.intensity_jitter) and additive Gaussian noise of standard deviation
config.noise_std, so the segmenter does not depend on the canonical orientation of the prepared
data nor on the exact contrast and clean background of real images, both of which a generator
may change. Those random numbers are drawn on the host by one numpy generator seeded from the
training key and passed to the jitted step, which holds no random number generation: the step
compiles faster, and a run is reproducible from its key.

Dice (`dice_scores`): per structure k, 2 |P_k & T_k| / (|P_k| + |T_k|) pooled over all pixels
of all images, and their mean over the three structures.

Storage (`save_segmenter`, `load_segmenter`): DIR/params.npz (parameter leaves by their "/"-
joined path) and DIR/segmenter.json (the SegmenterConfig and any metadata, e.g. the held-out
Dice). `load_or_train` is the one way the analyses get a segmenter: the saved one when its
metadata matches what they need, else a newly trained one, saved.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import traverse_util

from cardiac_jax import io, layers, structures

Params = Any
PARAMS_FILE = "params.npz"
META_FILE = "segmenter.json"
STRUCTURE_NAMES = {structures.RV_BLOOD_POOL: "rv", structures.LV_MYOCARDIUM: "myo",
                   structures.LV_BLOOD_POOL: "lv"}


@dataclasses.dataclass(frozen=True)
class SegmenterConfig:
  """Architecture and training settings (module docstring)."""
  channels: tuple[int, ...] = (8, 16, 32)
  num_classes: int = structures.NUM_LABELS
  groups: int = 8
  learning_rate: float = 1e-3
  augment: bool = True
  intensity_jitter: float = 0.25
  noise_std: float = 0.02

  def __post_init__(self):
    object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
    if not self.channels or min(self.channels) < 1:
      raise ValueError(f"segmenter channels must be positive, got {self.channels}")

  def check_image_size(self, size: int) -> None:
    factor = 2 ** (len(self.channels) - 1)
    if size % factor:
      raise ValueError(f"the segmenter with {len(self.channels)} levels needs an image size "
                       f"divisible by {factor}, got {size}")


class UNet(nn.Module):
  """(B, S, S, 1) -> (B, S, S, num_classes) logits (module docstring)."""
  channels: Sequence[int]
  num_classes: int
  groups: int = 8

  def _block(self, h: jax.Array, c: int, name: str) -> jax.Array:
    groups = max(g for g in range(1, min(self.groups, c) + 1) if c % g == 0)
    for j in range(2):
      h = layers.Conv(c, 3, name=f"{name}_conv{j}")(h)
      h = nn.relu(nn.GroupNorm(num_groups=groups, name=f"{name}_norm{j}")(h))
    return h

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    skips, h = [], x
    last = len(self.channels) - 1
    for i, c in enumerate(self.channels):
      h = self._block(h, c, f"down{i}")
      if i < last:
        skips.append(h)
        h = layers.avg_pool2(h)
    for i in reversed(range(last)):
      h = jnp.concatenate([layers.upsample_nearest2(h), skips[i]], axis=-1)
      h = self._block(h, self.channels[i], f"up{i}")
    return layers.Conv(self.num_classes, 1, name="to_logits")(h)


def make_model(config: SegmenterConfig) -> UNet:
  return UNet(channels=config.channels, num_classes=config.num_classes, groups=config.groups)


# ----------------------------------------------------------------------------- training
def _numpy_rng(key) -> np.random.Generator:
  """A numpy generator seeded by a JAX key (typed or raw uint32) or numpy seed (int or ints)."""
  if isinstance(key, jax.Array):
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
      key = jax.random.key_data(key)
    return np.random.default_rng(np.asarray(key).ravel().tolist())
  return np.random.default_rng(key)


def init_params(config: SegmenterConfig, key, image_size: int) -> Params:
  """Parameters with He-normal kernels N(0, 2 / fan_in), zero biases and unit GroupNorm
  scales, drawn with numpy from `key` (a JAX key or a numpy seed): the shapes come from an abstract
  evaluation, so nothing is compiled (compiling random initialisers costs seconds per layer on
  a CPU)."""
  config.check_image_size(image_size)
  model = make_model(config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, image_size, image_size, 1))))
  rng = _numpy_rng(key)
  flat = traverse_util.flatten_dict(shapes["params"])
  params = {}
  for path in sorted(flat):
    shape = flat[path].shape
    if path[-1] == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      params[path] = jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / fan_in), shape), jnp.float32)
    elif path[-1] == "scale":
      params[path] = jnp.ones(shape, jnp.float32)
    else:
      params[path] = jnp.zeros(shape, jnp.float32)
  return traverse_util.unflatten_dict(params)


def draw_augmentation(rng: np.random.Generator, batch_size: int, image_size: int,
                      config: SegmenterConfig) -> dict[str, np.ndarray]:
  """Host-side random numbers of one step's augmentation (module docstring): the dihedral
  transform (transpose, flip rows, flip columns), per-image scales (B,) and noise (B, S, S, 1)."""
  return {"dihedral": rng.random(3) < 0.5,
          "scale": rng.uniform(1.0 - config.intensity_jitter, 1.0 + config.intensity_jitter,
                               batch_size).astype(np.float32),
          "noise": (config.noise_std * rng.standard_normal(
              (batch_size, image_size, image_size, 1))).astype(np.float32)}


def augment_batch(images: jax.Array, labels: jax.Array,
                  augmentation: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Applies `draw_augmentation`'s numbers: one of the 8 dihedral transforms of the whole batch
  (an optional transpose, then optional flips of rows and of columns), the per-image intensity
  scale and the noise, clipped to [0, 1]. images (B, S, S, 1) float, labels (B, S, S) int."""
  transpose, flip_rows, flip_cols = (augmentation["dihedral"][i] for i in range(3))
  images = jnp.where(transpose, images.transpose(0, 2, 1, 3), images)
  labels = jnp.where(transpose, labels.transpose(0, 2, 1), labels)
  images = jnp.where(flip_rows, images[:, ::-1], images)
  labels = jnp.where(flip_rows, labels[:, ::-1], labels)
  images = jnp.where(flip_cols, images[:, :, ::-1], images)
  labels = jnp.where(flip_cols, labels[:, :, ::-1], labels)
  images = images * augmentation["scale"][:, None, None, None] + augmentation["noise"]
  return jnp.clip(images, 0.0, 1.0), labels


def loss_fn(model: UNet, params: Params, images: jax.Array,
            labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(pixel-mean cross-entropy, pixel accuracy) of (B, S, S, 1) images, (B, S, S) labels."""
  logits = model.apply({"params": params}, images)
  ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  return ce, accuracy


def make_train_step(config: SegmenterConfig) -> Callable:
  """Jitted pure step (params, opt_state, images (B,S,S,1), labels (B,S,S), augmentation) ->
  (params, opt_state, {"loss", "accuracy"}); augmentation: `draw_augmentation`'s dict, or None
  (then, or with config.augment False, the batch is used as it is)."""
  model, tx = make_model(config), optax.adam(config.learning_rate)

  def step(params, opt_state, images, labels, augmentation):
    if config.augment and augmentation is not None:
      images, labels = augment_batch(images, labels, augmentation)
    (loss, accuracy), grads = jax.value_and_grad(
        lambda p: loss_fn(model, p, images, labels), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {"loss": loss, "accuracy": accuracy}

  return jax.jit(step)


def image_label_pair(batch: dict[str, np.ndarray],
                     channel: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(B, S, S, 1) float32 images and (B, S, S) int32 labels of one channel of a pipeline batch
  ("image" and "label" (B, S, S, C)); padding rows (mask False) are dropped."""
  if "image" not in batch or "label" not in batch:
    raise ValueError(f"segmenter batches need 'image' and 'label', got {sorted(batch)}")
  images, labels = np.asarray(batch["image"]), np.asarray(batch["label"])
  if images.ndim != 4 or labels.shape != images.shape:
    raise ValueError(f"batch 'image' {images.shape} and 'label' {labels.shape} must both be "
                     "(B, S, S, C)")
  keep = np.asarray(batch.get("mask", np.ones(len(images), bool)), bool)
  return (images[keep, ..., channel:channel + 1].astype(np.float32),
          labels[keep, ..., channel].astype(np.int32))


def train_segmenter(batches: Iterable[dict[str, np.ndarray]], num_steps: int, key,
                    config: SegmenterConfig = SegmenterConfig(), channel: int = 0,
                    log_every: int = 0,
                    log: Callable[[int, dict[str, float]], None] | None = None) -> Params:
  """Trains a segmenter for `num_steps` steps on `batches` (pipeline batches, channel `channel`
  of "image" and "label"). `key` (a JAX key or a numpy seed) seeds one numpy generator that draws
  the initial parameters and then every step's augmentation, so training is reproducible."""
  if num_steps < 1:
    raise ValueError(f"the segmenter needs at least one training step, got {num_steps}")
  iterator: Iterator = iter(batches)
  images, labels = image_label_pair(next(iterator), channel)
  rng = _numpy_rng(key)
  params = init_params(config, int(rng.integers(2 ** 31)), images.shape[1])
  opt_state = optax.adam(config.learning_rate).init(params)
  step_fn = make_train_step(config)
  sums, count = {}, 0
  for step in range(num_steps):
    if step:
      images, labels = image_label_pair(next(iterator), channel)
    augmentation = (draw_augmentation(rng, len(images), images.shape[1], config)
                    if config.augment else None)
    params, opt_state, metrics = step_fn(params, opt_state, images, labels, augmentation)
    if log_every:
      for name, value in jax.device_get(metrics).items():
        sums[name] = sums.get(name, 0.0) + float(value)
      count += 1
      if (step + 1) % log_every == 0 or step + 1 == num_steps:
        if log is not None:
          log(step + 1, {n: v / count for n, v in sums.items()})
        sums, count = {}, 0
  return jax.device_get(params)


# ---------------------------------------------------------------------------- inference
@functools.lru_cache(maxsize=None)
def _predict_fn(config: SegmenterConfig) -> Callable:
  model = make_model(config)
  return jax.jit(lambda params, x: jnp.argmax(model.apply({"params": params}, x), -1
                                              ).astype(jnp.uint8))


def segment(params: Params, images: np.ndarray, config: SegmenterConfig = SegmenterConfig(),
            batch_size: int = 128) -> np.ndarray:
  """(B, S, S) or (B, S, S, 1) images in [0, 1] -> (B, S, S) uint8 canonical labels."""
  images = np.asarray(images, np.float32)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] != 1:
    raise ValueError(f"segment needs (B, S, S) or (B, S, S, 1) images, got {images.shape}")
  config.check_image_size(images.shape[1])
  fn = _predict_fn(config)
  out = []
  for i in range(0, len(images), batch_size):
    chunk = images[i:i + batch_size]
    if len(chunk) < batch_size and len(images) > batch_size:
      # One compiled shape for every chunk: pad the last one.
      padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk),) + chunk.shape[1:],
                                               np.float32)])
      out.append(np.asarray(fn(params, jnp.asarray(padded)))[:len(chunk)])
    else:
      out.append(np.asarray(fn(params, jnp.asarray(chunk))))
  if not out:
    return np.zeros(images.shape[:3], np.uint8)
  return np.concatenate(out)


def dice_scores(predicted: np.ndarray, target: np.ndarray) -> dict[str, float]:
  """Pooled Dice of each structure ("rv", "myo", "lv") and their "mean" (module docstring); a
  structure absent from both gives NaN and is left out of the mean."""
  predicted, target = np.asarray(predicted), np.asarray(target)
  if predicted.shape != target.shape:
    raise ValueError(f"predicted {predicted.shape} and target {target.shape} labels differ")
  out = {}
  for value, name in STRUCTURE_NAMES.items():
    p, t = predicted == value, target == value
    total = int(p.sum() + t.sum())
    out[name] = float(2.0 * np.sum(p & t) / total) if total else float("nan")
  finite = [v for v in out.values() if np.isfinite(v)]
  out["mean"] = float(np.mean(finite)) if finite else float("nan")
  return out


# ------------------------------------------------------------------------------ storage
def save_segmenter(directory: str, params: Params, config: SegmenterConfig,
                   meta: dict[str, Any] | None = None) -> str:
  """Writes DIR/params.npz and DIR/segmenter.json (atomically); returns DIR."""
  os.makedirs(directory, exist_ok=True)
  flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
  io.write_npz(os.path.join(directory, PARAMS_FILE),
               **{k: np.asarray(v) for k, v in flat.items()})
  io.write_json(os.path.join(directory, META_FILE),
                {"config": dataclasses.asdict(config), **(meta or {})})
  return directory


def load_segmenter(directory: str) -> tuple[Params, SegmenterConfig, dict[str, Any]]:
  """(params, config, metadata) written by `save_segmenter`."""
  path, meta_path = os.path.join(directory, PARAMS_FILE), os.path.join(directory, META_FILE)
  for p in (path, meta_path):
    if not os.path.exists(p):
      raise FileNotFoundError(f"{p} not found: {directory} holds no saved segmenter")
  with open(meta_path, encoding="utf-8") as f:
    meta = json.load(f)
  if "config" not in meta:
    raise ValueError(f"{meta_path} has no 'config' field")
  config = SegmenterConfig(**meta.pop("config"))
  with np.load(path) as data:
    params = traverse_util.unflatten_dict({k: jnp.asarray(data[k]) for k in data.files},
                                          sep="/")
  return params, config, meta


@dataclasses.dataclass
class TrainedSegmenter:
  """A segmenter's parameters, SegmenterConfig and metadata (segmenter.json); `trained`: made
  by this `load_or_train` call rather than loaded."""
  params: Params
  config: SegmenterConfig
  meta: dict[str, Any]
  trained: bool = False

  def segment(self, images: np.ndarray) -> np.ndarray:
    """(..., S, S) images in [0, 1] -> (..., S, S) uint8 canonical labels."""
    images = np.asarray(images, np.float32)
    flat = images.reshape((-1,) + images.shape[-2:])
    return segment(self.params, flat, self.config).reshape(images.shape)


def load_or_train(directory: str, train: Callable[[], TrainedSegmenter | None], *,
                  wanted: dict[str, Any] | None = None, retrain: bool = False,
                  check: Callable[[dict[str, Any]], None] | None = None,
                  log: Callable[[str], None] | None = None) -> TrainedSegmenter | None:
  """The segmenter saved in `directory` when both its files are there, `retrain` is off and its
  metadata holds every item of `wanted`; else `train()`, saved to `directory` (None, and
  nothing saved, when `train` returns None: nothing to train on). `check(meta)` may refuse a
  saved segmenter by raising (e.g. one made for another image size)."""
  saved = all(os.path.exists(os.path.join(directory, name)) for name in (PARAMS_FILE, META_FILE))
  if saved and not retrain:
    params, config, meta = load_segmenter(directory)
    if check is not None:
      check(meta)
    if all(meta.get(k) == v for k, v in (wanted or {}).items()):
      return TrainedSegmenter(params, config, meta)
    if log is not None:
      log(f"{directory} was trained for other data or settings: training again")
  made = train()
  if made is None:
    return None
  save_segmenter(directory, made.params, made.config, made.meta)
  return dataclasses.replace(made, trained=True)
