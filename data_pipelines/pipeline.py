"""The tf.data input pipeline: prepared examples -> deterministic, per-process numpy batches.

Reads any random-access source of prepared examples (schema: `data_pipelines.features`), e.g.
`builder.as_data_source(split)` of a prepared tensorflow-datasets dataset (array_record) or a
Python list of example dicts, and turns it into batches for training and evaluation. Training
runs are resumable and data-parallel over hosts, so every training batch is a pure function of
(seed, global step): nothing depends on how many batches were read before, on the process
count, or on thread timing.

Training order. The N examples are visited in epochs; epoch e is the permutation drawn by
`numpy.random.default_rng([seed, 0, e])`. The epoch permutations are concatenated into one
infinite stream and global batch k is positions [k*B, (k+1)*B) of that stream, so batches cross
epoch boundaries seamlessly and nothing is dropped. A run restarted at step k computes these
positions directly (`train_batch_indices`), it never replays the first k batches.

Augmentation (training only): a random integer translation of up to `max_shift_px` pixels per axis
with zero fill, a random zoom about the image centre with probability `zoom_prob` and factor in
`zoom_range` (the AR-SIVAE ACDC code: 0.9-1.1, p 0.1), and an optional horizontal flip. All random
numbers of global batch k come from `numpy.random.default_rng([seed, 1, k])` as (B, ...) arrays; row
r of those arrays belongs to position r of the global batch. Each process computes the whole global
batch's draws and keeps its own rows, so the P per-process batches concatenated are bit-for-bit the
single-process batch. Image and label are warped by the same affine map in one op (bilinear for the
image, nearest for the label), so they stay aligned; integer shifts and flips are exact.

Pipeline stages (all on the host CPU; TensorFlow is kept off accelerators):
  counter of batch numbers -> parallel map: fetch the rows of one batch from the source through
  `tf.numpy_function` (a batched `__getitems__` where the source has one) -> parallel map:
  resize, augment, mask background (TF image ops on the whole batch) -> prefetch -> numpy.
Fetching whole index batches is faster than a per-example parallel map followed by batching
(measured with `measure_throughput`: docs/implementation_notes.md).

Data config fields read (an `ml_collections.ConfigDict`, attribute access):
  image_size:      int, side of the square output images. Stored examples of another size are
                   resized: area averaging when shrinking, bilinear when enlarging images,
                   nearest neighbour for labels.
  channels:        tuple of "ed"/"es" (no repeats): which stored channels become the image and
                   label channels, in this order.
  attributes:      tuple of attribute names (keys of the stored `attributes` dict), giving the
                   columns of the (B, A) attribute array in this order.
  mask_background: bool. Set image intensities to 0 wherever the label of the same channel is
                   background, as the AR-SIVAE ACDC code does. Applied after resizing and
                   augmentation, so image == 0 wherever label == 0 holds exactly in every batch.
  augment.max_shift_px: int >= 0, largest translation along each axis (training only).
  augment.zoom_prob:    probability in [0, 1] of a zoom (training only).
  augment.zoom_range:   (low, high) zoom factors, 0 < low <= high; > 1 magnifies.
  augment.flip_prob:    probability in [0, 1] of a horizontal flip (training only).

Batches are dicts of numpy arrays (b = rows of this process, b = B / P):
  image       float32 (b, H, W, C) in [0, 1], C = len(channels)
  label       uint8   (b, H, W, C) canonical labels (`cardiac_jax.structures`)
  attributes  float32 (b, A)
  group       int32   (b,) index into `cardiac_jax.structures.GROUPS`
  subject     numpy unicode str array (b,), host-side only; never send it to devices
  index       int64   (b,) example index in the source
  mask        bool    (b,) evaluation batches only: False on padding rows.
Evaluation batches are always full (one shape for a jitted eval step): the last global batch is
padded with rows of zeros, index -1 and subject "" whose mask is False.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import ml_collections
import numpy as np
import tensorflow as tf

from data_pipelines import features


def _keep_tensorflow_off_accelerators() -> None:
  """Hides GPUs from TensorFlow so that they stay entirely JAX's."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError):
    # RuntimeError: TF already initialised its devices in this process (someone else chose);
    # ValueError: a TF build without this device type. Either way there is nothing to hide.
    pass


