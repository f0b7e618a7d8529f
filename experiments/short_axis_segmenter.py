"""The segmenter of generated short-axis slices that `experiments.directions` measures with.

A small U-Net (`cardiac_jax.segmenter`) trained on a run's prepared training split (image and
label channel `direction_scoring.CHANNEL`, the run's augmentation), kept in a folder and reused
(`segmenter.load_or_train`). Its metadata holds its pooled Dice on the val split (the test
split when there is none), the agreement of every factor measured on its predictions with the
factor on the true labels (`direction_scoring.segmenter_quality`), and the spread and pairwise
correlation of the factors over the cohort as the model saw it, the true labels of augmented
training batches (`cohort_factors`). `settings` is the directions command's Settings (the
segmenter_* fields, retrain_segmenter and seed).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from cardiac_jax import direction_scoring as scoring
from experiments import common

CHANNEL = scoring.CHANNEL


def _split_or_none(config, split: str, directory: str):
  from data_pipelines import errors
  try:
    return common.split_source(config, split, directory)
  except errors.InvalidInputError:
    return None


def _labelled_arrays(batches) -> tuple[Any, Any]:
  """Stacked (N, S, S, 1) images and (N, S, S) labels of channel CHANNEL of pipeline batches."""
  import numpy as np
  from cardiac_jax import segmenter
  pairs = [segmenter.image_label_pair(b, CHANNEL) for b in batches]
  return (np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs]))


def cohort_factors(config, source, num_examples: int = 512, seed: int = 0,
                   ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
  """(spread, correlation) of the factors over the true labels of augmented training batches,
  the cohort as the generative model saw it (`direction_scoring.cohort_factor_statistics`)."""
  import itertools
  from data_pipelines import pipeline
  batch_size = 32
  batches = pipeline.train_batches(source, config.data, global_batch_size=batch_size,
                                   seed=seed + 1)
  try:
    images, labels = _labelled_arrays(itertools.islice(batches, -(-num_examples // batch_size)))
  finally:
    batches.close()
  return scoring.cohort_factor_statistics(labels, images[..., 0])


def train_segmenter(config, settings, log: Callable[[str], None]):
  """A segmenter trained on the run's training split and evaluated on the val split (the test
  split when there is no val split), with the cohort's factor statistics in its metadata."""
  from cardiac_jax import segmenter
  from data_pipelines import pipeline
  image_size = int(config.data.image_size)
  seg_config = segmenter.SegmenterConfig(channels=tuple(settings.segmenter_channels),
                                         augment=settings.segmenter_augment)
  seg_config.check_image_size(image_size)
  directory = common.prepared_dir(config)
  train = common.split_source(config, "train", directory)
  log(f"training the segmenter for {settings.segmenter_steps} steps on {len(train)} slices")
  batches = pipeline.train_batches(train, config.data,
                                   global_batch_size=settings.segmenter_batch_size,
                                   seed=settings.seed)
  start = time.time()
  try:
    params = segmenter.train_segmenter(
        batches, settings.segmenter_steps, [settings.seed, 7],
        seg_config, channel=CHANNEL, log_every=max(1, settings.segmenter_steps // 10),
        log=lambda step, m: log(f"segmenter step {step}: loss {m['loss']:.4f}, pixel accuracy "
                                f"{m['accuracy']:.4f}"))
  finally:
    batches.close()
  seconds = time.time() - start
  split = "val"
  held_out = _split_or_none(config, "val", directory)
  if held_out is None or len(held_out) == 0:
    split, held_out = "test", _split_or_none(config, "test", directory)
  if held_out is None or len(held_out) == 0:
    split, held_out = "train", train
  images, labels = _labelled_arrays(
      pipeline.eval_batches(held_out, config.data, batch_size=32))
  quality = scoring.segmenter_quality(params, seg_config, images, labels)
  quality["split"] = split
  p = config.data.prepare
  spread, correlation = cohort_factors(config, train, seed=settings.seed)
  meta = {"image_size": image_size, "num_steps": settings.segmenter_steps,
          "batch_size": settings.segmenter_batch_size, "seed": settings.seed,
          "train_examples": len(train), "train_seconds": round(seconds, 1), "quality": quality,
          "mm_per_pixel": float(p.spacing_mm) * int(p.image_size) / image_size,
          "cohort_spread": {k: scoring.finite_or_none(v) for k, v in spread.items()},
          "cohort_correlation": correlation,
          "cohort_spread_source": "true labels of augmented training batches"}
  return segmenter.TrainedSegmenter(params, seg_config, meta)


def prepare_segmenter(config, out_dir: str, settings, log: Callable[[str], None]):
  """(params, SegmenterConfig, metadata) of the run's segmenter in `out_dir`
  (`segmenter.load_or_train`): loaded when saved there (and made for this image size), else
  trained (`train_segmenter`) and saved."""
  from cardiac_jax import segmenter
  image_size = int(config.data.image_size)

  def check(meta):
    if int(meta.get("image_size", -1)) != image_size:
      raise ValueError(f"{out_dir}: the saved segmenter is for {meta.get('image_size')} px "
                       f"images, the run makes {image_size} px; use --retrain_segmenter")

  seg = segmenter.load_or_train(out_dir, lambda: train_segmenter(config, settings, log),
                                retrain=settings.retrain_segmenter, check=check)
  params, seg_config, meta = seg.params, seg.config, seg.meta
  quality = meta.get("quality", {})
  if seg.trained:
    log(f"segmenter: {quality['split']} Dice {quality['dice']['mean']:.3f} (RV "
        f"{quality['dice']['rv']:.3f}, MYO {quality['dice']['myo']:.3f}, LV "
        f"{quality['dice']['lv']:.3f}); saved to {out_dir}")
    return params, seg_config, meta
  if "cohort_correlation" not in meta:  # Saved before the correlations were recorded.
    train = common.split_source(config, "train")
    meta["cohort_correlation"] = cohort_factors(config, train, seed=int(meta.get(
        "seed", settings.seed)))[1]
    segmenter.save_segmenter(out_dir, params, seg_config, meta)
  log(f"segmenter reused from {out_dir} ({quality.get('split')} Dice "
      f"{scoring.format_value(quality.get('dice', {}).get('mean'), '.3f')})")
  return params, seg_config, meta
