"""Ground-truth factors of one short-axis image, measured from its label map (pure numpy).

The factors of variation of the synthetic cohort, as they can be read off a (generated) image
and its segmentation (canonical labels, `cardiac_jax.structures`). All lengths and areas are in
pixels of the image, angles in degrees. Before measuring, each blood pool is reduced to its
largest 4-connected component, and the myocardium to the pixels of the component of
(LV blood pool | myocardium) that holds that LV component, so isolated misclassified specks
do not move centroids or add area. A structure whose component has fewer than `min_area`
pixels is absent; every factor that needs an absent structure is NaN (so a vanished structure
shows up as a missing value, not as a zero measurement).

  lv_area        A_lv, pixels of the LV blood pool.
  myo_thickness  A_myo / ((P_endo + P_epi) / 2) for the concentric annulus with the measured
                 areas: r = sqrt(A_lv / pi), R = sqrt((A_lv + A_myo) / pi) and
                 A_myo / (pi (r + R)) = R - r. Exact for a circular ring of width w (gives w),
                 and it depends on areas only, which on a pixel grid are far less noisy than
                 traced contour lengths (a staircase boundary overestimates a circle's perimeter
                 by up to 4 / pi). Needs the LV blood pool and myocardium.
  rv_area        A_rv, pixels of the RV blood pool.
  rotation       Direction of the LV -> RV centroid axis, counter-clockwise as displayed (rows
                 grow downwards), relative to the canonical orientation of the prepared data
                 (RV to the left of the LV, `data_pipelines.preprocess.CANONICAL_LV_TO_RV`):
                 rotation = wrap(atan2(-(row_rv - row_lv), col_rv - col_lv) - 180 deg) in
                 (-180, 180]. Needs both blood pools.
  position_x     LV centroid column minus the image centre (S - 1) / 2 (positive: right).
  position_y     LV centroid row minus the image centre (positive: down).
  intensity      Median image intensity of the interior of the LV blood pool (its pixels
                 whose 4-neighbours are all LV blood pool), or of the whole heart (labels > 0)
                 when the LV is absent; the whole region when it has no interior. NaN without
                 any heart pixel. The interior median leaves out the boundary pixels, whose
                 partial-volume (or, in generated images, blurred) values would otherwise make
                 the intensity of a small LV lower than that of a large one of the same
                 brightness.

`factor_group` maps position_x and position_y to the one factor "position" (FACTOR_GROUPS).

Helpers for scoring how a factor follows a latent shift: `spearman` (rank correlation with
average ranks over the finite pairs; 0 when the factor does not change at all),
`unwrap_degrees` (a NaN-aware unwrap of an angle series, so a rotation passing +-180 deg stays
monotonic) and `factor_spread` (standard deviation; circular standard deviation
sqrt(-2 ln |mean exp(i theta)|) for the rotation).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage, stats

from cardiac_jax import structures

FACTORS: tuple[str, ...] = ("lv_area", "myo_thickness", "rv_area", "rotation", "position_x",
                            "position_y", "intensity")
CIRCULAR_FACTORS: tuple[str, ...] = ("rotation",)
# Measured factors that are coordinates of one factor of the cohort: the position of the heart
# in the image is one 2-D translation, and the x / y axes an arbitrary split of it.
FACTOR_GROUPS: dict[str, str] = {"position_x": "position", "position_y": "position"}
MIN_AREA = 4
# Display angle (counter-clockwise, degrees) of the canonical LV -> RV axis: towards the left.
CANONICAL_ANGLE_DEG = 180.0
_CROSS = ndimage.generate_binary_structure(2, 1)


def factor_group(name: str, joint: bool = True) -> str:
  """The cohort factor a measured factor belongs to ("position" for position_x / position_y
  when `joint`), else the factor itself."""
  return FACTOR_GROUPS.get(name, name) if joint else name


def largest_component(mask: np.ndarray) -> np.ndarray:
  """The largest 4-connected component of a boolean (H, W) mask (all False if empty)."""
  mask = np.asarray(mask, bool)
  components, count = ndimage.label(mask)
  if count <= 1:
    return mask
  sizes = np.bincount(components.ravel())
  sizes[0] = 0
  return components == int(np.argmax(sizes))


def _centroid(mask: np.ndarray) -> tuple[float, float]:
  rows, cols = np.nonzero(mask)
  return float(rows.mean()), float(cols.mean())


def wrap_degrees(angle: float) -> float:
  """An angle in degrees mapped to (-180, 180]."""
  wrapped = (angle + 180.0) % 360.0 - 180.0
  return 180.0 if wrapped == -180.0 else wrapped


def measure_factors(labels: np.ndarray, image: np.ndarray | None = None,
                    min_area: int = MIN_AREA) -> dict[str, float]:
  """Every factor of FACTORS (module docstring) for one (H, W) label map and its image.

  Args:
    labels: (H, W) canonical labels (0 background, 1 RV, 2 LV myocardium, 3 LV blood pool).
    image: (H, W) intensities for `intensity` (NaN without an image).
    min_area: structures with fewer pixels in their largest component count as absent.
  """
  labels = np.asarray(labels)
  if labels.ndim != 2:
    raise ValueError(f"measure_factors needs one (H, W) label map, got shape {labels.shape}")
  if image is not None:
    image = np.asarray(image, np.float64)
    if image.shape != labels.shape:
      raise ValueError(f"image shape {image.shape} differs from the label shape {labels.shape}")
  nan = float("nan")
  out = dict.fromkeys(FACTORS, nan)
  lv = largest_component(labels == structures.LV_BLOOD_POOL)
  rv = largest_component(labels == structures.RV_BLOOD_POOL)
  lv_present = int(lv.sum()) >= min_area
  rv_present = int(rv.sum()) >= min_area
  centre = (labels.shape[0] - 1) / 2.0, (labels.shape[1] - 1) / 2.0
  if lv_present:
    a_lv = float(lv.sum())
    out["lv_area"] = a_lv
    row_lv, col_lv = _centroid(lv)
    out["position_x"] = col_lv - centre[1]
    out["position_y"] = row_lv - centre[0]
    wall_components, _ = ndimage.label(lv | (labels == structures.LV_MYOCARDIUM))
    wall = wall_components == wall_components[np.nonzero(lv)][0]
    a_myo = float(np.sum(wall & (labels == structures.LV_MYOCARDIUM)))
    if a_myo >= min_area:
      out["myo_thickness"] = math.sqrt((a_lv + a_myo) / math.pi) - math.sqrt(a_lv / math.pi)
    if rv_present:
      row_rv, col_rv = _centroid(rv)
      angle = math.degrees(math.atan2(-(row_rv - row_lv), col_rv - col_lv))
      out["rotation"] = wrap_degrees(angle - CANONICAL_ANGLE_DEG)
  if rv_present:
    out["rv_area"] = float(rv.sum())
  if image is not None:
    region = lv if lv_present else labels > 0
    if region.any():
      interior = ndimage.binary_erosion(region, structure=_CROSS)
      out["intensity"] = float(np.median(image[interior if interior.any() else region]))
  return out


def measure_batch(labels: np.ndarray, images: np.ndarray | None = None,
                  min_area: int = MIN_AREA) -> dict[str, np.ndarray]:
  """`measure_factors` of (N, H, W) label maps (and images): {factor: (N,) float64}."""
  labels = np.asarray(labels)
  if labels.ndim != 3:
    raise ValueError(f"measure_batch needs (N, H, W) label maps, got shape {labels.shape}")
  if images is not None:
    images = np.asarray(images)
    if images.shape != labels.shape:
      raise ValueError(f"images shape {images.shape} differs from the label shape "
                       f"{labels.shape}")
  rows = [measure_factors(labels[i], None if images is None else images[i], min_area)
          for i in range(len(labels))]
  return {f: np.asarray([r[f] for r in rows], np.float64) for f in FACTORS}


# ---------------------------------------------------------------------------- statistics
def unwrap_degrees(values: np.ndarray) -> np.ndarray:
  """A series of angles (degrees, NaN allowed) with 360-degree jumps between consecutive finite
  values removed; NaNs stay in place."""
  values = np.asarray(values, np.float64).copy()
  finite = np.isfinite(values)
  if finite.sum() > 1:
    values[finite] = np.degrees(np.unwrap(np.radians(values[finite])))
  return values


def spearman(x: np.ndarray, y: np.ndarray, min_points: int = 3) -> float:
  """Spearman rank correlation of the finite (x, y) pairs (average ranks for ties).

  NaN with fewer than `min_points` finite pairs or when x is constant; 0 when y is constant
  (the factor does not follow x at all).
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1:
    raise ValueError(f"spearman needs two equal 1-D series, got {x.shape} and {y.shape}")
  finite = np.isfinite(x) & np.isfinite(y)
  if finite.sum() < min_points:
    return float("nan")
  rx, ry = stats.rankdata(x[finite]), stats.rankdata(y[finite])
  if np.ptp(rx) == 0:
    return float("nan")
  if np.ptp(ry) == 0:
    return 0.0
  rx, ry = rx - rx.mean(), ry - ry.mean()
  return float(np.sum(rx * ry) / math.sqrt(np.sum(rx * rx) * np.sum(ry * ry)))


def factor_spread(values: np.ndarray, factor: str) -> float:
  """Standard deviation of the finite values (circular standard deviation in degrees for
  CIRCULAR_FACTORS); NaN with fewer than two finite values."""
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  if len(values) < 2:
    return float("nan")
  if factor in CIRCULAR_FACTORS:
    resultant = abs(np.mean(np.exp(1j * np.radians(values))))
    return float(np.degrees(math.sqrt(-2.0 * math.log(max(resultant, 1e-12)))))
  return float(values.std())