_keep_tensorflow_off_accelerators()

# Stream tags in the numpy seeds, so the epoch permutations and the augmentation draws of the
# same seed are independent streams.
_PERMUTATION_STREAM = 0
_AUGMENT_STREAM = 1

# Number of entries in one row of the TF projective transform ([a0 a1 a2 b0 b1 b2 c0 c1]).
_TRANSFORM_SIZE = 8


class RandomAccessSource(Protocol):
  """What the pipeline reads: len() and example dicts by index (tfds data source, list)."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> Mapping[str, Any]:
    ...


@dataclasses.dataclass(frozen=True)
class _Layout:
  """What the pipeline needs to know about the source and the config, validated once."""
  num_examples: int
  stored_size: int
  image_size: int
  channel_indices: tuple[int, ...]
  attribute_names: tuple[str, ...]
  mask_background: bool


@dataclasses.dataclass(frozen=True)
class Augment:
  """The validated `augment` section of the data config (training only)."""
  max_shift_px: int
  zoom_prob: float
  zoom_range: tuple[float, float]
  flip_prob: float

  @property
  def is_identity(self) -> bool:
    return self.max_shift_px == 0 and self.zoom_prob == 0.0 and self.flip_prob == 0.0


# ----------------------------------------------------------------------------------------------
# Config and source validation.
# ----------------------------------------------------------------------------------------------


def _config_field(data_config: ml_collections.ConfigDict, dotted_name: str) -> Any:
  value = data_config
  for part in dotted_name.split("."):
    try:
      value = getattr(value, part)
    except AttributeError:
      raise ValueError(f"data config has no field {dotted_name!r}; the pipeline reads "
                       "image_size, channels, attributes, mask_background and augment."
                       "{max_shift_px, zoom_prob, zoom_range, flip_prob}") from None
  return value


def _non_negative_int(value: Any, what: str) -> int:
  try:
    number = operator.index(value)
  except TypeError:
    raise ValueError(f"{what} must be an integer, got {value!r}") from None
  if number < 0:
    raise ValueError(f"{what} must be >= 0, got {number}")
  return number


def _probability(value: Any, what: str) -> float:
  number = float(value)
  if not 0.0 <= number <= 1.0:
    raise ValueError(f"{what} must be a probability in [0, 1], got {value!r}")
  return number


def _read_layout(source: RandomAccessSource,
                 data_config: ml_collections.ConfigDict) -> _Layout:
  """Checks the config against the source's first example."""
  num_examples = len(source)
  if num_examples == 0:
    raise ValueError(f"the source {type(source).__name__} is empty: nothing to batch "
                     "(check the split name and the prepared dataset directory)")

  image_size = _non_negative_int(_config_field(data_config, "image_size"), "image_size")
  if image_size == 0:
    raise ValueError("image_size must be positive")

  channels = _config_field(data_config, "channels")
  if isinstance(channels, str) or not isinstance(channels, Sequence):
    raise ValueError(f"channels must be a tuple of names from {features.CHANNELS}, e.g. "
                     f"('ed',), got {channels!r}")
  unknown = [c for c in channels if c not in features.CHANNELS]
  if not channels or unknown or len(set(channels)) != len(channels):
    raise ValueError(f"channels must be a non-empty subset of {features.CHANNELS} without "
                     f"repeats, got {tuple(channels)!r}")
  channel_indices = tuple(features.CHANNELS.index(c) for c in channels)

  first = source[0]
  stored_image = np.asarray(first["image"])
  stored_shape = stored_image.shape
  if (stored_image.ndim != 3 or stored_shape[0] != stored_shape[1]
      or stored_shape[2] != len(features.CHANNELS)):
    raise ValueError(f"example 0 of the source has image shape {stored_shape}; expected "
                     f"(S, S, {len(features.CHANNELS)}) with channels {features.CHANNELS}")

  attribute_names = tuple(_config_field(data_config, "attributes"))
  available = tuple(first["attributes"].keys())
  missing = [name for name in attribute_names if name not in available]
  if missing:
    raise ValueError(f"unknown attribute names {missing} in data config 'attributes'; the "
                     f"source provides {sorted(available)}")

  return _Layout(
      num_examples=num_examples,
      stored_size=int(stored_shape[0]),
      image_size=image_size,
      channel_indices=channel_indices,
      attribute_names=attribute_names,
      mask_background=bool(_config_field(data_config, "mask_background")))


