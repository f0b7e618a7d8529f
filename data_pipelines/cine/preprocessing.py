"""Preprocessing one cine subject into the prepared fields (the package docstring lists them).

Time resampling over one cycle from ED, the 3 central short-axis slices aligned and normalised
as on the slice path (`preprocess`), the heart crop of the 4-chamber view from its temporal
variance, per-volume min-max to [-1, 1].
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from scipy import ndimage

from cardiac_jax import structures
from data_pipelines import preprocess
from data_pipelines.cine.config import CineConfig, NUM_SHORT_AXIS_SLICES, UNKNOWN_GROUP
from data_pipelines.cine.reading import CineSubject, lv_volumes_ml
from data_pipelines.errors import InvalidInputError

# Labels need more pixels than this of each structure at ED on a central slice.
_MIN_LABEL_PIXELS = 10


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
    volumes = lv_volumes_ml(labels, subject.spacing_mm)
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
