"""A segmenter of 4-chamber cine frames, to measure the chambers of decoded cines.

`load_or_train(config, workdir)` trains `cardiac_jax.segmenter`'s U-Net with the six 4-chamber
classes (0 background, 1 RV, 2 LV myocardium, 3 LV blood pool, 4 LA, 5 RA) on every frame of
the training split of a run's prepared cine (la_image mapped to [0, 1] by (x + 1) / 2, la_label,
both at the model's data.image_size, as the batches serve them), scores it on the validation
split's frames (Dice of RV, myocardium and LV; the mean absolute error of the LV blood-pool area
per frame, in % of the true area) and keeps it in DIR/segmenter_la_4ch/ (params.npz,
segmenter.json). A later call with the same prepared data, size, steps and seed loads it.
Training draws minibatches of `batch_size` frames with one numpy generator seeded by `seed`, and
the segmenter's own augmentation (8 flips/rotations, intensity scale, noise) keeps it from
depending on the exact contrast of real frames, which a decoder changes slightly.

Returns None when the prepared cine holds no 4-chamber labels (la_label all 0, e.g. UK Biobank
folders without 4-chamber segmentations) or no la_image.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

SEGMENTER_DIR = "segmenter_la_4ch"
DEFAULT_STEPS = 1500
DEFAULT_BATCH_SIZE = 32
CHANNELS = (16, 32, 64)
FIELDS = ("la_image", "la_label")


def split_frames(config, source) -> tuple[np.ndarray, np.ndarray]:
  """((N T, S, S) float32 frames on [0, 1], (N T, S, S) int32 labels) of a prepared split
  (`prepare.load_split`) at the model's image size; empty arrays when the split is empty."""
  from data_pipelines import cine  # pylint: disable=g-import-not-at-top
  size = int(config.data.image_size)
  if len(source) == 0:
    return np.zeros((0, size, size), np.float32), np.zeros((0, size, size), np.int32)
  images, labels = [], []
  for batch in cine.eval_batches(source, config.data, batch_size=8, fields=FIELDS):
    keep = np.asarray(batch["mask"], bool)
    images.append((np.asarray(batch["la_image"])[keep, ..., 0] + 1.0) / 2.0)
    labels.append(np.asarray(batch["la_label"])[keep, ..., 0])
  images, labels = np.concatenate(images), np.concatenate(labels)
  return (images.reshape((-1, size, size)).astype(np.float32),
          labels.reshape((-1, size, size)).astype(np.int32))


def load_or_train(config, workdir: str, steps: int = DEFAULT_STEPS,
                  batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0,
                  directory: Optional[str] = None):
  """The 4-chamber segmenter of a run (module docstring; `segmenter.load_or_train`), a
  `segmenter.TrainedSegmenter`; None without 4-chamber labels."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from cardiac_jax import segmenter, structures  # pylint: disable=g-import-not-at-top
  from data_pipelines import cine, prepare  # pylint: disable=g-import-not-at-top
  directory = directory or cine.prepared_cine_dir(config, create=False)
  wanted = {"prepared_dir": os.path.basename(os.path.normpath(directory)),
            "image_size": int(config.data.image_size), "num_steps": int(steps),
            "batch_size": int(batch_size), "seed": int(seed)}

  def train():
    train_split = prepare.load_split(directory, "train")
    if len(train_split) == 0 or not set(FIELDS) <= set(train_split[0]):
      logging.warning("%s has no 4-chamber images or labels: no LV segmentation", directory)
      return None
    images, labels = split_frames(config, train_split)
    if not np.any(labels == structures.LV_BLOOD_POOL):
      logging.warning("%s: the 4-chamber labels are empty: no LV segmentation", directory)
      return None
    seg_config = segmenter.SegmenterConfig(channels=CHANNELS,
                                           num_classes=structures.NUM_LONG_AXIS_LABELS)
    rng = np.random.default_rng(seed)

    def batches():
      while True:
        rows = rng.integers(0, len(images), batch_size)
        yield {"image": images[rows, ..., None], "label": labels[rows, ..., None]}

    logging.info("training the 4-chamber segmenter on %d frames for %d steps", len(images),
                 steps)
    params = segmenter.train_segmenter(batches(), steps, int(rng.integers(2 ** 31)), seg_config)
    trained = segmenter.TrainedSegmenter(params, seg_config,
                                         {**wanted, "num_train_frames": int(len(images))})
    val_images, val_labels = split_frames(config, prepare.load_split(directory, "val"))
    if len(val_images):
      predicted = trained.segment(val_images)
      true_area = np.sum(val_labels == structures.LV_BLOOD_POOL, axis=(1, 2))
      found_area = np.sum(predicted == structures.LV_BLOOD_POOL, axis=(1, 2))
      present = true_area > 0
      trained.meta.update(
          num_val_frames=int(len(val_images)),
          val_dice=segmenter.dice_scores(predicted, val_labels),
          val_lv_area_error_percent=(float(100.0 * np.mean(
              np.abs(found_area[present] - true_area[present]) / true_area[present]))
                                     if present.any() else None))
    return trained

  return segmenter.load_or_train(os.path.join(workdir, SEGMENTER_DIR), train, wanted=wanted,
                                 log=lambda message: logging.info("%s", message))
