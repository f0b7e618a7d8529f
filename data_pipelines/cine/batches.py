"""Deterministic cine batches (B, T, ...) of a prepared split, and the training loop's data source.

The training batch at global step k is a pure function of (config.seed, k), as on the slice path
(`pipeline.train_batch_indices`, `pipeline.augment_transforms`); process p of P keeps rows
[p B/P, (p+1) B/P).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Optional

import numpy as np
import tensorflow as tf

from data_pipelines import pipeline
from data_pipelines import prepare
from data_pipelines.cine.config import (ARRAY_FIELDS, LABEL_FIELDS, SCALAR_FIELDS,
                                        SYMMETRIC_IMAGE_FIELDS, data_field)
from data_pipelines.cine.prepared import prepared_cine_dir


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Stored shapes of the source's fields and the batch output size."""
  num_examples: int
  shapes: dict[str, tuple[int, ...]]
  dtypes: dict[str, np.dtype]
  stored_size: int
  image_size: int


def _read_layout(source, data_config, fields: Optional[Sequence[str]] = None) -> _Layout:
  """The layout of the batches of `fields` (None: every array field of the source)."""
  num_examples = len(source)
  if num_examples == 0:
    raise ValueError(f"the source {type(source).__name__} is empty: nothing to batch (check "
                     "the split name and the prepared dataset directory)")
  first = source[0]
  if "sa_image" not in first or np.ndim(first["sa_image"]) != 4:
    raise ValueError("example 0 of the source is not a prepared cine (no (T, S, S, 3) "
                     "sa_image); prepare it with data_pipelines.cine")
  present = [name for name in ARRAY_FIELDS if name in first]
  if fields is None:
    wanted = present
  else:
    unknown = sorted(set(fields) - set(present))
    if unknown:
      raise ValueError(f"the prepared cine has no field {unknown} (it has {present}); "
                       "prepare it with the long axis for la_image")
    wanted = [name for name in present if name in fields or name == "lv_volume_ml"]
  shapes, dtypes = {}, {}
  for name in wanted:
    array = np.asarray(first[name])
    shapes[name], dtypes[name] = array.shape, array.dtype
  image_size = int(data_field(data_config, "image_size"))
  if image_size <= 0:
    raise ValueError(f"data.image_size must be positive, got {image_size}")
  return _Layout(num_examples=num_examples, shapes=shapes, dtypes=dtypes,
                 stored_size=int(np.shape(first["sa_image"])[1]), image_size=image_size)


def _load_rows(source, layout: _Layout, indices: np.ndarray) -> dict[str, np.ndarray]:
  """Stacks the examples at `indices` (b,); rows with index -1 stay zero (padding)."""
  rows = len(indices)
  batch = {name: np.zeros((rows,) + shape, layout.dtypes[name])
           for name, shape in layout.shapes.items()}
  batch.update(group=np.zeros(rows, np.int32), subject=np.full(rows, b"", dtype=object),
               index=indices.astype(np.int64),
               **{name: np.zeros(rows, np.float32) for name in SCALAR_FIELDS})
  valid = np.flatnonzero(indices >= 0)
  fetch = getattr(source, "__getitems__", None)
  wanted = [int(i) for i in indices[valid]]
  examples = fetch(wanted) if fetch is not None else [source[i] for i in wanted]
  for row, example in zip(valid, examples):
    for name, shape in layout.shapes.items():
      value = np.asarray(example[name])
      if value.shape != shape:
        raise ValueError(f"example {indices[row]} has {name} {value.shape}; every example must "
                         f"be {shape} like example 0")
      batch[name][row] = value
    for name in SCALAR_FIELDS:
      batch[name][row] = example[name]
    batch["group"][row] = example["group"]
    subject = example["subject"]
    batch["subject"][row] = subject.encode("utf-8") if isinstance(subject, str) else subject
  return batch


def _signature(layout: _Layout, rows: int) -> dict[str, tuple[tf.DType, tuple[int, ...]]]:
  signature = {name: (tf.as_dtype(layout.dtypes[name]), (rows,) + shape)
               for name, shape in layout.shapes.items()}
  signature.update(group=(tf.int32, (rows,)), subject=(tf.string, (rows,)),
                   index=(tf.int64, (rows,)),
                   **{name: (tf.float32, (rows,)) for name in SCALAR_FIELDS})
  return signature


def _per_frame(x: tf.Tensor, fn) -> tf.Tensor:
  """Applies an image op on (b, S, S, T*C) to a (b, T, S, S, C) tensor, frames as channels."""
  b, t, s, _, c = x.shape
  y = fn(tf.reshape(tf.transpose(x, [0, 2, 3, 1, 4]), [b, s, s, t * c]))
  size = y.shape[1]
  return tf.transpose(tf.reshape(y, [b, size, size, t, c]), [0, 3, 1, 2, 4])


