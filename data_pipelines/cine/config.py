"""What a prepared cine is made of, and how a run's data config describes it.

The layout names, prepared fields and `FORMAT_VERSION` of the cine format; `CineConfig`, the
preprocessing of one cine; the reading of config.data (experiments/configs/cine_data.py) with the
defaults of the fields older configs leave out (`data_field`, `cine_config_from`) and its cache
location (`cache_root`, `synthetic_raw_dir`; the layout itself is `data_pipelines.cache`'s).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from data_pipelines import cache
from data_pipelines import plausibility
from data_pipelines import preprocess
from data_pipelines import subject_splits

DATASETS = ("synthetic", "ukbb")
VIEWS = ("la_4ch", "sa_mid")
UKBB_SHORT_AXIS = "sa.nii.gz"
UKBB_LONG_AXIS = "la_4ch.nii.gz"
UKBB_SEGMENTATION = "seg_sa.nii.gz"
NUM_SHORT_AXIS_SLICES = 3
UNKNOWN_GROUP = -1
# Bumped when a prepared cine example would differ for the same inputs and configuration.
# 2: image fields stored as float16, every tensor as raw bytes. 3: la_label. 4: plausibility
# checks (bounds in the configuration), input fingerprints with content hashes in report.json.
FORMAT_VERSION = 4
STORED_IMAGE_DTYPE = np.float16
# Image fields and their value range: [0, 1] images fill shifted-in pixels with 0, [-1, 1] with -1.
UNIT_IMAGE_FIELDS = ("sa_image",)
SYMMETRIC_IMAGE_FIELDS = ("sa_mid_image", "la_image")
IMAGE_FIELDS = UNIT_IMAGE_FIELDS + SYMMETRIC_IMAGE_FIELDS
# Array fields of a prepared example; the batches may leave out any but lv_volume_ml.
ARRAY_FIELDS = ("sa_image", "sa_label", "sa_mid_image", "la_image", "la_label",
                "lv_volume_ml")
LABEL_FIELDS = ("sa_label", "la_label")
SCALAR_FIELDS = ("pixel_spacing_mm", "slice_thickness_mm")


@dataclasses.dataclass(frozen=True)
class CineConfig:
  """What decides how a subject's cine becomes a prepared example.

  Attributes:
    num_frames: T, frames per cycle after temporal resampling from ED.
    image_size: S, side of the square crops in pixels.
    spacing_mm: in-plane pixel spacing of the crops.
    long_axis: store la_image; subjects without a 4-chamber view are then skipped.
    intensity_percentiles: (low, high) percentiles mapped to 0 and 1 in sa_image.
    variance_fraction: the heart mask of the 4-chamber crop keeps pixels whose temporal variance
      exceeds this fraction of the image's mean temporal variance (0.5 in the DiffAE reference).
    bounds: the physiological plausibility a labelled subject must meet
      (`plausibility.PlausibilityBounds`).
  """
  num_frames: int = 50
  image_size: int = 80
  spacing_mm: float = 1.8
  long_axis: bool = True
  intensity_percentiles: tuple[float, float] = (1.0, 99.0)
  variance_fraction: float = 0.5
  bounds: plausibility.PlausibilityBounds = plausibility.PlausibilityBounds()

  def __post_init__(self):
    if not isinstance(self.bounds, plausibility.PlausibilityBounds):
      # A configuration read back from report.json holds the bounds as a dict.
      object.__setattr__(self, "bounds", plausibility.PlausibilityBounds.from_dict(self.bounds))
    if self.num_frames < 2:
      raise ValueError(f"num_frames must be >= 2, got {self.num_frames}")
    if self.image_size < 8:
      raise ValueError(f"image_size must be >= 8, got {self.image_size}")
    if not self.spacing_mm > 0:
      raise ValueError(f"spacing_mm must be positive, got {self.spacing_mm}")
    if not self.variance_fraction > 0:
      raise ValueError(f"variance_fraction must be positive, got {self.variance_fraction}")
    object.__setattr__(self, "intensity_percentiles",
                       preprocess.checked_percentiles(self.intensity_percentiles))
    object.__setattr__(self, "spacing_mm", float(self.spacing_mm))

  def to_dict(self) -> dict:
    return {**dataclasses.asdict(self), "bounds": self.bounds.to_dict()}


# Data-config fields with their defaults where a config (e.g. one built on base.py's data
# section) leaves them out; experiments/configs/cine_data.py defines every field.
_OPTIONAL_FIELDS = {
    "view": "la_4ch",
    "split": subject_splits.DEFAULT_SPLIT_FRACTIONS,
    "eval_split": "val",
    "prepare.long_axis": True,
    "prepare.intensity_percentiles": (1.0, 99.0),
    "prepare.heart_variance_fraction": 0.5,
    "prepare.plausibility": (),
}


def data_field(data_config, dotted_name: str) -> Any:
  """config.data.<dotted_name>, the default of `_OPTIONAL_FIELDS` when absent; a ValueError
  naming the field when it is required."""
  value = data_config
  for part in dotted_name.split("."):
    if isinstance(value, Mapping) and part in value:
      value = value[part]
    elif not isinstance(value, Mapping) and hasattr(value, part):
      value = getattr(value, part)
    elif dotted_name in _OPTIONAL_FIELDS:
      return _OPTIONAL_FIELDS[dotted_name]
    else:
      raise ValueError(f"the cine data config has no field {dotted_name!r} (see "
                       "experiments/configs/cine_data.py for every field)")
  return value


def cine_config_from(data_config) -> CineConfig:
  """The CineConfig of a data config (prepare.* fields, the plausibility bounds among them, and
  num_frames)."""
  view = data_field(data_config, "view")
  if view not in VIEWS:
    raise ValueError(f"data.view must be one of {VIEWS}, got {view!r}")
  long_axis = bool(data_field(data_config, "prepare.long_axis"))
  if view == "la_4ch" and not long_axis:
    raise ValueError("data.view='la_4ch' needs data.prepare.long_axis=True")
  return CineConfig(
      num_frames=int(data_field(data_config, "num_frames")),
      image_size=int(data_field(data_config, "prepare.image_size")),
      spacing_mm=float(data_field(data_config, "prepare.spacing_mm")),
      long_axis=long_axis,
      intensity_percentiles=tuple(data_field(data_config, "prepare.intensity_percentiles")),
      variance_fraction=float(data_field(data_config, "prepare.heart_variance_fraction")),
      bounds=plausibility.bounds_of(
          {plausibility.CONFIG_FIELD: data_field(data_config, "prepare.plausibility")}))


def cache_root(data_config) -> str:
  """<cache> of a data config (data.cache_dir; `cache.cache_root`)."""
  return cache.cache_root(data_field(data_config, "cache_dir"))


def synthetic_raw_dir(data_config) -> str:
  """<cache>/synthetic/n<N>_seed<S>/raw: the raw synthetic cohort, shared with the slice data."""
  return cache.synthetic_raw_dir(cache_root(data_config),
                                 int(data_field(data_config, "synthetic.num_subjects")),
                                 int(data_field(data_config, "synthetic.seed")))
