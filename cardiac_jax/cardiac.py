"""Clinical measurements of the heart from short-axis segmentations.

Pure numpy/scipy; label maps use the canonical convention of `cardiac_jax.structures`
(0 background, 1 RV blood pool, 2 LV myocardium, 3 LV blood pool) and are (X, Y, Z) arrays
with voxel spacing (dx, dy, dz) in mm, as read from a NIfTI header.

Formulas (the standard ones of the ACDC challenge and of UK Biobank CMR analyses):
- structure volume [ml] = voxel count x voxel volume [mm^3] / 1000;
- stroke volume SV = EDV - ESV [ml];
- ejection fraction EF = SV / EDV x 100 [%];
- myocardial mass [g] = myocardial volume at ED [ml] x 1.05 g/ml (myocardial tissue density);
- mean LV wall thickness [mm]: on every short-axis slice where the LV blood pool is enclosed by
  myocardium (a closed ring), for each endocardial point (myocardium pixel touching the blood
  pool) the in-plane Euclidean distance to the nearest pixel outside the epicardium (neither
  blood pool nor myocardium); averaged over the endocardial points of a slice, then over those
  slices. Measured at ED. Distances are between pixel centres, so a ring T pixels thick
  measures T pixels.

Cardiac function biomarkers over the whole cycle (Clough et al. 2019, "Global and local
interpretability for cardiac MRI classification", after Ruijsink et al. 2019, JACC CV Imaging):
- LV volume curve V(t) [ml] = LV blood-pool voxel count of every frame x voxel volume;
- smoothing and the first derivative dV/dt [ml/s] by Savitzky-Golay least-squares polynomials
  (Savitzky & Golay 1964) with periodic ('wrap') boundaries, because the frames cover one
  full, closed cardiac cycle;
- ED = frame of the maximum of the smoothed curve, ES = frame of its minimum; EF from them with
  `ejection_fraction` (percent);
- ejection phase = frames from ED forward (cyclically) to ES; filling phase = frames from ES
  forward to the frame before the next ED;
- peak ejection rate PER = max(-dV/dt) over the ejection phase; peak (early) filling rate
  PFR = max(dV/dt) over the early-filling part of the filling phase; atrial peak filling rate
  APFR = max(dV/dt) over its late-filling part (see `filling_rates` for the inflection point
  that separates them); all three are positive magnitudes in ml/s;
- LV wall-thickening variance: per slice, the myocardium is cut into six 60-degree segments
  around the LV blood-pool centroid; each segment's thickness (that of the circular sector with
  the segment's cavity and wall areas) is measured at ED and at ES, its
  systolic thickening is (thickness_ES - thickness_ED) / thickness_ED x 100 [%], and the
  population variance of the six thickenings [%^2] is averaged over the slices with a closed
  ring at both ED and ES;
- quality control: a subject is excluded when the LV volume of its first and last frame differ
  by more than 10 % of the first (the curve of one closed cycle must return to its start).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from scipy import ndimage
from scipy import signal

from cardiac_jax import structures

MYOCARDIAL_DENSITY_G_PER_ML = 1.05

# 4-connectivity in plane: a blood pool touching the background only diagonally still counts
# as enclosed, which matches how a one-pixel-thick digital ring is drawn.
_IN_PLANE_CROSS = ndimage.generate_binary_structure(2, 1)


def _check_spacing(spacing_mm) -> tuple[float, float, float]:
  spacing = tuple(float(s) for s in spacing_mm)
  if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
    raise ValueError(f"voxel spacing must be three positive finite mm values, got {spacing_mm}")
  return spacing


def voxel_volume_ml(spacing_mm) -> float:
  """Volume of one voxel in ml for spacing (dx, dy, dz) in mm."""
  dx, dy, dz = _check_spacing(spacing_mm)
  return dx * dy * dz / 1000.0


def structure_volume_ml(labels: np.ndarray, label_value: int, spacing_mm) -> float:
  """Volume in ml of the voxels equal to `label_value` in a (X, Y, Z) label map."""
  if labels.ndim != 3:
    raise ValueError(f"expected a (X, Y, Z) label map, got shape {labels.shape}")
  return float(np.count_nonzero(labels == label_value)) * voxel_volume_ml(spacing_mm)


def structure_volumes_ml(labels: np.ndarray, spacing_mm) -> dict[str, float]:
  """LV blood pool, RV blood pool and LV myocardium volumes (ml) of one (X, Y, Z) frame."""
  return {
      "lv": structure_volume_ml(labels, structures.LV_BLOOD_POOL, spacing_mm),
      "rv": structure_volume_ml(labels, structures.RV_BLOOD_POOL, spacing_mm),
      "myo": structure_volume_ml(labels, structures.LV_MYOCARDIUM, spacing_mm),
  }


def stroke_volume_ml(edv_ml: float, esv_ml: float) -> float:
  """SV = EDV - ESV in ml."""
  return float(edv_ml - esv_ml)


def ejection_fraction(edv_ml: float, esv_ml: float) -> float:
  """EF in percent: (EDV - ESV) / EDV x 100. Raises ValueError for a non-positive EDV."""
  if not edv_ml > 0:
    raise ValueError(f"ejection fraction needs a positive end-diastolic volume, got {edv_ml} ml")
  return float(100.0 * (edv_ml - esv_ml) / edv_ml)


def myocardial_mass_g(myo_volume_ml: float) -> float:
  """Myocardial mass in g from the myocardial volume in ml (density 1.05 g/ml)."""
  return float(myo_volume_ml * MYOCARDIAL_DENSITY_G_PER_ML)


def closed_lv_ring(slice_labels: np.ndarray) -> bool:
  """Whether the LV blood pool of a (X, Y) slice is present and enclosed by myocardium."""
  lv = slice_labels == structures.LV_BLOOD_POOL
  if not lv.any():
    return False
  wall = lv | (slice_labels == structures.LV_MYOCARDIUM)
  # Pad so a blood pool touching the image border counts as open.
  grown = ndimage.binary_dilation(np.pad(lv, 1), structure=_IN_PLANE_CROSS)
  return not np.any(grown & ~np.pad(wall, 1))


def slice_wall_thickness_mm(slice_labels: np.ndarray, spacing_mm: tuple[float, float]) -> float:
  """Mean LV wall thickness (mm) of one (X, Y) slice with a closed LV ring.

  Endocardial points are myocardium pixels 4-adjacent to the LV blood pool; each contributes
  its distance to the nearest pixel outside the epicardium (see the module docstring).
  """
  if not closed_lv_ring(slice_labels):
    raise ValueError("slice has no closed LV myocardial ring")
  lv = slice_labels == structures.LV_BLOOD_POOL
  myo = slice_labels == structures.LV_MYOCARDIUM
  # Padding with background guarantees an outside pixel even if the wall reaches the border.
  inside_epicardium = np.pad(lv | myo, 1)
  distance_to_outside = ndimage.distance_transform_edt(
      inside_epicardium, sampling=tuple(float(s) for s in spacing_mm))
  endocardium = np.pad(myo, 1) & ndimage.binary_dilation(np.pad(lv, 1),
                                                          structure=_IN_PLANE_CROSS)
  return float(distance_to_outside[endocardium].mean())


def mean_wall_thickness_mm(labels: np.ndarray, spacing_mm) -> float:
  """Mean LV wall thickness (mm) of a (X, Y, Z) frame over its slices with a closed LV ring.

  Raises ValueError when no slice has a closed ring.
  """
  dx, dy, _ = _check_spacing(spacing_mm)
  per_slice = [slice_wall_thickness_mm(labels[:, :, z], (dx, dy))
               for z in range(labels.shape[2]) if closed_lv_ring(labels[:, :, z])]
  if not per_slice:
    raise ValueError("no slice has a closed LV myocardial ring; wall thickness is undefined")
  return float(np.mean(per_slice))


def subject_attributes(ed_labels: np.ndarray, es_labels: np.ndarray,
                       spacing_mm) -> dict[str, float]:
  """All per-subject attributes, keyed exactly by `structures.ATTRIBUTE_NAMES`.

  Args:
    ed_labels: (X, Y, Z) canonical label map at end-diastole.
    es_labels: (X, Y, Z) canonical label map at end-systole, same shape.
    spacing_mm: voxel spacing (dx, dy, dz) in mm.

  Returns:
    Volumes in ml, EFs in percent, stroke volume in ml, myocardial mass in g (from the ED
    myocardium) and mean LV wall thickness in mm (at ED).

  Raises:
    ValueError: shapes differ, an EDV is zero, or no slice has a closed LV ring.
  """
  if ed_labels.shape != es_labels.shape:
    raise ValueError(f"ED labels {ed_labels.shape} and ES labels {es_labels.shape} differ in shape")
  ed = structure_volumes_ml(ed_labels, spacing_mm)
  es = structure_volumes_ml(es_labels, spacing_mm)
  attributes = {
      "lv_edv_ml": ed["lv"],
      "lv_esv_ml": es["lv"],
      "rv_edv_ml": ed["rv"],
      "rv_esv_ml": es["rv"],
      "myo_ed_ml": ed["myo"],
      "myo_es_ml": es["myo"],
      "lv_ef": ejection_fraction(ed["lv"], es["lv"]),
      "rv_ef": ejection_fraction(ed["rv"], es["rv"]),
      "lv_sv_ml": stroke_volume_ml(ed["lv"], es["lv"]),
      "myo_mass_g": myocardial_mass_g(ed["myo"]),
      "lv_wall_thickness_mm": mean_wall_thickness_mm(ed_labels, spacing_mm),
  }
  assert tuple(attributes) == structures.ATTRIBUTE_NAMES, "attribute names out of sync"
  return attributes


# ------------------------------------------------------------------------------------------
# Cardiac function over the whole cycle (module docstring: "Cardiac function biomarkers")
# ------------------------------------------------------------------------------------------

# Scalar biomarkers of `biomarkers` usable as TCAV concepts, in table order.
BIOMARKER_NAMES: tuple[str, ...] = (
    "lv_ef", "peak_ejection_rate_ml_s", "peak_filling_rate_ml_s",
    "atrial_peak_filling_rate_ml_s", "wall_thickening_variance",
)
NUM_WALL_SEGMENTS = 6
QC_MAX_RELATIVE_VOLUME_DIFFERENCE = 0.10


def lv_volume_curve_ml(labels: np.ndarray, voxel_ml: float) -> np.ndarray:
  """LV blood-pool volume (ml) of every frame.

  Args:
    labels: (T, ...) canonical label maps, one per frame (e.g. (T, X, Y, Z)).
    voxel_ml: volume of one voxel in ml (`voxel_volume_ml(spacing_mm)`).

  Returns:
    (T,) float64 volumes in ml.
  """
  labels = np.asarray(labels)
  if labels.ndim < 2:
    raise ValueError(f"expected (T, ...) per-frame label maps, got shape {labels.shape}")
  if not (np.isfinite(voxel_ml) and voxel_ml > 0):
    raise ValueError(f"voxel volume must be a positive finite ml value, got {voxel_ml}")
  counts = np.count_nonzero(labels.reshape(labels.shape[0], -1) == structures.LV_BLOOD_POOL,
                            axis=1)
  return counts.astype(np.float64) * float(voxel_ml)


def _check_curve(volumes_ml, window_length: int, polyorder: int) -> np.ndarray:
  curve = np.asarray(volumes_ml, dtype=np.float64)
  if curve.ndim != 1:
    raise ValueError(f"expected a (T,) volume curve, got shape {curve.shape}")
  if not np.all(np.isfinite(curve)):
    raise ValueError("volume curve has non-finite values")
  if window_length % 2 != 1 or window_length <= polyorder:
    raise ValueError(f"Savitzky-Golay window_length must be odd and > polyorder, got "
                     f"window_length={window_length}, polyorder={polyorder}")
  if window_length > curve.shape[0]:
    raise ValueError(f"Savitzky-Golay window_length {window_length} exceeds the {curve.shape[0]} "
                     "frames of the volume curve")
  return curve


def smooth_volume_curve(volumes_ml, window_length: int = 7, polyorder: int = 3) -> np.ndarray:
  """(T,) volumes -> (T,) Savitzky-Golay smoothed volumes (periodic boundaries, one cycle)."""
  curve = _check_curve(volumes_ml, window_length, polyorder)
  return signal.savgol_filter(curve, window_length, polyorder, mode="wrap")


def volume_rate_ml_per_s(volumes_ml, frame_interval_s: float, window_length: int = 7,
                         polyorder: int = 3) -> np.ndarray:
  """(T,) volumes -> (T,) dV/dt in ml/s: the derivative of the Savitzky-Golay fit.

  The derivative of the local least-squares polynomial smooths and differentiates in one step,
  which is the use Savitzky & Golay designed the filter for (no separate finite difference).
  """
  curve = _check_curve(volumes_ml, window_length, polyorder)
  if not (np.isfinite(frame_interval_s) and frame_interval_s > 0):
    raise ValueError(f"frame interval must be a positive number of seconds, got "
                     f"{frame_interval_s}")
  return signal.savgol_filter(curve, window_length, polyorder, deriv=1,
                              delta=float(frame_interval_s), mode="wrap")


def end_diastole_end_systole(smoothed_ml) -> tuple[int, int]:
  """(ED, ES) frame indices: the maximum and the minimum of the smoothed (T,) curve."""
  curve = np.asarray(smoothed_ml, dtype=np.float64)
  return int(np.argmax(curve)), int(np.argmin(curve))


def _cyclic_frames(start: int, stop: int, num_frames: int) -> np.ndarray:
  """Frames start, start+1, ..., stop (inclusive), wrapping around the end of the cycle."""
  return (start + np.arange((stop - start) % num_frames + 1)) % num_frames


def peak_ejection_rate(rate_ml_s, ed_frame: int, es_frame: int) -> float:
  """PER (ml/s, positive): max(-dV/dt) over the ejection phase ED..ES (cyclic)."""
  rate = np.asarray(rate_ml_s, dtype=np.float64)
  frames = _cyclic_frames(ed_frame, es_frame, rate.shape[0])
  return float(max(np.max(-rate[frames]), 0.0))


@dataclasses.dataclass(frozen=True)
class FillingRates:
  """Peak filling rates of one cycle.

  peak_filling_rate_ml_s: PFR, max dV/dt of early filling (of all filling when there is no
    atrial contribution).
  atrial_peak_filling_rate_ml_s: APFR, max dV/dt after the atrial-contribution point; NaN when
    the filling rate has no separate late peak.
  atrial_contribution_frame: the inflection point of V(t) that starts the atrial contribution
    (-1 when none).
  """
  peak_filling_rate_ml_s: float
  atrial_peak_filling_rate_ml_s: float
  atrial_contribution_frame: int


def filling_rates(rate_ml_s, es_frame: int, ed_frame: int,
                  min_relative_prominence: float = 0.05) -> FillingRates:
  """PFR, APFR and the atrial-contribution (AC) point from the filling phase of dV/dt.

  The filling phase is the frames ES, ES+1, ..., ED-1 (cyclic). During filling the volume
  rate r = dV/dt rises to the early-filling peak, falls in diastasis and rises again when the
  atrium contracts. AC is the inflection point of V(t) between the two: the frame where r has
  its minimum between the early peak and the atrial peak (dr/dt = d2V/dt2 changes sign from
  negative to positive, V turns from concave to convex). Precisely:
  1. peaks = local maxima of r over the filling phase with positive rate and a prominence of at
     least `min_relative_prominence` x max(r) (scipy.signal.find_peaks; the frames just before
     ES and at ED are included as neighbours so a peak on the first or last filling frame
     counts);
  2. with fewer than two peaks there is no separate atrial contribution: PFR = max r over the
     filling phase, APFR = NaN, AC = -1;
  3. otherwise early peak = the first peak, atrial peak = the largest later peak,
     AC = argmin r over [early peak, atrial peak]; PFR = max r over [ES, AC],
     APFR = max r over [AC, ED - 1].

  Args:
    rate_ml_s: (T,) dV/dt in ml/s (`volume_rate_ml_per_s`).
    es_frame, ed_frame: ES and (next) ED frame indices.
    min_relative_prominence: peaks smaller than this fraction of the largest filling rate are
      treated as noise.
  """
  rate = np.asarray(rate_ml_s, dtype=np.float64)
  num_frames = rate.shape[0]
  frames = _cyclic_frames(es_frame, (ed_frame - 1) % num_frames, num_frames)
  r = rate[frames]
  padded = rate[np.concatenate([[(frames[0] - 1) % num_frames], frames,
                                [(frames[-1] + 1) % num_frames]])]
  top = float(np.max(r))
  if top <= 0:
    return FillingRates(0.0, float("nan"), -1)
  peaks, _ = signal.find_peaks(padded, prominence=min_relative_prominence * top)
  peaks = [p - 1 for p in peaks if 1 <= p <= len(r) and r[p - 1] > 0]
  if len(peaks) < 2:
    return FillingRates(top, float("nan"), -1)
  early = peaks[0]
  late = max(peaks[1:], key=lambda p: r[p])
  ac = early + int(np.argmin(r[early:late + 1]))
  return FillingRates(float(np.max(r[:ac + 1])), float(np.max(r[ac:])), int(frames[ac]))


@dataclasses.dataclass(frozen=True)
class QualityControl:
  """Outcome of the volume-curve quality control: passed, or excluded with the reason."""
  passed: bool
  reason: str


def volume_curve_qc(volumes_ml,
                    max_relative_difference: float = QC_MAX_RELATIVE_VOLUME_DIFFERENCE
                    ) -> QualityControl:
  """Excludes a subject whose first and last frame LV volumes differ by more than
  `max_relative_difference` of the first (raw, unsmoothed curve): one closed cycle must end
  where it began, otherwise the segmentation of some frames is physiologically implausible."""
  curve = np.asarray(volumes_ml, dtype=np.float64)
  if curve.ndim != 1 or curve.shape[0] < 2:
    raise ValueError(f"expected a (T,) volume curve with T >= 2, got shape {curve.shape}")
  first, last = float(curve[0]), float(curve[-1])
  if not first > 0:
    return QualityControl(False, f"first-frame LV volume is {first:.3g} ml (no LV blood pool)")
  difference = abs(last - first) / first
  if difference > max_relative_difference:
    return QualityControl(False, (
        f"first ({first:.1f} ml) and last ({last:.1f} ml) frame LV volumes differ by "
        f"{100 * difference:.1f}% (> {100 * max_relative_difference:.0f}%)"))
  return QualityControl(True, "")


def segmental_wall_thickness_mm(slice_labels: np.ndarray, spacing_mm: tuple[float, float],
                                reference_angle: float = 0.0) -> np.ndarray:
  """LV wall thickness (mm) of each of six 60-degree segments of one (X, Y) slice.

  Angles are measured around the LV blood-pool centroid (in mm), atan2(dy, dx) with x the first
  array axis; segment k holds the pixels with angle - reference_angle (mod 2 pi) in
  [k pi/3, (k+1) pi/3). A segment's thickness is that of the circular sector with the same
  cavity and wall areas: with theta = pi/3, cavity area A_c and myocardial area A_m inside the
  segment, r_endo = sqrt(2 A_c / theta), r_epi = sqrt(2 (A_c + A_m) / theta) and thickness =
  r_epi - r_endo. Areas are exact sums of pixels, so a segment's value does not depend on its
  neighbours (a nearest-outside-pixel distance, as in `slice_wall_thickness_mm`, would take
  the thinner neighbour's value near a segment border); for a concentric ring it is the radial
  wall thickness.

  Returns:
    (6,) thicknesses in mm. Raises ValueError without a closed ring or when a segment holds no
    cavity or no myocardium.
  """
  if not closed_lv_ring(slice_labels):
    raise ValueError("slice has no closed LV myocardial ring")
  lv = slice_labels == structures.LV_BLOOD_POOL
  myo = slice_labels == structures.LV_MYOCARDIUM
  sx, sy = (float(s) for s in spacing_mm)
  cx, cy = (np.mean(axis) for axis in np.nonzero(lv))
  px, py = np.nonzero(lv | myo)
  angle = np.mod(np.arctan2((py - cy) * sy, (px - cx) * sx) - reference_angle, 2 * np.pi)
  theta = 2 * np.pi / NUM_WALL_SEGMENTS
  segment = np.minimum((angle / theta).astype(int), NUM_WALL_SEGMENTS - 1)
  in_cavity = lv[px, py]
  pixel_mm2 = sx * sy
  cavity = np.bincount(segment[in_cavity], minlength=NUM_WALL_SEGMENTS) * pixel_mm2
  wall = np.bincount(segment[~in_cavity], minlength=NUM_WALL_SEGMENTS) * pixel_mm2
  if np.any(cavity == 0) or np.any(wall == 0):
    raise ValueError(f"a wall segment has no cavity or no myocardium (cavity areas {cavity}, "
                     f"wall areas {wall} mm^2)")
  return np.sqrt(2 * (cavity + wall) / theta) - np.sqrt(2 * cavity / theta)


def _septal_reference_angle(slice_labels: np.ndarray, spacing_mm: tuple[float, float]) -> float:
  """Start angle of segment 0 such that segments 0 and 1 straddle the direction from the LV to
  the RV centroid (the septum), which makes segments comparable between subjects; 0 when the
  slice has no RV."""
  lv = slice_labels == structures.LV_BLOOD_POOL
  rv = slice_labels == structures.RV_BLOOD_POOL
  if not rv.any() or not lv.any():
    return 0.0
  (lx, ly), (rx, ry) = ([np.mean(a) for a in np.nonzero(m)] for m in (lv, rv))
  sx, sy = (float(s) for s in spacing_mm)
  return float(math.atan2((ry - ly) * sy, (rx - lx) * sx) - 2 * np.pi / NUM_WALL_SEGMENTS)


def segmental_wall_thickening_percent(ed_slice: np.ndarray, es_slice: np.ndarray,
                                      spacing_mm: tuple[float, float]) -> np.ndarray:
  """(6,) systolic thickening (thickness_ES - thickness_ED) / thickness_ED x 100 per segment of
  one slice; both frames use the ED slice's segment orientation."""
  reference = _septal_reference_angle(ed_slice, spacing_mm)
  ed = segmental_wall_thickness_mm(ed_slice, spacing_mm, reference)
  es = segmental_wall_thickness_mm(es_slice, spacing_mm, reference)
  return 100.0 * (es - ed) / ed


def wall_thickening_variance(ed_labels: np.ndarray, es_labels: np.ndarray, spacing_mm) -> float:
  """Variance (%^2) of segmental wall thickening across six segments, mean over slices.

  Args:
    ed_labels, es_labels: (X, Y, Z) canonical label maps at ED and ES.
    spacing_mm: (dx, dy, dz) or (dx, dy) in mm (only the in-plane spacing is used).

  Raises ValueError when no slice has a closed ring at both ED and ES.
  """
  if ed_labels.shape != es_labels.shape or ed_labels.ndim != 3:
    raise ValueError(f"expected two (X, Y, Z) label maps of one shape, got {ed_labels.shape} "
                     f"and {es_labels.shape}")
  spacing_xy = tuple(float(s) for s in tuple(spacing_mm)[:2])
  variances = []
  for z in range(ed_labels.shape[2]):
    ed, es = ed_labels[:, :, z], es_labels[:, :, z]
    if closed_lv_ring(ed) and closed_lv_ring(es):
      try:
        thickening = segmental_wall_thickening_percent(ed, es, spacing_xy)
      except ValueError:  # A ring too small to have six segments: not measurable.
        continue
      variances.append(float(np.var(thickening)))
  if not variances:
    raise ValueError("no slice has a closed LV ring with six segments at both ED and ES; wall "
                     "thickening is undefined")
  return float(np.mean(variances))


def volume_curve_biomarkers(volumes_ml, frame_interval_s: float, window_length: int = 7,
                            polyorder: int = 3) -> dict[str, Any]:
  """Every biomarker of the LV volume curve of one subject.

  Args:
    volumes_ml: (T,) raw LV blood-pool volumes of one cardiac cycle.
    frame_interval_s: time between frames in s.
    window_length, polyorder: Savitzky-Golay parameters (odd window <= T, in frames).

  Returns:
    lv_edv_ml, lv_esv_ml (smoothed curve), lv_ef (%), peak_ejection_rate_ml_s,
    peak_filling_rate_ml_s, atrial_peak_filling_rate_ml_s (NaN without an atrial
    contribution), ed_frame, es_frame, atrial_contribution_frame (-1 if none), qc_passed,
    qc_reason.
  """
  smoothed = smooth_volume_curve(volumes_ml, window_length, polyorder)
  rate = volume_rate_ml_per_s(volumes_ml, frame_interval_s, window_length, polyorder)
  ed, es = end_diastole_end_systole(smoothed)
  filling = filling_rates(rate, es, ed)
  qc = volume_curve_qc(volumes_ml)
  return {
      "lv_edv_ml": float(smoothed[ed]),
      "lv_esv_ml": float(smoothed[es]),
      "lv_ef": ejection_fraction(smoothed[ed], smoothed[es]),
      "peak_ejection_rate_ml_s": peak_ejection_rate(rate, ed, es),
      "peak_filling_rate_ml_s": filling.peak_filling_rate_ml_s,
      "atrial_peak_filling_rate_ml_s": filling.atrial_peak_filling_rate_ml_s,
      "ed_frame": ed,
      "es_frame": es,
      "atrial_contribution_frame": filling.atrial_contribution_frame,
      "qc_passed": qc.passed,
      "qc_reason": qc.reason,
  }


def biomarkers(labels: np.ndarray, spacing_mm, frame_interval_s: float,
               window_length: int = 7, polyorder: int = 3,
               volumes_ml=None) -> dict[str, Any]:
  """All cardiac function biomarkers of one subject from its per-frame segmentations.

  Args:
    labels: (T, X, Y, Z) canonical label maps of one cardiac cycle.
    spacing_mm: voxel spacing (dx, dy, dz) in mm.
    frame_interval_s: time between frames in s.
    window_length, polyorder: Savitzky-Golay parameters.
    volumes_ml: optional (T,) LV volume curve measured on the whole stack, used instead of the
      one counted in `labels` (e.g. when `labels` holds only a few slices).

  Returns:
    The keys of `volume_curve_biomarkers` plus wall_thickening_variance (%^2, between the ED
    and ES frames of the curve; NaN when no slice has a measurable closed ring).
  """
  labels = np.asarray(labels)
  if labels.ndim != 4:
    raise ValueError(f"expected (T, X, Y, Z) label maps, got shape {labels.shape}")
  if volumes_ml is None:
    volumes_ml = lv_volume_curve_ml(labels, voxel_volume_ml(spacing_mm))
  elif np.shape(volumes_ml) != (labels.shape[0],):
    raise ValueError(f"volume curve shape {np.shape(volumes_ml)} does not match the "
                     f"{labels.shape[0]} frames of the labels")
  out = volume_curve_biomarkers(volumes_ml, frame_interval_s, window_length, polyorder)
  try:
    out["wall_thickening_variance"] = wall_thickening_variance(
        labels[out["ed_frame"]], labels[out["es_frame"]], spacing_mm)
  except ValueError:
    out["wall_thickening_variance"] = float("nan")
  return out