def read_augment(data_config: ml_collections.ConfigDict) -> Augment:
  """The `augment` section of `data_config`, validated (ValueError naming the bad field)."""
  zoom_range = tuple(float(v) for v in _config_field(data_config, "augment.zoom_range"))
  if len(zoom_range) != 2 or not 0.0 < zoom_range[0] <= zoom_range[1]:
    raise ValueError(f"augment.zoom_range must be (low, high) with 0 < low <= high, got "
                     f"{zoom_range!r}")
  return Augment(
      max_shift_px=_non_negative_int(_config_field(data_config, "augment.max_shift_px"),
                                     "augment.max_shift_px"),
      zoom_prob=_probability(_config_field(data_config, "augment.zoom_prob"),
                             "augment.zoom_prob"),
      zoom_range=zoom_range,
      flip_prob=_probability(_config_field(data_config, "augment.flip_prob"),
                             "augment.flip_prob"))


def process_rows(global_batch_size: int, process_index: int, process_count: int,
                 what: str) -> slice:
  """Rows [p*B/P, (p+1)*B/P) of the global batch that process p receives."""
  if operator.index(global_batch_size) <= 0:
    raise ValueError(f"{what} must be positive, got {global_batch_size}")
  if operator.index(process_count) <= 0:
    raise ValueError(f"process_count must be positive, got {process_count}")
  if not 0 <= operator.index(process_index) < process_count:
    raise ValueError(f"process_index {process_index} is outside [0, {process_count})")
  if global_batch_size % process_count:
    raise ValueError(f"{what} {global_batch_size} is not divisible by process_count "
                     f"{process_count}: every process must receive the same number of rows")
  rows = global_batch_size // process_count
  return slice(process_index * rows, (process_index + 1) * rows)


# ----------------------------------------------------------------------------------------------
# Index schedule and augmentation parameters (numpy, pure functions of the seed and the step).
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  permutation = np.random.default_rng([seed, _PERMUTATION_STREAM, epoch]).permutation(
      num_examples)
  permutation.flags.writeable = False  # shared by the cache
  return permutation


def train_batch_indices(num_examples: int, *, global_batch_size: int, seed: int,
                        step: int) -> np.ndarray:
  """Source indices of global training batch `step`: (B,) int64.

  Positions [step*B, (step+1)*B) of the concatenation of the epoch permutations; computed
  directly, so the cost does not grow with `step`.
  """
  if num_examples <= 0 or global_batch_size <= 0:
    raise ValueError(f"num_examples ({num_examples}) and global_batch_size "
                     f"({global_batch_size}) must be positive")
  seed = _non_negative_int(seed, "seed")
  step = _non_negative_int(step, "step")
  positions = step * global_batch_size + np.arange(global_batch_size, dtype=np.int64)
  epochs, offsets = np.divmod(positions, num_examples)
  indices = np.empty(global_batch_size, np.int64)
  # A batch spans one epoch, two at a boundary, more only when B > N.
  for epoch in np.unique(epochs):
    in_epoch = epochs == epoch
    indices[in_epoch] = _epoch_permutation(num_examples, seed, int(epoch))[offsets[in_epoch]]
  return indices


