"""Cine data path: raw cine series -> prepared tfds dataset -> deterministic (B, T, ...) batches.

The input of the temporal VAE-classifier (Clough et al.; /specs/interpretability.md: T frames of
the 3 central short-axis slices, LV blood-pool volume curve) and of the 3D diffusion
autoencoder (/specs/diffae3d.md "Input": a cine as a (T, H, W) volume, long-axis 4-chamber view
cropped around the heart from the temporal-variance mask, per-volume min-max to [-1, 1]).

Raw layouts (`DATASETS`):
- "synthetic": the ACDC layout of `data_pipelines.synthetic` (Info.cfg, <s>_4d.nii.gz, labels of
  every frame <s>_4d_gt.nii.gz, optional 4-chamber <s>_la_4ch.nii.gz with its labels
  <s>_la_4ch_gt.nii.gz). ED from Info.cfg.
- "ukbb": converted UK Biobank NIfTI, one folder per subject: sa.nii.gz (X, Y, Z, T) short-axis
  cine, la_4ch.nii.gz (X, Y, 1, T) 4-chamber cine (optional unless the long axis is required),
  seg_sa.nii.gz (X, Y, Z, T) optional labels of every frame in the UK Biobank convention
  (LV=1, Myo=2, RV=3; `label_convention`, remapped by `structures.remap_labels`). The series
  are ECG-triggered, so ED is frame 0 (without labels) or the frame of largest LV volume.
Every file is read by `acdc.read_nifti` (defensive decoding); every problem of a subject raises
`InvalidInputError` naming the file, which the preparation records as that subject's reason.

Prepared example (one per subject; batch fields in /briefs/cine_format.md), T = num_frames,
S = image_size:
- subject (str), group (int32 index into structures.GROUPS, -1 when unknown, e.g. UK Biobank);
- sa_image (T, S, S, 3) in [0, 1]: the 3 central short-axis slices (middle of the
  slices where RV, myocardium and LV all appear at ED) as channels, apex-ward last, after
  `preprocess.align_slice` (resampled to spacing_mm, LV-centred, rotated to the canonical
  LV -> RV axis; the ED transform for every frame) and `preprocess.normalize_intensity` between
  the 1st and 99th percentiles of the subject's three slices over all frames;
- sa_label (T, S, S, 3) uint8 canonical labels of the same pixels (nearest neighbour);
- lv_volume_ml (T,) float32: LV blood-pool volume of the whole stack in each frame (the source
  frame nearest in time, like the labels); NaN without labels;
- pixel_spacing_mm: in-plane spacing of sa_image/sa_label (= spacing_mm; in batches resized
  to data.image_size, scaled accordingly); slice_thickness_mm: the source's slice spacing;
- sa_mid_image (T, S, S, 1) in [-1, 1]: the middle slice of sa_image before
  normalisation, min-max per volume then (x - 0.5) / 0.5;
- la_image (T, S, S, 1) in [-1, 1] (when the configuration has the long axis): the
  4-chamber cine resampled to spacing_mm, an S x S window centred on the bounding box of the
  largest connected region of pixels whose temporal variance exceeds variance_fraction x its
  image mean (after morphological opening and closing), min-max per volume, (x - 0.5) / 0.5;
- la_label (T, S, S, 1) uint8 (with la_image): the 4-chamber labels of the same pixels
  (nearest neighbour; 0 background, 1 RV, 2 LV myocardium, 3 LV blood pool, 4 LA, 5 RA,
  `structures.NUM_LONG_AXIS_LABELS`), all 0 when the source has none (UK Biobank).
The image fields are computed in float32 and stored as float16 (`STORED_IMAGE_DTYPE`: 11
significant bits, finer than the 12-bit range of a scanner's magnitude images); batches hold
them as float32 again. Half-size records halve the read and parse time of an example, which
bounds the input pipeline's speed (benchmarks/README.md).
Time: frames are resampled to T over one cycle starting at ED: source position
ED + k T_src / T (cyclic), images linearly, labels by the nearest frame.

Preparation (`prepare_cine_dataset`) writes the same files as data_pipelines/prepare.py
(tfds/ array_record, attributes.csv for labelled subjects, splits.json, report.json last) with
the same guarantees, through the same driver (`prepare.run_preparation`): the per-subject
outcomes are kept in O/.subjects/subjects/ as soon as computed, so an interrupted run resumes
where it stopped; a rerun after the input files changed prepares only the changed and new
subjects; a broken or implausible subject (blank frames, labels whose volumes or ejection
fraction `CineConfig.bounds` refuse, a structure lost in the crop) is "skipped" with its
reason. Splits are subject-level, stratified by
group (`tfds_builders.stratified_split`), fractions configurable. `held_out_cine_dir` generates
and prepares, once, extra synthetic subjects of one group that a run never saw (the TCAV
concept pool), acquired and prepared like the run's synthetic cohort.

Batches (`make_data_source(config)`): the training batch at global step k is a pure function of
(config.seed, k) as in data_pipelines/pipeline.py (same index schedule and augmentation draws:
`pipeline.train_batch_indices`, `pipeline.augment_transforms`), process p of P keeps rows
[p B/P, (p+1) B/P). Augmentation (training only, config.data.augment): integer in-plane shifts
up to max_shift_px, optional zoom, horizontal flip with flip_prob; one map per sequence, applied
to every frame and to every image field and the labels alike (nearest for labels). Fields are
resized from the stored size to config.data.image_size when they differ (area averaging when
shrinking, nearest for labels). Fill outside the shifted image: 0 for [0, 1] images and labels,
-1 for [-1, 1] images. `fields` (train_batches, eval_batches, make_data_source) restricts the
array fields that are copied, transformed and returned to the ones a model reads (a model
family's `batch_fields`); lv_volume_ml, group, subject and the scalars always come along.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Optional

import numpy as np
from scipy import ndimage
import tensorflow as tf
import tensorflow_datasets as tfds

from cardiac_jax import cardiac
from cardiac_jax import structures
from data_pipelines import acdc
from data_pipelines import cache
from data_pipelines import pipeline
from data_pipelines import plausibility
from data_pipelines import prepare
from data_pipelines import preprocess
from data_pipelines import synthetic
from data_pipelines import tfds_builders
from data_pipelines.errors import InvalidArgumentError
from data_pipelines.errors import InvalidInputError

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
_UNIT_IMAGES = ("sa_image",)
_SYMMETRIC_IMAGES = ("sa_mid_image", "la_image")
_IMAGES = _UNIT_IMAGES + _SYMMETRIC_IMAGES
# Array fields of a prepared example; the batches may leave out any but lv_volume_ml.
ARRAY_FIELDS = ("sa_image", "sa_label", "sa_mid_image", "la_image", "la_label",
                "lv_volume_ml")
_LABELS = ("sa_label", "la_label")
_SCALARS = ("pixel_spacing_mm", "slice_thickness_mm")
# Labels need more pixels than this of each structure at ED on a central slice.
_MIN_LABEL_PIXELS = 10


# ----------------------------------------------------------------------------- configuration

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
    low, high = self.intensity_percentiles
    if not 0 <= low < high <= 100:
      raise ValueError(f"intensity_percentiles must satisfy 0 <= low < high <= 100, got "
                       f"{self.intensity_percentiles}")
    object.__setattr__(self, "intensity_percentiles", (float(low), float(high)))
    object.__setattr__(self, "spacing_mm", float(self.spacing_mm))

  def to_dict(self) -> dict:
    return {**dataclasses.asdict(self), "bounds": self.bounds.to_dict()}


# ----------------------------------------------------------------------------- reading

@dataclasses.dataclass
class CineSubject:
  """One subject's raw cine series, as read.

  cine: (X, Y, Z, T) float32 short-axis stack; labels: (X, Y, Z, T) uint8 canonical or None;
  spacing_mm: (dx, dy, dz); ed_frame / es_frame: 0-based (es None when unknown);
  long_axis: (X, Y, T') float32 4-chamber cine or None, with long_axis_spacing_mm (dx, dy),
  long_axis_ed_frame (0-based) and long_axis_labels (X, Y, T') uint8 (labels of la_label) or
  None.
  """
  subject: str
  directory: str
  group: Optional[str]
  cine: np.ndarray
  labels: Optional[np.ndarray]
  spacing_mm: tuple[float, float, float]
  ed_frame: int
  es_frame: Optional[int]
  long_axis: Optional[np.ndarray] = None
  long_axis_spacing_mm: Optional[tuple[float, float]] = None
  long_axis_ed_frame: int = 0
  long_axis_labels: Optional[np.ndarray] = None


def _check_series_shape(shape, path: str, what: str) -> None:
  shown = acdc.printable_path(path)
  if len(shape) != 4:
    raise InvalidInputError(f"{shown}: expected a (X, Y, Z, T) {what}, got shape {shape}")
  if shape[3] < 2:
    raise InvalidInputError(f"{shown}: a single-frame series {shape}; a cine needs at least 2 "
                            "frames")


def _read_cine_volume(path: str, what: str) -> acdc.NiftiVolume:
  """An image series (X, Y, Z, T) of at least 2 frames, none of them blank or constant."""
  volume = acdc.read_nifti(path)
  _check_series_shape(volume.data.shape, path, what)
  try:
    plausibility.check_frames_not_constant(volume.data, what)
  except InvalidInputError as e:
    raise InvalidInputError(f"{acdc.printable_path(path)}: {e}") from None
  return volume


def _read_long_axis(path: str) -> acdc.NiftiVolume:
  volume = _read_cine_volume(path, "4-chamber cine")
  if volume.data.shape[2] != 1:
    raise InvalidInputError(f"{acdc.printable_path(path)}: expected one 4-chamber plane "
                            f"(X, Y, 1, T), got shape {volume.data.shape}")
  return volume


def _read_label_series(path: str, reference: acdc.NiftiVolume, reference_path: str,
                       what: str, reference_what: str) -> acdc.NiftiVolume:
  """A label series on the grid and with the frame count of the cine `reference`; shapes are
  compared from the header before any voxel is decoded."""
  header = acdc.read_nifti_header(path)
  _check_series_shape(header.shape, path, what)
  acdc.check_same_shape(header.shape, path, reference.data.shape, reference_path, "label",
                        reference_what)
  if header.shape[3] != reference.data.shape[3]:
    raise InvalidInputError(f"{acdc.printable_path(path)}: {header.shape[3]} label frames "
                            f"for {reference.data.shape[3]} cine frames")
  volume = acdc.read_nifti(path)
  acdc.check_same_grid(volume, path, reference, reference_path, "label", reference_what)
  return volume


def _read_labels(path: str, reference: acdc.NiftiVolume, reference_path: str,
                 label_convention: str) -> np.ndarray:
  volume = _read_label_series(path, reference, reference_path, "label series", "cine")
  try:
    return structures.remap_labels(volume.data, label_convention)
  except ValueError as e:
    raise InvalidInputError(f"{acdc.printable_path(path)}: {e}") from None


def _read_long_axis_labels(path: str, reference: acdc.NiftiVolume,
                           reference_path: str) -> np.ndarray:
  """(X, Y, T) uint8 4-chamber labels on the grid of the 4-chamber cine `reference`."""
  volume = _read_label_series(path, reference, reference_path, "4-chamber label series",
                              "4-chamber cine")
  shown = acdc.printable_path(path)
  labels = volume.data[:, :, 0, :]
  values = np.unique(labels)
  if (not np.all(values == np.round(values)) or values.min() < 0
      or values.max() >= structures.NUM_LONG_AXIS_LABELS):
    shown_values = [int(v) if v == round(v) else float(v) for v in values[:8]]
    raise InvalidInputError(f"{shown}: label values {shown_values} outside 0.."
                            f"{structures.NUM_LONG_AXIS_LABELS - 1}")
  return labels.astype(np.uint8)


def _lv_volumes_ml(labels: np.ndarray, spacing_mm) -> np.ndarray:
  """(T,) LV blood-pool volume (ml) of a (X, Y, Z, T) canonical label series."""
  return synthetic.lv_volume_curve_from_labels(labels, spacing_mm)


def read_synthetic_cine(directory: str, label_convention: str = "acdc",
                        long_axis: bool = True) -> CineSubject:
  """Reads one subject folder of the ACDC layout with labels for every frame.

  Raises InvalidInputError naming the file: Info.cfg, <s>_4d.nii.gz, <s>_4d_gt.nii.gz missing or
  broken, grids that differ, fewer frames than Info.cfg's ED/ES; a broken <s>_la_4ch.nii.gz or
  <s>_la_4ch_gt.nii.gz (its labels, optional; only read when `long_axis`).
  """
  subject = os.path.basename(os.path.normpath(directory))
  info = acdc.parse_info_cfg(os.path.join(directory, "Info.cfg"))
  cine_path = os.path.join(directory, f"{subject}_4d.nii.gz")
  cine = _read_cine_volume(cine_path, "cine")
  if cine.data.shape[3] < max(info.ed_frame, info.es_frame):
    raise InvalidInputError(f"{acdc.printable_path(cine_path)}: only {cine.data.shape[3]} "
                            f"frames, but ED/ES are {info.ed_frame}/{info.es_frame}")
  labels = _read_labels(os.path.join(directory, f"{subject}_4d_gt.nii.gz"), cine, cine_path,
                        label_convention)
  result = CineSubject(subject=subject, directory=directory, group=info.group, cine=cine.data,
                       labels=labels, spacing_mm=cine.spacing_mm, ed_frame=info.ed_frame - 1,
                       es_frame=info.es_frame - 1)
  la_path = os.path.join(directory, f"{subject}_{synthetic.LONG_AXIS_4CH}.nii.gz")
  if long_axis and os.path.lexists(la_path):
    la = _read_long_axis(la_path)
    if la.data.shape[3] != cine.data.shape[3]:
      raise InvalidInputError(f"{acdc.printable_path(la_path)}: {la.data.shape[3]} frames, the "
                              f"short-axis cine has {cine.data.shape[3]}")
    result.long_axis = la.data[:, :, 0, :]
    result.long_axis_spacing_mm = la.spacing_mm[:2]
    result.long_axis_ed_frame = info.ed_frame - 1
    la_labels = os.path.join(directory, f"{subject}_{synthetic.LONG_AXIS_4CH}_gt.nii.gz")
    if os.path.lexists(la_labels):
      result.long_axis_labels = _read_long_axis_labels(la_labels, la, la_path)
  return result


def read_ukbb_cine(directory: str, label_convention: str = "ukbb",
                   long_axis: bool = True) -> CineSubject:
  """Reads one converted UK Biobank subject folder (sa.nii.gz, la_4ch.nii.gz, seg_sa.nii.gz).

  ED is the frame of largest LV volume when seg_sa.nii.gz is present (ES the smallest), else
  frame 0 (the series are triggered on the R wave). The group is unknown.

  Raises InvalidInputError naming the file: sa.nii.gz missing or not a cine; seg_sa.nii.gz on
  another grid, with another frame count or label values outside `label_convention`, or
  without LV voxels; la_4ch.nii.gz broken (only read when `long_axis`).
  """
  subject = acdc.printable_path(os.path.basename(os.path.normpath(directory)))
  sa_path = os.path.join(directory, UKBB_SHORT_AXIS)
  cine = _read_cine_volume(sa_path, "short-axis cine")
  labels, ed, es = None, 0, None
  seg_path = os.path.join(directory, UKBB_SEGMENTATION)
  if os.path.lexists(seg_path):
    labels = _read_labels(seg_path, cine, sa_path, label_convention)
    volumes = _lv_volumes_ml(labels, cine.spacing_mm)
    if not volumes.max() > 0:
      raise InvalidInputError(f"{acdc.printable_path(seg_path)}: no LV blood-pool voxels in any "
                              "frame")
    ed, es = int(np.argmax(volumes)), int(np.argmin(volumes))
  result = CineSubject(subject=subject, directory=directory, group=None, cine=cine.data,
                       labels=labels, spacing_mm=cine.spacing_mm, ed_frame=ed, es_frame=es)
  la_path = os.path.join(directory, UKBB_LONG_AXIS)
  if long_axis and os.path.lexists(la_path):
    la = _read_long_axis(la_path)
    result.long_axis = la.data[:, :, 0, :]
    result.long_axis_spacing_mm = la.spacing_mm[:2]
    # The same trigger: ED is the first frame of the 4-chamber series as well.
    result.long_axis_ed_frame = 0
  return result


def find_cine_subjects(root: str, dataset: str) -> tuple[list[tuple[str, str]],
                                                        list[tuple[str, str, str]]]:
  """([(subject, directory)], [(name, directory, reason)]) of a raw cohort of `dataset`.

  Synthetic (ACDC layout): `acdc.find_subjects`. UK Biobank: every folder at the root is a
  subject; symbolic links that lead nowhere (loops, missing targets) and NIfTI files at the
  root are rejected with the reason, other files ignored.
  """
  if dataset == "synthetic":
    refs, rejected = acdc.find_subjects(root)
    return ([(r.subject, r.directory) for r in refs],
            [(r.name, r.directory, r.reason) for r in rejected])
  if dataset != "ukbb":
    raise ValueError(f"unknown cine dataset {dataset!r}; known: {DATASETS}")
  if not os.path.isdir(root):
    raise InvalidInputError(f"{acdc.printable_path(root)}: cohort directory does not exist")
  found, rejected = [], []
  try:
    names = sorted(os.listdir(root))
  except OSError as e:
    raise InvalidInputError(f"{acdc.printable_path(root)}: cannot list ({e.strerror})") from None
  for name in names:
    path = os.path.join(root, name)
    if name.startswith("."):
      continue
    shown, shown_path = acdc.printable_path(name), acdc.printable_path(path)
    if not os.path.isdir(path):
      # Every folder is a subject here: a link that leads nowhere, or a NIfTI file lying at the
      # root, is an entry that should have been one. Other files (lists, notes) are not.
      broken = os.path.islink(path) and not os.path.exists(path)
      if broken or name.endswith((".nii", ".nii.gz")):
        problem = acdc.entry_problem(path)
        if problem is None or not broken:
          problem = "is a NIfTI file at the cohort root; each subject is a folder"
        rejected.append((shown, shown_path, f"{shown_path}: {problem}"))
      continue
    if shown != name:
      rejected.append((shown, shown_path, f"{shown_path}: folder name is not valid UTF-8 text"))
    else:
      found.append((name, path))
  return found, rejected


def read_cine_subject(directory: str, dataset: str, long_axis: bool = True) -> CineSubject:
  """The reader of `dataset` ("synthetic" or "ukbb") applied to one subject folder."""
  if dataset == "synthetic":
    return read_synthetic_cine(directory, long_axis=long_axis)
  if dataset == "ukbb":
    return read_ukbb_cine(directory, long_axis=long_axis)
  raise ValueError(f"unknown cine dataset {dataset!r}; known: {DATASETS}")


# ----------------------------------------------------------------------------- preprocessing

def resampled_frame_positions(num_source_frames: int, ed_frame: int,
                              num_frames: int) -> np.ndarray:
  """(T,) source-frame positions (float, in [0, T_src)) of the T output frames from ED."""
  return (ed_frame + np.arange(num_frames) * (num_source_frames / num_frames)) % (
      num_source_frames)


def resample_time(series: np.ndarray, ed_frame: int, num_frames: int,
                  nearest: bool = False) -> np.ndarray:
  """Resamples the last (time) axis of `series` to `num_frames` over one cycle from ED.

  Images: linear interpolation between the neighbouring frames, cyclic (the last frame is
  followed by the first). Labels (`nearest`): the nearest frame.
  """
  count = series.shape[-1]
  positions = resampled_frame_positions(count, ed_frame, num_frames)
  if nearest:
    return np.take(series, np.rint(positions).astype(int) % count, axis=-1)
  lower = np.floor(positions).astype(int)
  weight = (positions - lower).astype(np.float32)
  before = np.take(series, lower % count, axis=-1).astype(np.float32)
  after = np.take(series, (lower + 1) % count, axis=-1).astype(np.float32)
  return before + weight * (after - before)


def central_slices(labels_ed: Optional[np.ndarray], num_slices: int) -> np.ndarray:
  """Indices of the 3 central short-axis slices: around the middle of the slices where RV,
  myocardium and LV all appear at ED (the middle of the stack without labels)."""
  if num_slices < NUM_SHORT_AXIS_SLICES:
    raise InvalidInputError(f"the stack has {num_slices} slices; {NUM_SHORT_AXIS_SLICES} "
                            "are needed")
  if labels_ed is None:
    middle = num_slices // 2
  else:
    usable = preprocess.usable_slices(labels_ed, _MIN_LABEL_PIXELS)
    if usable.size == 0:
      raise InvalidInputError(f"no slice has more than {_MIN_LABEL_PIXELS} pixels of each of "
                              "RV, myocardium and LV at ED")
    middle = int(usable[len(usable) // 2])
  middle = int(np.clip(middle, 1, num_slices - 2))
  return np.array([middle - 1, middle, middle + 1])


def heart_mask(planes: np.ndarray, variance_fraction: float = 0.5) -> np.ndarray:
  """(X, Y) bool mask of the beating heart in a (X, Y, T) cine (DiffAE reference crop).

  Pixels whose temporal variance (of the frames smoothed in-plane, Gaussian sigma 1.5 px)
  exceeds `variance_fraction` times the image's mean temporal variance, cleaned up
  morphologically: a closing first joins the moving borders of the
  chambers (which are what varies in a cine) into one region, an opening then removes isolated
  noise specks; the largest connected component with its holes filled. Raises
  InvalidInputError when nothing moves.
  """
  # A light in-plane smoothing first: per-pixel noise would otherwise make the temporal
  # variance of static tissue pass the threshold in noisy or short series.
  smooth = ndimage.gaussian_filter(planes.astype(np.float64), (1.5, 1.5, 0.0))
  variance = smooth.var(axis=-1)
  mask = variance > variance_fraction * variance.mean()
  mask = ndimage.binary_closing(np.pad(mask, 4), iterations=4)[4:-4, 4:-4]
  mask = ndimage.binary_opening(mask, iterations=1)
  components, count = ndimage.label(mask)
  if count == 0:
    raise InvalidInputError("no region of the cine changes over time: cannot find the heart")
  sizes = np.bincount(components.ravel())[1:]
  return ndimage.binary_fill_holes(components == (int(np.argmax(sizes)) + 1))


def heart_crop_centre(planes: np.ndarray, variance_fraction: float = 0.5) -> tuple[int, int]:
  """(row, col) pixel centre of the bounding box of `heart_mask` of a (X, Y, T) cine."""
  rows, cols = np.nonzero(heart_mask(planes, variance_fraction))
  return (int(round((rows.min() + rows.max()) / 2.0)),
          int(round((cols.min() + cols.max()) / 2.0)))


def crop_around(planes: np.ndarray, centre: tuple[int, int], size: int,
                fill: float = 0.0) -> np.ndarray:
  """(size, size, C) window of (X, Y, C) planes whose pixel (size // 2, size // 2) is
  `centre`; parts outside the planes are `fill`."""
  out = np.full((size, size) + planes.shape[2:], fill, dtype=planes.dtype)
  start = np.asarray(centre) - size // 2
  src_lo = np.maximum(start, 0)
  src_hi = np.minimum(start + size, planes.shape[:2])
  if np.any(src_hi <= src_lo):
    return out
  dst_lo = src_lo - start
  dst_hi = dst_lo + (src_hi - src_lo)
  out[dst_lo[0]:dst_hi[0], dst_lo[1]:dst_hi[1]] = planes[src_lo[0]:src_hi[0],
                                                        src_lo[1]:src_hi[1]]
  return out


def to_symmetric_range(volume: np.ndarray, what: str) -> np.ndarray:
  """Per-volume min-max to [0, 1], then (x - 0.5) / 0.5: float32 in [-1, 1]."""
  low, high = float(volume.min()), float(volume.max())
  if not high > low:
    raise InvalidInputError(f"the {what} is constant ({low}); cannot normalise")
  unit = (volume.astype(np.float32) - np.float32(low)) / np.float32(high - low)
  return np.clip((unit - 0.5) / 0.5, -1.0, 1.0).astype(np.float32)


def _short_axis_fields(subject: CineSubject, config: CineConfig) -> dict[str, np.ndarray]:
  """sa_image, sa_label, sa_mid_image, lv_volume_ml of one subject (module docstring)."""
  t_out, size = config.num_frames, config.image_size
  nx, ny, nz, _ = subject.cine.shape
  labels = subject.labels
  zs = central_slices(None if labels is None else labels[..., subject.ed_frame], nz)
  # (X, Y, 3, T) -> (X, Y, T, 3) -> (X, Y, T * 3): channel t * 3 + k.
  images = resample_time(subject.cine[:, :, zs, :], subject.ed_frame, t_out)
  images = images.transpose(0, 1, 3, 2)
  low, high = preprocess.intensity_window(images, config.intensity_percentiles)
  prep = preprocess.PreprocessConfig(image_size=size, spacing_mm=config.spacing_mm)
  if labels is not None:
    label_series = resample_time(labels[:, :, zs, :], subject.ed_frame, t_out, nearest=True)
    label_series = label_series.transpose(0, 1, 3, 2)
    # align_slice takes its transform from label channel 0: put the ED middle slice first.
    order = np.array([1, 0, 2])
    flat_images = images[..., order].reshape(nx, ny, -1)
    flat_labels = label_series[..., order].reshape(nx, ny, -1)
    aligned, aligned_labels = preprocess.align_slice(flat_images, flat_labels,
                                                     subject.spacing_mm, prep)
    back = np.argsort(order)
    aligned = aligned.reshape(size, size, t_out, 3)[..., back]
    aligned_labels = aligned_labels.reshape(size, size, t_out, 3)[..., back]
    volumes = _lv_volumes_ml(labels, subject.spacing_mm)
    positions = resampled_frame_positions(labels.shape[3], subject.ed_frame, t_out)
    lv_volume = volumes[np.rint(positions).astype(int) % labels.shape[3]]
  else:
    # No labels: resample to the output spacing and centre the window on the moving heart.
    resampled = preprocess.resample_in_plane(images.reshape(nx, ny, -1), subject.spacing_mm,
                                             config.spacing_mm, order=1)
    centre = heart_crop_centre(resampled.reshape(*resampled.shape[:2], t_out, 3)[..., 1],
                               config.variance_fraction)
    aligned = crop_around(resampled, centre, size).reshape(size, size, t_out, 3)
    aligned_labels = np.zeros(aligned.shape, np.uint8)
    lv_volume = np.full(t_out, np.nan)
  sa_image = preprocess.normalize_intensity(aligned, low, high)
  return {
      "sa_image": np.ascontiguousarray(sa_image.transpose(2, 0, 1, 3)),
      "sa_label": np.ascontiguousarray(aligned_labels.transpose(2, 0, 1, 3)).astype(np.uint8),
      "sa_mid_image": to_symmetric_range(
          np.ascontiguousarray(aligned[..., 1].transpose(2, 0, 1))[..., None],
          "mid-ventricular short-axis cine"),
      "lv_volume_ml": lv_volume.astype(np.float32),
  }


def _long_axis_fields(subject: CineSubject, config: CineConfig) -> dict[str, np.ndarray]:
  """la_image (T, S, S, 1) and la_label (T, S, S, 1) of one subject (module docstring)."""
  series = resample_time(subject.long_axis, subject.long_axis_ed_frame, config.num_frames)
  resampled = preprocess.resample_in_plane(series, subject.long_axis_spacing_mm,
                                           config.spacing_mm, order=1)
  centre = heart_crop_centre(resampled, config.variance_fraction)
  window = crop_around(resampled, centre, config.image_size)
  labels = np.zeros(window.shape, np.uint8)
  if subject.long_axis_labels is not None:
    label_series = resample_time(subject.long_axis_labels, subject.long_axis_ed_frame,
                                 config.num_frames, nearest=True)
    label_series = preprocess.resample_in_plane(label_series, subject.long_axis_spacing_mm,
                                                config.spacing_mm, order=0)
    labels = crop_around(label_series, centre, config.image_size).astype(np.uint8)
  image = np.ascontiguousarray(window.transpose(2, 0, 1))[..., None]
  return {"la_image": to_symmetric_range(image, "4-chamber cine"),
          "la_label": np.ascontiguousarray(labels.transpose(2, 0, 1))[..., None]}


def preprocess_cine(subject: CineSubject, config: CineConfig) -> dict[str, Any]:
  """The prepared example of one subject (fields in the module docstring).

  Raises InvalidInputError (without a file name; the caller adds it) when the subject cannot
  be prepared: too few slices, no slice with every structure, a constant image, no 4-chamber
  view although `config.long_axis`.
  """
  example = {
      "subject": subject.subject,
      "group": np.int32(structures.GROUP_INDEX[subject.group] if subject.group is not None
                        else UNKNOWN_GROUP),
      **_short_axis_fields(subject, config),
      "pixel_spacing_mm": np.float32(config.spacing_mm),
      "slice_thickness_mm": np.float32(subject.spacing_mm[2]),
  }
  if config.long_axis:
    if subject.long_axis is None:
      raise InvalidInputError("no 4-chamber long-axis cine, which this preparation requires")
    example.update(_long_axis_fields(subject, config))
  return example


# ----------------------------------------------------------------------------- one subject

def _subject_attributes(subject: CineSubject,
                        bounds: plausibility.PlausibilityBounds) -> Optional[dict[str, float]]:
  """Whole-heart measurements at ED and ES (`cardiac.subject_attributes`), None without
  labels; InvalidInputError when they cannot be measured or are implausible (`bounds`)."""
  if subject.labels is None or subject.es_frame is None:
    return None
  try:
    attributes = cardiac.subject_attributes(subject.labels[..., subject.ed_frame],
                                            subject.labels[..., subject.es_frame],
                                            subject.spacing_mm)
  except ValueError as e:
    raise InvalidInputError(f"cannot measure the heart: {e}") from None
  bad = [name for name, value in attributes.items() if not np.isfinite(value)]
  if bad:
    raise InvalidInputError(f"non-finite measurements {bad}")
  plausibility.check_measurements(attributes, bounds, subject.ed_frame + 1,
                                  subject.es_frame + 1)
  return attributes


def _check_short_axis_crop(example: dict[str, Any], subject: CineSubject) -> None:
  """Every heart structure in the middle short-axis slice at ED (the slices are chosen where
  all three appear) is in its crop, not lost (labelled subjects)."""
  if subject.labels is None:
    return
  present = np.bincount(example["sa_label"][0, :, :, 1].ravel(), minlength=structures.NUM_LABELS)
  missing = [name for value, name in preprocess.STRUCTURE_NAMES.items() if present[value] == 0]
  if missing:
    raise InvalidInputError(f"the ED crop of the middle short-axis slice holds no "
                            f"{' and no '.join(missing)}: outside the crop or thinner than its "
                            "pixels")


def prepare_subject(directory: str, dataset: str,
                    config: CineConfig) -> tfds_builders.SubjectOutcome:
  """Reads and preprocesses one subject; InvalidInputError names the folder or file."""
  subject = read_cine_subject(directory, dataset, long_axis=config.long_axis)
  shown = acdc.printable_path(directory)
  try:
    plausibility.check_spacing(subject.spacing_mm, config.bounds)
    if subject.long_axis_spacing_mm is not None:
      plausibility.check_spacing(subject.long_axis_spacing_mm, config.bounds)
    attributes = _subject_attributes(subject, config.bounds)
    example = preprocess_cine(subject, config)
    _check_short_axis_crop(example, subject)
  except InvalidInputError as e:
    raise InvalidInputError(f"{shown}: {e}") from None
  return tfds_builders.SubjectOutcome(
      subject=subject.subject, directory=shown, status="prepared",
      group=subject.group, ed_frame=subject.ed_frame + 1,
      es_frame=None if subject.es_frame is None else subject.es_frame + 1,
      attributes=attributes, example=example)


def run_subject(subject: str, directory: str, dataset: str,
                config: CineConfig) -> tfds_builders.SubjectOutcome:
  """`prepare_subject` that never raises: a failure is a "skipped" outcome with the reason
  (`tfds_builders.failure_reason`: unexpected exceptions are not cached, a rerun tries
  again). KeyboardInterrupt still stops."""
  try:
    return prepare_subject(directory, dataset, config)
  except Exception as e:  # pylint: disable=broad-except
    reason, unexpected = tfds_builders.failure_reason(directory, e)
  return tfds_builders.SubjectOutcome(
      subject=subject, directory=acdc.printable_path(directory), status="skipped",
      reason=acdc.printable_path(reason), unexpected=unexpected)


# ----------------------------------------------------------------------------- work area

def _array_fields(config: CineConfig) -> tuple[str, ...]:
  names = ("sa_image", "sa_label", "sa_mid_image", "lv_volume_ml")
  return names + (("la_image", "la_label") if config.long_axis else ())


def save_outcome(cache_dir: str, outcome: tfds_builders.SubjectOutcome, config: CineConfig,
                 key: str) -> None:
  """Writes one outcome to cache_dir/<subject>.npz (temporary name, then rename); its metadata
  is what `tfds_builders.load_outcome` reads back."""
  arrays = {"meta": np.array(json.dumps(tfds_builders.outcome_meta(outcome, key)))}
  if outcome.status == "prepared":
    example = outcome.example
    arrays.update({name: example[name] for name in _array_fields(config)})
    arrays.update(group_index=np.int32(example["group"]),
                  **{name: np.float32(example[name]) for name in _SCALARS})
  tfds_builders.write_cache_file(cache_dir, outcome.subject, arrays)


def load_example(cache_dir: str, subject: str, config: CineConfig) -> dict[str, Any]:
  """The prepared example of `subject` from the work area."""
  path = tfds_builders.cache_path(cache_dir, subject)
  try:
    with np.load(path, allow_pickle=False) as cached:
      example = {name: cached[name] for name in _array_fields(config)}
      example["group"] = np.int32(cached["group_index"])
      example.update({name: np.float32(cached[name]) for name in _SCALARS})
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    raise InvalidInputError(f"{path}: the work-area file of {subject} is gone or unreadable "
                            f"({type(e).__name__}: {e}); rerun the preparation") from None
  example["subject"] = subject
  return example


# ----------------------------------------------------------------------------- tfds builder

@dataclasses.dataclass(eq=False)
class CineBuilderConfig(tfds.core.BuilderConfig):
  """A prepared cine configuration: raw layout, preprocessing and subject split."""
  dataset: str = "synthetic"
  cine: CineConfig = CineConfig()
  split_seed: int = 0
  split_fractions: tuple[float, float, float] = tfds_builders.DEFAULT_SPLIT_FRACTIONS

  def to_dict(self) -> dict:
    return {"dataset": self.dataset, "cine": self.cine.to_dict(), "split_seed": self.split_seed,
            "split_fractions": list(self.split_fractions)}


def make_builder_config(dataset: str, cine_config: CineConfig, split_seed: int = 0,
                        split_fractions=tfds_builders.DEFAULT_SPLIT_FRACTIONS,
                        ) -> CineBuilderConfig:
  """A CineBuilderConfig named after its values (tfds keeps one directory per name)."""
  if dataset not in DATASETS:
    raise ValueError(f"unknown cine dataset {dataset!r}; known: {DATASETS}")
  fractions = tuple(float(f) for f in split_fractions)
  if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
    raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got "
                     f"{fractions}")
  config = CineBuilderConfig(name="pending", dataset=dataset, cine=cine_config,
                             split_seed=int(split_seed), split_fractions=fractions)
  text = json.dumps({"format_version": FORMAT_VERSION, **config.to_dict()}, sort_keys=True)
  digest = hashlib.sha256(text.encode()).hexdigest()[:8]
  config.name = (f"{dataset}_t{cine_config.num_frames}_s{cine_config.image_size}_"
                 f"{cine_config.spacing_mm:g}mm_{'la' if cine_config.long_axis else 'sa'}_"
                 f"{digest}")
  config.description = text
  return config


def cine_features(config: CineConfig) -> tfds.features.FeaturesDict:
  """The FeaturesDict of one prepared cine subject."""
  t, s = config.num_frames, config.image_size

  def raw(shape, dtype):
    # Raw bytes: without an encoding tf.Example would hold float16 as a float32 list.
    return tfds.features.Tensor(shape=shape, dtype=dtype,
                                encoding=tfds.features.Encoding.BYTES)

  features = {
      "subject": tfds.features.Text(),
      "group": tfds.features.Scalar(dtype=np.int32),
      "sa_image": raw((t, s, s, NUM_SHORT_AXIS_SLICES), STORED_IMAGE_DTYPE),
      "sa_label": raw((t, s, s, NUM_SHORT_AXIS_SLICES), np.uint8),
      "sa_mid_image": raw((t, s, s, 1), STORED_IMAGE_DTYPE),
      "lv_volume_ml": tfds.features.Tensor(shape=(t,), dtype=np.float32),
      "pixel_spacing_mm": tfds.features.Scalar(dtype=np.float32),
      "slice_thickness_mm": tfds.features.Scalar(dtype=np.float32),
  }
  if config.long_axis:
    features["la_image"] = raw((t, s, s, 1), STORED_IMAGE_DTYPE)
    features["la_label"] = raw((t, s, s, 1), np.uint8)
  return tfds.features.FeaturesDict(features)


class CardiacCine(tfds.core.GeneratorBasedBuilder):
  """Raw cine cohort (synthetic ACDC layout or converted UK Biobank) -> one cine per subject.

  manual_dir is the raw cohort root. Subjects are prepared in `_split_generators` (the split is
  stratified over the subjects actually prepared), each outcome cached in `subject_cache_dir`
  and reused when its configuration key and input fingerprint match, so an interrupted
  preparation resumes. After `download_and_prepare`: `outcomes`, `split_assignment`,
  `num_reused`.
  """

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {"1.0.0": "Short-axis (3 slices + labels) and 4-chamber cines, T frames.",
                   "1.1.0": "Image fields stored as float16, tensors as raw bytes.",
                   "1.2.0": "4-chamber labels (la_label)."}
  BUILDER_CONFIGS = []
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Pass the raw cohort root as manual_dir: a synthetic cohort written by
  `data_pipelines.synthetic.synthesize_cohort(..., long_axis_4ch=True)`, or a folder of
  converted UK Biobank subjects (<id>/sa.nii.gz, la_4ch.nii.gz, seg_sa.nii.gz).
  """

  def __init__(self, *, subject_cache_dir: Optional[str] = None,
               previous: Optional[tfds_builders.PreviousPreparation] = None,
               inputs: Optional[dict[str, dict]] = None, **kwargs):
    super().__init__(**kwargs)
    self.subject_cache_dir = subject_cache_dir
    self.previous = previous
    self.inputs = inputs
    self.outcomes: list[tfds_builders.SubjectOutcome] = []
    self.split_assignment: dict[str, list[str]] = {}
    self.num_reused = 0
    self.num_unchanged = 0

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Cine MRI per subject: 3 central short-axis slices with labels, the "
                     "mid-ventricular slice and the 4-chamber view, resampled to T frames "
                     "from ED, LV volume curve."),
        features=cine_features(self.builder_config.cine))

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config: CineBuilderConfig = self.builder_config
    manual_dir = str(dl_manager.manual_dir)
    found, rejected = find_cine_subjects(manual_dir, config.dataset)
    if not found:
      raise InvalidInputError(f"{acdc.printable_path(manual_dir)}: no subject folders found "
                              f"for the {config.dataset!r} layout")
    cache_dir = self.subject_cache_dir or os.path.join(str(dl_manager.download_dir),
                                                       "subjects")
    key = hashlib.sha256(config.description.encode()).hexdigest()[:16]

    def run(subject: str, directory: str) -> tfds_builders.SubjectOutcome:
      return run_subject(subject, directory, config.dataset, config.cine)

    def save(cache_dir: str, outcome, key: str) -> None:
      save_outcome(cache_dir, outcome, config.cine, key)

    self._loop = tfds_builders.SubjectLoop(cache_dir, key, run, save, self.previous,
                                           self.inputs)
    subjects, duplicates = tfds_builders.unique_subjects(found)
    self.outcomes = [self._loop.outcome(s, d) for s, d in subjects] + duplicates
    self.num_reused = self._loop.num_reused
    self.num_unchanged = len(self._loop.from_previous)
    self.outcomes.extend(tfds_builders.SubjectOutcome(
        subject=name, directory=directory, status="skipped", reason=reason)
        for name, directory, reason in rejected)
    prepared = {o.subject: o for o in self.outcomes if o.status == "prepared"}
    if not prepared:
      reasons = "\n  ".join(f"{o.subject}: {o.reason}" for o in self.outcomes[:10])
      raise InvalidInputError(
          f"{acdc.printable_path(manual_dir)}: none of the {len(self.outcomes)} subjects could "
          f"be prepared. First reasons:\n  {reasons}")
    self.split_assignment = tfds_builders.stratified_split(
        {s: o.group or "unknown" for s, o in prepared.items()}, config.split_fractions,
        config.split_seed)
    return {split: self._generate_examples(subjects)
            for split, subjects in self.split_assignment.items() if subjects}

  def _generate_examples(self, subjects):
    config: CineBuilderConfig = self.builder_config
    for subject in subjects:
      example = self._loop.example(
          subject, lambda cache_dir, s: load_example(cache_dir, s, config.cine))
      for name in _IMAGES:
        if name in example:
          example[name] = example[name].astype(STORED_IMAGE_DTYPE)
      yield subject, example


# ----------------------------------------------------------------------------- prepare driver

def _requested_config(input_dir: str, builder_config: CineBuilderConfig) -> dict:
  config = {"format_version": FORMAT_VERSION, "format": "cine",
            "input_dir": os.path.abspath(input_dir), **builder_config.to_dict()}
  return json.loads(json.dumps(config))


def prepare_cine_dataset(input_dir: str, output_dir: str, config: Optional[CineConfig] = None,
                         *, dataset: str = "synthetic", split_seed: int = 0,
                         split_fractions=tfds_builders.DEFAULT_SPLIT_FRACTIONS,
                         rehash: bool = False, verbose: bool = False) -> dict:
  """Prepares the raw cine cohort in `input_dir` into `output_dir`; returns report.json.

  Same outputs and guarantees as `prepare.prepare_dataset` (`prepare.run_preparation`:
  arguments checked before any write, atomic, resumable per subject, one preparing process per
  output directory under a lock, reruns follow the input files by fingerprint): O/tfds,
  O/attributes.csv (labelled subjects), O/splits.json, O/report.json (every subject "prepared"
  with its split, or "skipped" with the reason, and its input fingerprint;
  `resumed_subjects` counts the outcomes taken from an interrupted run, `unchanged_subjects`
  those taken from the previous preparation; `seconds_per_subject` the preparation time of
  the others).

  Raises:
    InvalidInputError: input_dir missing, or no subject could be prepared.
    InvalidArgumentError (a ValueError): an argument cannot be used, or output_dir cannot be
      written.
    FileExistsError: output_dir holds another finished preparation or unrelated files.
  """
  try:
    split_seed, split_fractions = tfds_builders.check_split_arguments(split_seed,
                                                                      split_fractions)
    builder_config = make_builder_config(dataset, config or CineConfig(), split_seed,
                                         split_fractions)
  except InvalidInputError:
    raise
  except ValueError as e:
    raise InvalidArgumentError(str(e)) from None
  prepare.check_directories(input_dir, output_dir)

  def find():
    found, rejected = find_cine_subjects(input_dir, dataset)
    subjects, duplicates = tfds_builders.unique_subjects(found)
    return subjects, duplicates + [tfds_builders.SubjectOutcome(
        subject=name, directory=directory, status="skipped", reason=reason)
        for name, directory, reason in rejected]

  def make_builder(data_dir, subject_cache_dir, previous, inputs):
    return CardiacCine(config=builder_config, data_dir=data_dir, file_format="array_record",
                       subject_cache_dir=subject_cache_dir, previous=previous, inputs=inputs)

  job = prepare.Preparation(
      input_dir=input_dir, output_dir=output_dir,
      requested=_requested_config(input_dir, builder_config), find=find,
      make_builder=make_builder, split_seed=split_seed, split_fractions=split_fractions,
      noun="cine subjects")
  return prepare.run_preparation(job, verbose=verbose, rehash=rehash)


# ----------------------------------------------------------------------------- config

# Data-config fields with their defaults where a config (e.g. one built on base.py's data
# section) leaves them out; experiments/configs/cine_data.py defines every field.
_OPTIONAL_FIELDS = {
    "view": "la_4ch",
    "split": tfds_builders.DEFAULT_SPLIT_FRACTIONS,
    "eval_split": "val",
    "prepare.long_axis": True,
    "prepare.intensity_percentiles": (1.0, 99.0),
    "prepare.heart_variance_fraction": 0.5,
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
  """The CineConfig of a data config (prepare.* fields and num_frames)."""
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
      variance_fraction=float(data_field(data_config, "prepare.heart_variance_fraction")))


def cache_root(data_config) -> str:
  """<cache> of a data config (data.cache_dir; `cache.cache_root`)."""
  return cache.cache_root(data_field(data_config, "cache_dir"))


def synthetic_raw_dir(data_config) -> str:
  """<cache>/synthetic/n<N>_seed<S>/raw: the raw synthetic cohort, shared with the slice data."""
  return cache.synthetic_raw_dir(cache_root(data_config),
                                 int(data_field(data_config, "synthetic.num_subjects")),
                                 int(data_field(data_config, "synthetic.seed")))


def prepared_cine_dir(config, *, create: bool = True, num_workers: Optional[int] = None) -> str:
  """The prepared cine dataset of `config` (config.data), generating and preparing it if needed.

  - dataset "synthetic": the cohort of data.synthetic.{num_subjects, seed} in
    `synthetic_raw_dir` (the same raw cohort as the slice data; generated with the 4-chamber
    view, which is added to an existing cohort without rewriting its other files), prepared
    into <cache>/synthetic/n<N>_seed<S>/cine/<configuration name>;
  - dataset "ukbb": data.source_dir prepared into <cache>/ukbb/<hash of path>/cine/<name>;
  - dataset "prepared": data.prepared_dir as it is.
  data.prepared_dir, when set, is the output directory of the first two.
  """
  data = config.data
  dataset = data_field(data, "dataset")
  if dataset == "prepared":
    if not data_field(data, "prepared_dir"):
      raise ValueError("data.dataset='prepared' needs data.prepared_dir=DIR")
    return os.path.abspath(data_field(data, "prepared_dir"))
  if dataset not in DATASETS:
    raise ValueError(f"unknown data.dataset {dataset!r} for cine data (synthetic, ukbb or "
                     "prepared)")
  cine_config = cine_config_from(data)
  split_seed = int(data_field(data, "prepare.split_seed"))
  fractions = tuple(float(f) for f in data_field(data, "split"))
  name = make_builder_config(dataset, cine_config, split_seed, fractions).name
  if dataset == "synthetic":
    raw = synthetic_raw_dir(data)
    out = cache.synthetic_cine_dir(cache_root(data),
                                   int(data_field(data, "synthetic.num_subjects")),
                                   int(data_field(data, "synthetic.seed")), name)
  else:
    if not data_field(data, "source_dir"):
      raise ValueError("data.dataset='ukbb' needs data.source_dir=<folder of subject folders>")
    raw = os.path.abspath(data_field(data, "source_dir"))
    out = cache.source_cine_dir(cache_root(data), "ukbb", raw, name)
  if data_field(data, "prepared_dir"):
    out = os.path.abspath(data_field(data, "prepared_dir"))
  if not create:
    return out
  if dataset == "synthetic":
    synthetic.synthesize_cohort(
        raw, int(data_field(data, "synthetic.num_subjects")),
        int(data_field(data, "synthetic.seed")), long_axis_4ch=True,
        num_workers=num_workers or min(os.cpu_count() or 1, 8))
  prepare_cine_dataset(raw, out, cine_config, dataset=dataset, split_seed=split_seed,
                       split_fractions=fractions)
  return out


# The group of a held-out synthetic cohort, and the one split its prepared dataset holds.
HELD_OUT_GROUP = "NOR"
HELD_OUT_SPLIT = "train"


def held_out_cine_dir(config, num_subjects: int, group: str = HELD_OUT_GROUP, *,
                      create: bool = True, num_workers: Optional[int] = None) -> str:
  """The prepared cine dataset of synthetic subjects held out from the run's cohort.

  The run's prepared dataset (`prepared_cine_dir(config, create=False)`) must come from a raw
  synthetic cohort (its report.json). `num_subjects` subjects of `group`, numbered after that
  cohort's highest subject id, are drawn from the held-out streams of data.synthetic.seed with
  the cohort's recorded acquisition ranges (`synthetic.synthesize_held_out_cohort`), and
  prepared with the run's recorded preparation, every subject in split `HELD_OUT_SPLIT`. Both
  are cached in <cache>/synthetic/held_out/<digest of the cohort's path>_<group>_n<N>_seed<S>/
  (raw, cine/<configuration name>) and reused.

  Raises:
    ValueError: the run's data were not prepared from a synthetic cohort.
    InvalidInputError: the run's prepared dataset is missing or incomplete.
  """
  data = config.data
  main = prepared_cine_dir(config, create=False)
  report = prepare.read_report(main)
  recorded = report["config"]
  if recorded.get("dataset") != "synthetic":
    raise ValueError(f"{main} was prepared from a {recorded.get('dataset')!r} cohort, not a "
                     "synthetic one: no held-out synthetic subjects can complement it")
  source = recorded["input_dir"]
  numbers = [int(entry["subject"][len("patient"):]) for entry in report["subjects"]
             if entry["subject"].startswith("patient")
             and entry["subject"][len("patient"):].isdigit()]
  if not numbers:
    raise ValueError(f"{main}: no patient<digits> subject ids to number held-out subjects after")
  seed = int(data_field(data, "synthetic.seed"))
  cine_config = CineConfig(**recorded["cine"])
  root = cache.held_out_cohort_dir(cache_root(data), source, group, num_subjects, seed)
  fractions = (1.0, 0.0, 0.0)
  out = os.path.join(root, "cine", make_builder_config("synthetic", cine_config, 0,
                                                       fractions).name)
  if not create:
    return out
  raw = os.path.join(root, "raw")
  ranges = synthetic.read_acquisition_ranges(source) or synthetic.AcquisitionRanges()
  synthetic.synthesize_held_out_cohort(
      raw, int(num_subjects), seed, first_index=max(numbers), group=group, ranges=ranges,
      long_axis_4ch=cine_config.long_axis,
      num_workers=num_workers or min(os.cpu_count() or 1, 8))
  prepare_cine_dataset(raw, out, cine_config, dataset="synthetic", split_seed=0,
                       split_fractions=fractions)
  return out


# ----------------------------------------------------------------------------- batches

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
               **{name: np.zeros(rows, np.float32) for name in _SCALARS})
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
    for name in _SCALARS:
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
                   **{name: (tf.float32, (rows,)) for name in _SCALARS})
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
    is_label = name in _LABELS
    if not is_label:
      batch[name] = tf.cast(batch[name], tf.float32)
    # [-1, 1] images are shifted by +1 around the warp so that shifted-in pixels get -1.
    offset = 1.0 if name in _SYMMETRIC_IMAGES else 0.0

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
  num_batches = -(-layout.num_examples // batch_size)

  def load(batch_number: int) -> dict[str, np.ndarray]:
    indices = batch_number * batch_size + np.arange(batch_size, dtype=np.int64)
    indices[indices >= layout.num_examples] = -1
    batch = _load_rows(source, layout, indices[rows])
    batch["mask"] = batch["index"] >= 0
    return batch

  signature = _signature(layout, rows.stop - rows.start)
  signature["mask"] = (tf.bool, (rows.stop - rows.start,))
  return _batches(tf.data.Dataset.range(num_batches), load, signature, layout)


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
