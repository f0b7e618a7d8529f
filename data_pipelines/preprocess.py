"""Preprocessing of short-axis cardiac MRI into aligned 2D crops (pure numpy/scipy).

Follows the ACDC preparation of the AR-SIVAE paper (Di Folco et al., MICCAI 2024) and its
public code:
1. slice choice on the ED labels: among slices where every structure (RV, MYO, LV) has more
   than `min_label_pixels` pixels, the basal end, i.e. the end of that range with the larger
   heart foreground (rule "acdc_basal"); alternatives "mid" (middle of that range) and
   "largest_lv" (the slice of that range with the most LV blood-pool pixels);
2. in-plane resampling to `spacing_mm`, translation of the ED LV blood-pool centroid to the
   image centre, rotation about it so that the LV->RV centroid axis has a canonical direction,
   and crop/pad to `image_size` pixels. These four are one affine map, applied in a single
   interpolation (linear for images, nearest for labels) so the image is not blurred by
   repeated resampling; ED and ES share the ED transform so they stay registered;
3. robust min-max normalisation to [0, 1] between the `intensity_percentiles` of the subject's
   ED and ES slices together (one scale per subject, so ED/ES contrast is comparable).

Array conventions: a slice is (X, Y), the first two NIfTI axes; a stack is (X, Y, Z). Axis 0 of
an output crop is its row (vertical axis when displayed), axis 1 its column (horizontal).
Canonical orientation: the RV centroid lies on the horizontal line through the image centre,
to the left of the LV (smaller column index); the LV centroid is at pixel
((S - 1) / 2, (S - 1) / 2) for a crop of size S.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage

from cardiac_jax import structures
from data_pipelines import plausibility
from data_pipelines.errors import InvalidInputError

SLICE_RULES = ("acdc_basal", "mid", "largest_lv")
# Largest crop side: 4x the paper's 128 px; larger crops of cardiac MRI hold nothing but
# background, and each example would take tens of megabytes.
MAX_IMAGE_SIZE = 512
# Direction of the LV->RV centroid axis in output (row, col) coordinates: towards the left.
CANONICAL_LV_TO_RV = (0.0, -1.0)
_HEART_LABELS = (structures.RV_BLOOD_POOL, structures.LV_MYOCARDIUM, structures.LV_BLOOD_POOL)
STRUCTURE_NAMES = {structures.RV_BLOOD_POOL: "RV blood pool",
                   structures.LV_MYOCARDIUM: "LV myocardium",
                   structures.LV_BLOOD_POOL: "LV blood pool"}
# Channel order of a prepared example.
PHASES = ("ED", "ES")


def checked_percentiles(percentiles) -> tuple[float, float]:
  """(low, high) intensity percentiles as a tuple of floats (so configs read back from JSON
  compare equal); a ValueError unless 0 <= low < high <= 100."""
  low, high = percentiles
  if not 0 <= low < high <= 100:
    raise ValueError(f"intensity_percentiles must satisfy 0 <= low < high <= 100, got "
                     f"{percentiles}")
  return float(low), float(high)


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """Everything that decides how a subject becomes a prepared example.

  Attributes:
    image_size: side of the square output crop in pixels.
    spacing_mm: in-plane pixel spacing of the output in mm.
    slice_rule: one of SLICE_RULES.
    min_label_pixels: a slice is usable when every heart structure has more pixels than this
      at ED (the paper's threshold is 10).
    intensity_percentiles: (low, high) percentiles mapped to 0 and 1.
    mask_outside_heart: zero the image outside the heart labels (the paper's ACDC variant).
  """
  image_size: int = 128
  spacing_mm: float = 1.3
  slice_rule: str = "acdc_basal"
  min_label_pixels: int = 10
  intensity_percentiles: tuple[float, float] = (1.0, 99.0)
  mask_outside_heart: bool = False

  def __post_init__(self):
    if (isinstance(self.image_size, bool) or int(self.image_size) != self.image_size
        or not 8 <= self.image_size <= MAX_IMAGE_SIZE):
      raise ValueError(f"image_size must be an integer from 8 to {MAX_IMAGE_SIZE}, got "
                       f"{self.image_size!r}")
    if not (math.isfinite(self.spacing_mm) and self.spacing_mm > 0):
      raise ValueError(f"spacing_mm must be positive and finite, got {self.spacing_mm}")
    object.__setattr__(self, "image_size", int(self.image_size))
    if self.slice_rule not in SLICE_RULES:
      raise ValueError(f"unknown slice_rule {self.slice_rule!r}; known: {SLICE_RULES}")
    if self.min_label_pixels < 0:
      raise ValueError(f"min_label_pixels must be >= 0, got {self.min_label_pixels}")
    object.__setattr__(self, "intensity_percentiles",
                       checked_percentiles(self.intensity_percentiles))

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PreprocessedSlice:
  """One subject's selected slice after preprocessing.

  image: (S, S, 2) float32 in [0, 1], channels [ED, ES]; label: (S, S, 2) uint8 canonical;
  slice_index: the chosen slice of the (X, Y, Z) stack.
  """
  image: np.ndarray
  label: np.ndarray
  slice_index: int


# ----------------------------------------------------------------------------- slice choice

def usable_slices(ed_labels: np.ndarray, min_label_pixels: int = 10) -> np.ndarray:
  """Indices z of a (X, Y, Z) ED label stack where every heart structure has more pixels
  than `min_label_pixels`."""
  counts = np.stack([np.sum(ed_labels == value, axis=(0, 1)) for value in _HEART_LABELS])
  return np.flatnonzero(np.all(counts > min_label_pixels, axis=0))


def select_slice(ed_labels: np.ndarray, rule: str = "acdc_basal",
                 min_label_pixels: int = 10) -> int:
  """Index of the slice chosen by `rule` in a (X, Y, Z) canonical ED label stack.

  Raises InvalidInputError when no slice shows all three structures with enough pixels.
  """
  candidates = usable_slices(ed_labels, min_label_pixels)
  if candidates.size == 0:
    raise InvalidInputError(f"no slice has more than {min_label_pixels} pixels of each of RV, "
                     "myocardium and LV at ED")
  if rule == "acdc_basal":
    # The stack order (base-first or apex-first) varies; the base is the end with the larger
    # cross-section of the heart.
    foreground = np.sum(ed_labels != structures.BACKGROUND, axis=(0, 1))
    first, last = candidates[0], candidates[-1]
    return int(first if foreground[first] >= foreground[last] else last)
  if rule == "mid":
    return int(candidates[len(candidates) // 2])
  if rule == "largest_lv":
    lv_pixels = np.sum(ed_labels[:, :, candidates] == structures.LV_BLOOD_POOL, axis=(0, 1))
    return int(candidates[int(np.argmax(lv_pixels))])
  raise ValueError(f"unknown slice rule {rule!r}; known: {SLICE_RULES}")


# ----------------------------------------------------------------------------- geometry

def structure_centroid(slice_labels: np.ndarray, label_value: int) -> tuple[float, float]:
  """(row, col) pixel centroid of `label_value` in a (X, Y) slice; InvalidInputError if absent."""
  mask = slice_labels == label_value
  if not mask.any():
    raise InvalidInputError(f"label {label_value} is absent from the slice")
  row, col = ndimage.center_of_mass(mask)
  return float(row), float(col)


def canonical_rotation(lv_centroid, rv_centroid, spacing_mm) -> np.ndarray:
  """2x2 rotation R (physical mm, (row, col) axes) taking the canonical direction to LV->RV.

  R @ CANONICAL_LV_TO_RV is the unit LV->RV vector of the input slice, so sampling the input
  at R @ d for output offsets d puts the RV in the canonical direction.
  """
  v = (np.asarray(rv_centroid, float) - np.asarray(lv_centroid, float)) * np.asarray(
      spacing_mm, float)
  if not np.linalg.norm(v) > 0:
    raise InvalidInputError("LV and RV centroids coincide; the LV->RV axis is undefined")
  # Angles are measured as atan2(col, row).
  angle = math.atan2(v[1], v[0]) - math.atan2(CANONICAL_LV_TO_RV[1], CANONICAL_LV_TO_RV[0])
  cos, sin = math.cos(angle), math.sin(angle)
  return np.array([[cos, -sin], [sin, cos]])


def _warp(planes: np.ndarray, matrix: np.ndarray, offset: np.ndarray,
          output_shape: tuple[int, int], order: int) -> np.ndarray:
  """Samples each (X, Y) plane of a (X, Y, C) array at input = matrix @ output + offset."""
  out = [ndimage.affine_transform(planes[:, :, c], matrix, offset=offset,
                                  output_shape=output_shape, order=order, mode="constant",
                                  cval=0.0)
         for c in range(planes.shape[2])]
  return np.stack(out, axis=-1)


def resample_in_plane(planes: np.ndarray, spacing_mm, target_spacing_mm: float,
                      order: int) -> np.ndarray:
  """Resamples (X, Y, C) planes of pixel spacing (dx, dy) to a square `target_spacing_mm` grid.

  The field of view is kept: the output has round(n * d / target) pixels along each axis, and
  pixel corners at the border coincide. `order` 1 (linear) for images, 0 (nearest) for labels.
  """
  scale = np.array([target_spacing_mm / float(spacing_mm[0]),
                    target_spacing_mm / float(spacing_mm[1])])
  shape = tuple(max(1, int(round(n / s))) for n, s in zip(planes.shape[:2], scale))
  # Pixel centre j of the output lies at input coordinate (j + 0.5) * scale - 0.5.
  return _warp(planes, np.diag(scale), 0.5 * scale - 0.5, shape, order)


def alignment(ed_slice_labels: np.ndarray, spacing_mm, config: PreprocessConfig,
              ) -> tuple[np.ndarray, np.ndarray]:
  """(matrix, offset) of the map from output crop pixels to input pixels, input = matrix @
  output + offset, defined by an (X, Y) ED label slice: its LV blood-pool centroid goes to the
  crop centre and its LV->RV axis to CANONICAL_LV_TO_RV, at config.spacing_mm per pixel."""
  lv = structure_centroid(ed_slice_labels, structures.LV_BLOOD_POOL)
  rv = structure_centroid(ed_slice_labels, structures.RV_BLOOD_POOL)
  in_plane_mm = np.asarray(spacing_mm[:2], float)
  rotation = canonical_rotation(lv, rv, in_plane_mm)
  # output pixel -> mm offset from the centre -> rotated -> input pixels.
  matrix = np.diag(1.0 / in_plane_mm) @ rotation * config.spacing_mm
  centre = np.full(2, (config.image_size - 1) / 2.0)
  return matrix, np.asarray(lv) - matrix @ centre


def align_slice(images: np.ndarray, labels: np.ndarray, spacing_mm, config: PreprocessConfig,
                ) -> tuple[np.ndarray, np.ndarray]:
  """Resamples, LV-centres, rotates and crops (X, Y, C) images and labels in one warp.

  The transform comes from channel 0 of `labels` (ED): `alignment`.

  Returns:
    ((S, S, C) float32 images, (S, S, C) uint8 labels), S = config.image_size, pixels of
    config.spacing_mm; areas outside the input field of view are 0.
  """
  matrix, offset = alignment(labels[:, :, 0], spacing_mm, config)
  size = config.image_size
  out_images = _warp(images.astype(np.float32), matrix, offset, (size, size), order=1)
  out_labels = _warp(labels, matrix, offset, (size, size), order=0)
  return out_images.astype(np.float32), out_labels.astype(np.uint8)


# ----------------------------------------------------------------------------- intensities

def intensity_window(images: np.ndarray, percentiles=(1.0, 99.0)) -> tuple[float, float]:
  """(low, high) intensity percentiles over all voxels of `images` (any shape)."""
  low, high = np.percentile(images, percentiles)
  if not high > low:
    raise InvalidInputError(f"image intensities are constant between the {percentiles} percentiles "
                     f"({low}); cannot normalise")
  return float(low), float(high)


def normalize_intensity(images: np.ndarray, low: float, high: float) -> np.ndarray:
  """Maps [low, high] linearly to [0, 1] and clips: a robust min-max normalisation."""
  return np.clip((images - low) / (high - low), 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------- one subject

def check_crop(images: np.ndarray, slice_labels: np.ndarray, labels: np.ndarray,
               slice_index: int, spacing_mm, config: PreprocessConfig) -> None:
  """Raises InvalidInputError unless each channel (ED, ES) of an aligned (S, S, 2) crop keeps
  every heart structure that its (X, Y, 2) slice labels hold (at ED all three, by the slice
  choice; at ES the basal slice may lie above the ventricles) and an image that is not
  constant: a structure cut off by the crop, lost to coarse output pixels, or a crop outside the
  field of view would otherwise become a training example that contradicts its labels and
  attributes. The reason says whether the structure lies outside the crop or is smaller than
  its pixels."""
  matrix, offset = alignment(slice_labels[:, :, 0], spacing_mm, config)
  to_output = np.linalg.inv(matrix)
  size = config.image_size
  for channel, phase in enumerate(PHASES):
    where = (f"{phase} crop of slice {slice_index} ({size} px of {config.spacing_mm:g} mm)")
    after = np.bincount(labels[..., channel].ravel(), minlength=structures.NUM_LABELS)
    for value in _HEART_LABELS:
      pixels = np.argwhere(slice_labels[..., channel] == value)
      if not pixels.size or after[value] > 0:
        continue
      position = (pixels - offset) @ to_output.T
      inside = np.all((position >= -0.5) & (position <= size - 0.5), axis=1)
      if not inside.any():
        problem = "lies outside the crop"
      else:
        problem = (f"covers {len(pixels)} input pixels, too few for output pixels of "
                   f"{config.spacing_mm:g} mm")
      raise InvalidInputError(f"the {where} loses the {STRUCTURE_NAMES[value]} of that slice: "
                              f"it {problem}")
    plausibility.check_not_constant(images[..., channel], where)


def preprocess_subject(ed_image: np.ndarray, ed_labels: np.ndarray, es_image: np.ndarray,
                       es_labels: np.ndarray, spacing_mm, config: PreprocessConfig,
                       ) -> PreprocessedSlice:
  """Selects, aligns and normalises one subject's slice at ED and ES.

  Args:
    ed_image, es_image: (X, Y, Z) float intensities.
    ed_labels, es_labels: (X, Y, Z) canonical labels, same shape.
    spacing_mm: (dx, dy[, dz]) in mm.
    config: the preprocessing choices.

  Raises:
    InvalidInputError: no usable slice, a constant image on the slice or in a channel of the
      crop, a heart structure of the slice lost in the crop (`check_crop`; the message names no
      file, the caller knows which subject it was).
  """
  z = select_slice(ed_labels, config.slice_rule, config.min_label_pixels)
  images = np.stack([ed_image[:, :, z], es_image[:, :, z]], axis=-1)
  labels = np.stack([ed_labels[:, :, z], es_labels[:, :, z]], axis=-1)
  for channel, phase in enumerate(PHASES):
    plausibility.check_not_constant(images[..., channel], f"{phase} image of slice {z}")
  low, high = intensity_window(images, config.intensity_percentiles)
  aligned_images, aligned_labels = align_slice(images, labels, spacing_mm, config)
  check_crop(aligned_images, labels, aligned_labels, z, spacing_mm, config)
  normalized = normalize_intensity(aligned_images, low, high)
  if config.mask_outside_heart:
    normalized = np.where(aligned_labels != structures.BACKGROUND, normalized, 0.0)
  return PreprocessedSlice(image=normalized.astype(np.float32), label=aligned_labels,
                           slice_index=z)
