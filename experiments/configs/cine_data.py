"""The data section of cine experiments (temporal VAE-classifier, 3D diffusion autoencoder).

`get_data_config(**overrides)` returns a ConfigDict laid out like base.py's data section plus
the cine fields; data_pipelines.cine reads it (`make_data_source`, `prepared_cine_dir`).
`cine_config(name, **overrides)` is base.py's config with this section; `apply_smoke` sets the
cine sizes of the smoke variants.
Fields:
  format:          "cine" (experiments.common dispatches on it).
  dataset:         "synthetic" (the synthetic cohort with its 4-chamber view, generated once
                   into the cache), "ukbb" (converted UK Biobank folders in source_dir) or
                   "prepared" (prepared_dir used as it is).
  source_dir, prepared_dir, cache_dir: as in base.py ("" = derived / $CARDIAC_JAX_CACHE).
  synthetic.num_subjects, synthetic.seed: the synthetic cohort (shared with the slice data).
  view:            "la_4ch" (4-chamber cine, the DiffAE reference input) or "sa_mid"
                   (mid-ventricular short-axis cine).
  num_frames:      T, frames per cycle after temporal resampling from ED.
  prepare.image_size: S of the stored crops; prepare.spacing_mm: their in-plane spacing.
  prepare.split_seed: seed of the subject split; prepare.long_axis: store the 4-chamber view
                   (subjects without one are skipped); prepare.intensity_percentiles: window of
                   sa_image; prepare.heart_variance_fraction: threshold of the 4-chamber heart
                   mask (fraction of the mean temporal variance).
  image_size:      model input size (batches are resized from prepare.image_size).
  split:           subject-level (train, val, test) fractions (DiffAE: 0.6, 0.1, 0.3).
  eval_split:      split of the evaluation batches.
  augment.max_shift_px, augment.zoom_prob, augment.zoom_range, augment.flip_prob: training
                   augmentation as in base.py, one map per sequence.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from experiments.configs import base


def get_data_config(**overrides: Any) -> ml_collections.ConfigDict:
  """The cine data section; keyword overrides replace fields (nested sections take dicts).

  Raises:
    KeyError: an override names a field that does not exist.
  """
  c = ml_collections.ConfigDict()
  c.format = "cine"
  c.dataset = "synthetic"
  c.source_dir = ""
  c.prepared_dir = ""
  c.cache_dir = ""
  c.synthetic = ml_collections.ConfigDict()
  c.synthetic.num_subjects = 400
  c.synthetic.seed = 0
  c.view = "la_4ch"
  c.num_frames = 50
  c.prepare = ml_collections.ConfigDict()
  c.prepare.image_size = 80
  c.prepare.spacing_mm = 1.8
  c.prepare.split_seed = 0
  c.prepare.long_axis = True
  c.prepare.intensity_percentiles = (1.0, 99.0)
  c.prepare.heart_variance_fraction = 0.5
  c.image_size = 80
  c.split = (0.7, 0.1, 0.2)
  c.eval_split = "val"
  c.augment = ml_collections.ConfigDict()
  c.augment.max_shift_px = 5
  c.augment.zoom_prob = 0.0
  c.augment.zoom_range = (0.9, 1.1)
  c.augment.flip_prob = 0.0
  _update(c, overrides, "data")
  return c


def cine_config(name: str, **data_overrides: Any) -> ml_collections.ConfigDict:
  """base.base_config() of experiment `name` with the cine data section
  (`get_data_config(**data_overrides)`)."""
  c = base.base_config()
  c.name = name
  c.data = get_data_config(**data_overrides)
  return c


def apply_smoke(c: ml_collections.ConfigDict) -> None:
  """The cine sizes of the smoke variants, on top of base.apply_smoke: 4 frames of 16 px
  resized from 32 px crops."""
  c.data.num_frames = 4
  c.data.image_size = 16
  c.data.prepare.image_size = 32


def _update(section: ml_collections.ConfigDict, overrides: dict, where: str) -> None:
  for key, value in overrides.items():
    if key not in section:
      raise KeyError(f"{where}.{key} is not a cine data field; known: {sorted(section)}")
    if isinstance(section[key], ml_collections.ConfigDict) and isinstance(value, dict):
      _update(section[key], value, f"{where}.{key}")
    else:
      section[key] = value


def get_config(arg=None):
  """Not an experiment: a clear error for `--config=cine_data` (the registry lists every
  module of this folder)."""
  raise ValueError(f"cine_data{':' + arg if arg else ''} is the data section of the cine "
                   "experiments, not an experiment; use e.g. --config=temporal_classifier or "
                   "--config=diffae3d (which build their data section with get_data_config)")