def augment_transforms(augment: Augment, *, seed: int, step: int, global_batch_size: int,
                       image_size: int) -> np.ndarray:
  """Output-to-input affine maps of the whole global batch `step`: (B, 8) float32.

  Forward map of one example: flip x -> 2c - x (optional), zoom about the centre c by s,
  translate by (dx, dy). Its inverse, the sampling map TF's projective transform wants, is
  x_in = c + f (x_out - dx - c) / s, y_in = c + (y_out - dy - c) / s with f = -1 when flipped.
  """
  rng = np.random.default_rng([seed, _AUGMENT_STREAM, step])
  shifts = rng.integers(-augment.max_shift_px, augment.max_shift_px, size=(global_batch_size, 2),
                        endpoint=True).astype(np.float64)
  zoom_draws = rng.random(global_batch_size)
  zoom_factors = rng.uniform(*augment.zoom_range, size=global_batch_size)
  flip_draws = rng.random(global_batch_size)

  scale = np.where(zoom_draws < augment.zoom_prob, zoom_factors, 1.0)
  sign = np.where(flip_draws < augment.flip_prob, -1.0, 1.0)
  centre = (image_size - 1) / 2.0
  dx, dy = shifts[:, 0], shifts[:, 1]
  transforms = np.zeros((global_batch_size, _TRANSFORM_SIZE), np.float64)
  transforms[:, 0] = sign / scale
  transforms[:, 2] = centre - sign * (dx + centre) / scale
  transforms[:, 4] = 1.0 / scale
  transforms[:, 5] = centre - (dy + centre) / scale
  return transforms.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Fetching rows from the source.
# ----------------------------------------------------------------------------------------------


def _fetch(source: RandomAccessSource, indices: list[int]) -> Sequence[Mapping[str, Any]]:
  # tfds data sources read a whole batch of records in one call (parallel file reads).
  if hasattr(source, "__getitems__"):
    return source.__getitems__(indices)
  return [source[i] for i in indices]


def _load_rows(source: RandomAccessSource, layout: _Layout,
               indices: np.ndarray) -> dict[str, np.ndarray]:
  """Reads the examples at `indices` (b,); rows with index -1 stay zero (padding)."""
  rows = len(indices)
  size, num_channels = layout.stored_size, len(layout.channel_indices)
  batch = {
      "image": np.zeros((rows, size, size, num_channels), np.float32),
      "label": np.zeros((rows, size, size, num_channels), np.uint8),
      "attributes": np.zeros((rows, len(layout.attribute_names)), np.float32),
      "group": np.zeros((rows,), np.int32),
      "subject": np.full((rows,), b"", dtype=object),
      "index": indices.astype(np.int64),
  }
  valid_rows = np.flatnonzero(indices >= 0)
  examples = _fetch(source, [int(i) for i in indices[valid_rows]])
  for row, example in zip(valid_rows, examples):
    image, label = np.asarray(example["image"]), np.asarray(example["label"])
    expected = (size, size, len(features.CHANNELS))
    if image.shape != expected or label.shape != expected:
      raise ValueError(f"example {indices[row]} of the source has image {image.shape} and "
                       f"label {label.shape}; every example must be {expected} like example 0")
    # One strided copy per channel: a fancy-indexed image[..., channels] would first build a
    # temporary copy, which made this loop several times slower.
    for out_channel, stored_channel in enumerate(layout.channel_indices):
      batch["image"][row, ..., out_channel] = image[..., stored_channel]
      batch["label"][row, ..., out_channel] = label[..., stored_channel]
    attributes = example["attributes"]
    batch["attributes"][row] = [attributes[name] for name in layout.attribute_names]
    batch["group"][row] = example["group"]
    subject = example["subject"]
    batch["subject"][row] = subject.encode("utf-8") if isinstance(subject, str) else subject
  return batch


# ----------------------------------------------------------------------------------------------
# TensorFlow stages.
# ----------------------------------------------------------------------------------------------


def _resize(image: tf.Tensor, label: tf.Tensor, from_size: int,
            to_size: int) -> tuple[tf.Tensor, tf.Tensor]:
  """(b, S, S, C) -> (b, to_size, to_size, C); area averaging avoids aliasing on shrinking."""
  method = "area" if to_size < from_size else "bilinear"
  image = tf.image.resize(image, (to_size, to_size), method=method)
  label = tf.image.resize(label, (to_size, to_size), method="nearest")
  return image, label