def _transform_op(batch: dict[str, tf.Tensor], layout: _Layout) -> dict[str, tf.Tensor]:
  """Images to float32, resize to the model size, augment (training), labels to int32."""
  transforms = batch.pop("transforms", None)
  size = layout.image_size
  # Resizing the crop (same field of view) changes its pixel size.
  batch["pixel_spacing_mm"] = batch["pixel_spacing_mm"] * (layout.stored_size / size)
  for name in layout.shapes:
    if name == "lv_volume_ml":
      continue
    is_label = name in LABEL_FIELDS
    if not is_label:
      batch[name] = tf.cast(batch[name], tf.float32)
    # [-1, 1] images are shifted by +1 around the warp so that shifted-in pixels get -1.
    offset = 1.0 if name in SYMMETRIC_IMAGE_FIELDS else 0.0

    def op(y, is_label=is_label, offset=offset):
      if size != layout.stored_size:
        method = "nearest" if is_label else ("area" if size < layout.stored_size
                                             else "bilinear")
        y = tf.image.resize(y, (size, size), method=method)
        y = tf.cast(y, tf.uint8) if is_label else y
      if transforms is not None:
        y = y + offset if offset else y
        y = tf.raw_ops.ImageProjectiveTransformV3(
            images=y, transforms=transforms, output_shape=tf.constant([size, size]),
            fill_value=tf.constant(0.0, tf.float32),
            interpolation="NEAREST" if is_label else "BILINEAR", fill_mode="CONSTANT")
        y = y - offset if offset else y
      return y

    if size != layout.stored_size or transforms is not None:
      batch[name] = _per_frame(batch[name], op)
    if is_label:
      batch[name] = tf.cast(batch[name], tf.int32)
  return batch


def _batches(keys: tf.data.Dataset, load, signature, layout: _Layout,
             ) -> Iterator[dict[str, np.ndarray]]:
  """Cine batches: `pipeline.numpy_batches` with resize/augment (TF) as the transform."""
  return pipeline.numpy_batches(keys, load, signature, lambda b: _transform_op(b, layout))


def train_batches(source, data_config, *, global_batch_size: int, seed: int,
                  start_step: int = 0, process_index: int = 0, process_count: int = 1,
                  fields: Optional[Sequence[str]] = None) -> Iterator[dict[str, np.ndarray]]:
  """Infinite augmented cine training batches of this process from global step `start_step`.

  Global batch k holds source indices `pipeline.train_batch_indices(N, B, seed, k)` with the
  augmentation maps `pipeline.augment_transforms(seed, k)` of data.augment (shift, zoom,
  flip; one map per sequence): a pure function of (seed, k). Process p of P gets rows
  [p B/P, (p+1) B/P). Fields: module docstring (sa_label int32, images float32); `fields`
  keeps only those array fields (and lv_volume_ml).
  """
  layout = _read_layout(source, data_config, fields)
  augment = pipeline.read_augment(data_config)
  rows = pipeline.process_rows(global_batch_size, process_index, process_count,
                               "global_batch_size")

  def load(step: int) -> dict[str, np.ndarray]:
    indices = pipeline.train_batch_indices(layout.num_examples,
                                           global_batch_size=global_batch_size, seed=seed,
                                           step=step)
    batch = _load_rows(source, layout, indices[rows])
    if not augment.is_identity:
      batch["transforms"] = pipeline.augment_transforms(
          augment, seed=seed, step=step, global_batch_size=global_batch_size,
          image_size=layout.image_size)[rows]
    return batch

  signature = _signature(layout, rows.stop - rows.start)
  if not augment.is_identity:
    signature["transforms"] = (tf.float32, (rows.stop - rows.start, 8))
  keys = tf.data.Dataset.counter(start=int(start_step), dtype=tf.int64)
  return _batches(keys, load, signature, layout)


def eval_batches(source, data_config, *, batch_size: int, process_index: int = 0,
                 process_count: int = 1,
                 fields: Optional[Sequence[str]] = None) -> Iterator[dict[str, np.ndarray]]:
  """One pass over the source in index order without augmentation; full-size batches whose
  rows past the end are zero padding with `mask` False, index -1 and subject ""."""
  layout = _read_layout(source, data_config, fields)
  rows = pipeline.process_rows(batch_size, process_index, process_count, "batch_size")
  return pipeline.padded_batches(
      layout.num_examples, batch_size, rows, lambda indices: _load_rows(source, layout, indices),
      _signature(layout, rows.stop - rows.start),
      lambda keys, load, signature: _batches(keys, load, signature, layout))


def make_data_source(config, *, process_index: Optional[int] = None,
                     process_count: Optional[int] = None,
                     fields: Optional[Sequence[str]] = None):
  """`cardiac_jax.training.DataSource` of this process for a cine config.

  Reads config.data (experiments/configs/cine_data.py), config.seed, config.train.batch_size
  (global) and config.train.eval_batch_size; the evaluation split is data.eval_split. The
  process index and count default to JAX's; `fields`: the array fields to serve (None: all).
  """
  from cardiac_jax.training import DataSource  # pylint: disable=g-import-not-at-top
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  directory = prepared_cine_dir(config)
  train = prepare.load_split(directory, "train")
  evaluation = prepare.load_split(directory, data_field(config.data, "eval_split"))
  process = dict(process_index=process_index, process_count=process_count, fields=fields)

  def train_iterator(start_step: int):
    return train_batches(train, config.data, global_batch_size=config.train.batch_size,
                         seed=config.seed, start_step=start_step, **process)

  def eval_iterator():
    return eval_batches(evaluation, config.data, batch_size=config.train.eval_batch_size,
                        **process)

  return DataSource(train_batches=train_iterator, eval_batches=eval_iterator)
