"""Cardiac function biomarkers (cardiac_jax.cardiac) on curves and shapes with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from cardiac_jax import cardiac
from cardiac_jax import structures

LV, MYO, RV = structures.LV_BLOOD_POOL, structures.LV_MYOCARDIUM, structures.RV_BLOOD_POOL
FRAMES, DT = 50, 0.02          # One 1 s cycle in 50 frames.
TIMES = np.arange(FRAMES) * DT


def _cosine_curve(mean_ml=100.0, amplitude_ml=40.0):
  """V(t) = c + a cos(2 pi t / P): ED at t=0, ES at P/2, |dV/dt| peaks a 2 pi / P at P/4, 3P/4."""
  return mean_ml + amplitude_ml * np.cos(2 * np.pi * TIMES / (FRAMES * DT))


def _bump_integral(t, start, width, height):
  """Integral from `start` of height sin^2(pi (s - start) / width) (a C1 rate bump)."""
  x = np.clip(t - start, 0.0, width)
  return height * (x / 2 - width / (4 * np.pi) * np.sin(2 * np.pi * x / width))


# Rate bumps (start s, width s): ejection, early filling (E), atrial kick (A); diastasis between.
EJECTION, EARLY, ATRIAL = (0.0, 0.35), (0.38, 0.25), (0.78, 0.20)
E_RATE, A_RATE, EDV = 300.0, 150.0, 150.0


def _atrial_kick_curve(t=TIMES):
  """Volume with explicit early-filling and atrial peaks of E_RATE and A_RATE ml/s."""
  filled = E_RATE * EARLY[1] / 2 + A_RATE * ATRIAL[1] / 2
  ejection_rate = filled / (EJECTION[1] / 2)        # Closes the cycle: peak ejection rate.
  volume = (EDV + _bump_integral(t, *EJECTION, -ejection_rate)
            + _bump_integral(t, *EARLY, E_RATE) + _bump_integral(t, *ATRIAL, A_RATE))
  return volume, ejection_rate, EDV - filled


def test_cosine_curve_landmarks_and_peak_rates():
  curve = _cosine_curve()
  out = cardiac.volume_curve_biomarkers(curve, DT, window_length=7, polyorder=3)
  assert out["ed_frame"] == 0 and out["es_frame"] == FRAMES // 2
  assert out["lv_edv_ml"] == pytest.approx(140.0, rel=1e-3)
  assert out["lv_esv_ml"] == pytest.approx(60.0, rel=1e-3)
  assert out["lv_ef"] == pytest.approx(cardiac.ejection_fraction(140.0, 60.0), rel=1e-3)
  expected_rate = 40.0 * 2 * np.pi / (FRAMES * DT)
  assert out["peak_ejection_rate_ml_s"] == pytest.approx(expected_rate, rel=0.01)
  assert out["peak_filling_rate_ml_s"] == pytest.approx(expected_rate, rel=0.01)
  # A symmetric cosine has no atrial contribution.
  assert np.isnan(out["atrial_peak_filling_rate_ml_s"])
  assert out["atrial_contribution_frame"] == -1
  assert out["qc_passed"] and out["qc_reason"] == ""


def test_rates_scale_with_frame_interval_and_smoothing_removes_noise():
  curve = _cosine_curve()
  slow = cardiac.volume_curve_biomarkers(curve, 2 * DT)
  fast = cardiac.volume_curve_biomarkers(curve, DT)
  assert slow["peak_ejection_rate_ml_s"] == pytest.approx(fast["peak_ejection_rate_ml_s"] / 2)
  noisy = curve + np.random.default_rng(0).normal(0.0, 1.0, FRAMES)
  smoothed = cardiac.smooth_volume_curve(noisy, window_length=9, polyorder=3)
  assert np.abs(smoothed - curve).std() < 0.7 * np.abs(noisy - curve).std()
  # Polynomials up to the order are kept exactly away from the (periodic) boundary.
  line = np.linspace(10.0, 20.0, 30)
  assert np.allclose(cardiac.smooth_volume_curve(line, 7, 3)[5:-5], line[5:-5])


def test_atrial_kick_curve_gives_early_and_atrial_peaks():
  curve, ejection_rate, esv = _atrial_kick_curve()
  out = cardiac.volume_curve_biomarkers(curve, DT, window_length=7, polyorder=3)
  assert out["ed_frame"] in (0, FRAMES - 1)
  assert EJECTION[1] / DT - 1 <= out["es_frame"] <= EARLY[0] / DT   # ES plateau 0.35-0.38 s.
  assert out["lv_ef"] == pytest.approx(100 * (EDV - esv) / EDV, rel=0.01)
  assert out["peak_ejection_rate_ml_s"] == pytest.approx(ejection_rate, rel=0.02)
  assert out["peak_filling_rate_ml_s"] == pytest.approx(E_RATE, rel=0.02)
  assert out["atrial_peak_filling_rate_ml_s"] == pytest.approx(A_RATE, rel=0.03)
  # The inflection point lies in diastasis (between the two bumps, 0.63-0.78 s).
  diastasis = (EARLY[0] + EARLY[1]) / DT, ATRIAL[0] / DT
  assert diastasis[0] - 1 <= out["atrial_contribution_frame"] <= diastasis[1]


def test_atrial_peak_larger_than_early_peak_and_cycle_starting_mid_diastole():
  # E/A reversal (diastolic dysfunction): the late peak is the larger one and is still APFR.
  global E_RATE, A_RATE
  saved = E_RATE, A_RATE
  E_RATE, A_RATE = 120.0, 260.0
  try:
    curve, _, _ = _atrial_kick_curve()
  finally:
    E_RATE, A_RATE = saved
  rolled = np.roll(curve, -20)          # The acquisition starts in diastole, not at ED.
  rate = cardiac.volume_rate_ml_per_s(rolled, DT)
  ed, es = cardiac.end_diastole_end_systole(cardiac.smooth_volume_curve(rolled))
  filling = cardiac.filling_rates(rate, es, ed)
  assert filling.peak_filling_rate_ml_s == pytest.approx(120.0, rel=0.03)
  assert filling.atrial_peak_filling_rate_ml_s == pytest.approx(260.0, rel=0.03)
  per = cardiac.peak_ejection_rate(rate, ed, es)
  assert per == pytest.approx(cardiac.peak_ejection_rate(
      cardiac.volume_rate_ml_per_s(curve, DT), *cardiac.end_diastole_end_systole(curve)))


def test_bad_curves_and_windows_are_refused():
  with pytest.raises(ValueError, match="odd"):
    cardiac.smooth_volume_curve(np.ones(20), window_length=6)
  with pytest.raises(ValueError, match="exceeds"):
    cardiac.smooth_volume_curve(np.ones(5), window_length=7)
  with pytest.raises(ValueError, match="non-finite"):
    cardiac.smooth_volume_curve(np.array([1.0, np.nan] * 5), window_length=5)
  with pytest.raises(ValueError, match="frame interval"):
    cardiac.volume_rate_ml_per_s(np.ones(20), 0.0)


def test_quality_control_rule():
  curve = _cosine_curve()
  assert cardiac.volume_curve_qc(curve).passed
  drifted = curve.copy()
  drifted[-1] = curve[0] * 0.85                # 15 % lower at the end of the cycle.
  qc = cardiac.volume_curve_qc(drifted)
  assert not qc.passed and "15.0%" in qc.reason and "> 10%" in qc.reason
  drifted[-1] = curve[0] * 0.91                # 9 %: kept.
  assert cardiac.volume_curve_qc(drifted).passed
  assert not cardiac.volume_curve_qc(np.zeros(10)).passed
  out = cardiac.volume_curve_biomarkers(np.append(curve[:-1], curve[0] * 1.2), DT)
  assert out["qc_passed"] is False and "20.0%" in out["qc_reason"]


# ------------------------------------------------------------------------------ wall segments
def _segment_ring(shape, spacing, inner_mm, thickness_mm, centre=None):
  """(X, Y) slice: LV disc of radius inner_mm and a wall whose thickness in segment k (angle
  atan2(dy, dx) in [k 60, (k+1) 60) degrees around the centre) is thickness_mm[k]."""
  centre = centre or ((shape[0] - 1) / 2, (shape[1] - 1) / 2)
  rows, cols = np.mgrid[:shape[0], :shape[1]].astype(float)
  dx, dy = (rows - centre[0]) * spacing[0], (cols - centre[1]) * spacing[1]
  radius = np.hypot(dx, dy)
  segment = (np.mod(np.arctan2(dy, dx), 2 * np.pi) // (np.pi / 3)).astype(int).clip(0, 5)
  outer = inner_mm + np.asarray(thickness_mm, float)[segment]
  plane = np.zeros(shape, np.uint8)
  plane[radius < outer] = MYO
  plane[radius < inner_mm] = LV
  return plane


def test_segmental_thickness_of_rings_with_known_segments():
  spacing = (0.5, 0.5)
  thickness = (4.0, 6.0, 8.0, 10.0, 6.0, 5.0)
  plane = _segment_ring((120, 120), spacing, 15.0, thickness)
  measured = cardiac.segmental_wall_thickness_mm(plane, spacing)
  assert np.allclose(measured, thickness, atol=0.1)
  # Rotating the reference by one segment rotates the result.
  rolled = cardiac.segmental_wall_thickness_mm(plane, spacing, reference_angle=np.pi / 3)
  assert np.allclose(rolled, np.roll(thickness, -1), atol=0.1)


def test_wall_thickening_variance_known_segments():
  spacing = (0.5, 0.5, 8.0)
  ed_thickness = (6.0,) * 6
  es_thickness = (9.0, 9.0, 12.0, 12.0, 9.0, 9.0)   # Thickening 50, 50, 100, 100, 50, 50 %.
  expected = np.var([50.0, 50.0, 100.0, 100.0, 50.0, 50.0])
  ed = np.zeros((120, 120, 3), np.uint8)
  es = np.zeros_like(ed)
  for z in range(2):
    ed[:, :, z] = _segment_ring((120, 120), spacing[:2], 16.0, ed_thickness)
    es[:, :, z] = _segment_ring((120, 120), spacing[:2], 11.0, es_thickness)
  # Slice 2 has no LV: not measurable, ignored.
  variance = cardiac.wall_thickening_variance(ed, es, spacing)
  assert variance == pytest.approx(expected, rel=0.05)
  # Uniform thickening: no variance.
  uniform_es = np.zeros_like(ed)
  uniform_es[:, :, 0] = _segment_ring((120, 120), spacing[:2], 11.0, (9.0,) * 6)
  uniform_ed = np.zeros_like(ed)
  uniform_ed[:, :, 0] = ed[:, :, 0]
  assert cardiac.wall_thickening_variance(uniform_ed, uniform_es, spacing) < 0.05 * expected
  with pytest.raises(ValueError, match="no slice"):
    cardiac.wall_thickening_variance(np.zeros_like(ed), es, spacing)


def test_septal_reference_follows_the_rv():
  spacing = (0.5, 0.5)
  rows, cols = np.mgrid[:120, :120]
  thickness = (4.0, 5.0, 8.0, 9.0, 6.0, 7.0)
  plane = _segment_ring((120, 120), spacing, 15.0, thickness)
  plane[(rows < 8) & (np.abs(cols - 59.5) < 15)] = RV       # RV towards -x (angle pi).
  reference = cardiac._septal_reference_angle(plane, spacing)
  # Segments 0 and 1 straddle the direction of the RV: they start at pi - pi/3 ...
  assert np.mod(reference, 2 * np.pi) == pytest.approx(np.pi - np.pi / 3, abs=0.05)
  # ... so they are the ring's segments 2 and 3 (the septal wall).
  measured = cardiac.segmental_wall_thickness_mm(plane, spacing, reference)
  assert np.allclose(measured, np.roll(thickness, -2), atol=0.3)
  assert np.allclose(cardiac.segmental_wall_thickening_percent(plane, plane, spacing), 0.0)


def test_biomarkers_of_one_subject_from_per_frame_rings():
  spacing = (1.0, 1.0, 8.0)
  # LV radius follows a cosine over 20 frames; the wall keeps a constant area (thickens).
  frames = 20
  radius = 14.0 + 4.0 * np.cos(2 * np.pi * np.arange(frames) / frames)
  wall_area = np.pi * (22.0 ** 2 - 18.0 ** 2)
  labels = np.zeros((frames, 64, 64, 2), np.uint8)
  for t, r in enumerate(radius):
    outer = np.sqrt(r ** 2 + wall_area / np.pi)
    for z in range(2):
      labels[t, :, :, z] = _segment_ring((64, 64), spacing[:2], r, (outer - r,) * 6)
  out = cardiac.biomarkers(labels, spacing, frame_interval_s=0.05, window_length=5)
  volumes = cardiac.lv_volume_curve_ml(labels, cardiac.voxel_volume_ml(spacing))
  assert volumes[0] == pytest.approx(np.sum(labels[0] == LV) * 0.008)
  assert out["ed_frame"] == 0 and out["es_frame"] == frames // 2
  assert out["lv_ef"] == pytest.approx(100 * (1 - (10.0 / 18.0) ** 2), abs=3.0)
  assert out["wall_thickening_variance"] < 50.0   # Uniform thickening up to digitisation.
  assert set(cardiac.BIOMARKER_NAMES) <= set(out)
  with pytest.raises(ValueError, match="does not match"):
    cardiac.biomarkers(labels, spacing, 0.05, volumes_ml=np.ones(3))