def _warp(image: tf.Tensor, label: tf.Tensor,
          transforms: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Applies each row's sampling map to image (bilinear) and label (nearest), zero fill."""
  output_shape = tf.shape(image)[1:3]

  def warp(x, interpolation):
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=x, transforms=transforms, output_shape=output_shape,
        fill_value=tf.constant(0.0, tf.float32), interpolation=interpolation,
        fill_mode="CONSTANT")

  return warp(image, "BILINEAR"), warp(label, "NEAREST")


def numpy_batches(keys: tf.data.Dataset, load: Callable[[int], dict[str, np.ndarray]],
                  signature: Mapping[str, tuple[tf.DType, tuple[int, ...]]],
                  transform: Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]],
                  ) -> Iterator[dict[str, np.ndarray]]:
  """keys -> load (numpy, parallel) -> transform (TF, parallel) -> prefetch -> numpy batches.

  `load(key)` returns one batch as a dict with at least the fields of `signature` (name ->
  (dtype, shape)); it runs once per key, in tf.data's parallel map. The "subject" field
  (tf.string) comes back as a str array. Shared by the slice and the cine pipelines.
  """
  names = tuple(signature)

  def load_tuple(key):
    batch = load(int(key))  # Once per batch, then its fields in signature order.
    return tuple(batch[name] for name in names)

  def load_op(key):
    tensors = tf.numpy_function(load_tuple, [key], [signature[n][0] for n in names])
    return {n: tf.ensure_shape(t, signature[n][1]) for n, t in zip(names, tensors)}

  dataset = (keys
             .map(load_op, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
             .map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
             .prefetch(tf.data.AUTOTUNE))
  for batch in dataset.as_numpy_iterator():
    batch["subject"] = np.asarray([s.decode("utf-8") for s in batch["subject"]], dtype=str)
    yield batch


def _batches(keys: tf.data.Dataset, load: Callable[[int], dict[str, np.ndarray]],
             signature: Mapping[str, tuple[tf.DType, tuple[int, ...]]],
             layout: _Layout) -> Iterator[dict[str, np.ndarray]]:
  """Slice batches: `numpy_batches` with resize/warp/mask (TF) as the transform."""

  def transform_op(batch):
    image, label = batch.pop("image"), batch.pop("label")
    if layout.stored_size != layout.image_size:
      image, label = _resize(image, label, layout.stored_size, layout.image_size)
    if "transforms" in batch:
      image, label = _warp(image, label, batch.pop("transforms"))
    if layout.mask_background:
      # A multiply by the heart mask: same result as tf.where here (intensities are finite),
      # several times faster on the CPU.
      image = image * tf.cast(label > 0, image.dtype)
    return {"image": image, "label": label, **batch}

  return numpy_batches(keys, load, signature, transform_op)


def _signature(layout: _Layout, rows: int) -> dict[str, tuple[tf.DType, tuple[int, ...]]]:
  size, num_channels = layout.stored_size, len(layout.channel_indices)
  return {
      "image": (tf.float32, (rows, size, size, num_channels)),
      "label": (tf.uint8, (rows, size, size, num_channels)),
      "attributes": (tf.float32, (rows, len(layout.attribute_names))),
      "group": (tf.int32, (rows,)),
      "subject": (tf.string, (rows,)),
      "index": (tf.int64, (rows,)),
  }


# ----------------------------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------------------------


def train_batches(source: RandomAccessSource, data_config: ml_collections.ConfigDict, *,
                  global_batch_size: int, seed: int, start_step: int = 0,
                  process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Infinite augmented training batches of this process, from global step `start_step` on.

  The batch at global step k is a pure function of (seed, k); process p of P gets rows
  [p*B/P, (p+1)*B/P) of it, so image is (B/P, H, W, C). See the module docstring.

  Raises:
    ValueError: empty source, bad config (unknown attribute, channel), B not divisible by P.
  """
  layout = _read_layout(source, data_config)
  augment = read_augment(data_config)
  rows = process_rows(global_batch_size, process_index, process_count, "global_batch_size")
  seed = _non_negative_int(seed, "seed")
  start_step = _non_negative_int(start_step, "start_step")

  def load(step: int) -> dict[str, np.ndarray]:
    indices = train_batch_indices(layout.num_examples, global_batch_size=global_batch_size,
                                  seed=seed, step=step)
    batch = _load_rows(source, layout, indices[rows])
    if not augment.is_identity:
      batch["transforms"] = augment_transforms(
          augment, seed=seed, step=step, global_batch_size=global_batch_size,
          image_size=layout.image_size)[rows]
    return batch

  signature = _signature(layout, rows.stop - rows.start)
  if not augment.is_identity:
    signature["transforms"] = (tf.float32, (rows.stop - rows.start, _TRANSFORM_SIZE))
  steps = tf.data.Dataset.counter(start=start_step, dtype=tf.int64)
  return _batches(steps, load, signature, layout)


def eval_batches(source: RandomAccessSource, data_config: ml_collections.ConfigDict, *,
                 batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """One pass over the source in index order, without augmentation.

  `batch_size` is global: global batch j holds indices [j*B, (j+1)*B) and process p gets rows
  [p*B/P, (p+1)*B/P) of it. There are ceil(N / B) batches on every process, all full-sized; rows
  past the end are zero padding with `mask` False, index -1 and subject "".
  """
  layout = _read_layout(source, data_config)
  rows = process_rows(batch_size, process_index, process_count, "batch_size")
  return padded_batches(
      layout.num_examples, batch_size, rows, lambda indices: _load_rows(source, layout, indices),
      _signature(layout, rows.stop - rows.start),
      lambda keys, load, signature: _batches(keys, load, signature, layout))


def padded_batches(num_examples: int, batch_size: int, rows: slice,
                   load_rows: Callable[[np.ndarray], dict[str, np.ndarray]],
                   signature: Mapping[str, tuple[tf.DType, tuple[int, ...]]],
                   batches: Callable[..., Iterator[dict[str, np.ndarray]]],
                   ) -> Iterator[dict[str, np.ndarray]]:
  """The evaluation pass of the slice and the cine pipelines: ceil(N / B) global batches of
  indices [j*B, (j+1)*B), this process's `rows` of each, indices past the end -1 (padding).

  `load_rows(indices)` returns the rows' fields (`signature`, with "index"); a "mask" field
  (index >= 0) is added. `batches(keys, load, signature)` runs the pipeline over the batch
  numbers.
  """
  num_batches = math.ceil(num_examples / batch_size)

  def load(batch_number: int) -> dict[str, np.ndarray]:
    indices = batch_number * batch_size + np.arange(batch_size, dtype=np.int64)
    indices[indices >= num_examples] = -1
    batch = load_rows(indices[rows])
    batch["mask"] = batch["index"] >= 0
    return batch

  signature = {**signature, "mask": (tf.bool, (rows.stop - rows.start,))}
  return batches(tf.data.Dataset.range(num_batches), load, signature)


def measure_throughput(source: RandomAccessSource, data_config: ml_collections.ConfigDict, *,
                       global_batch_size: int, num_batches: int,
                       seed: int = 0) -> dict[str, float]:
  """Speed of the single-process training iterator alone, after one warm-up batch.

  Returns samples_per_sec, batches_per_sec, seconds (for `num_batches` batches) and the
  batch size and count measured.
  """
  if num_batches <= 0:
    raise ValueError(f"num_batches must be positive, got {num_batches}")
  batches = train_batches(source, data_config, global_batch_size=global_batch_size, seed=seed)
  next(batches)  # tracing, thread pools and the first fetch are not throughput
  start = time.perf_counter()
  for _ in range(num_batches):
    next(batches)
  seconds = time.perf_counter() - start
  return {
      "samples_per_sec": num_batches * global_batch_size / seconds,
      "batches_per_sec": num_batches / seconds,
      "seconds": seconds,
      "global_batch_size": float(global_batch_size),
      "num_batches": float(num_batches),
  }
