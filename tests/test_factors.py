"""Factor measurement on drawn hearts with known answers: areas, wall thickness, rotation of the
LV -> RV axis (across the +-180 degree seam), position, intensity, absent structures; and the
rank statistics used to score latent directions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cardiac_jax import factors, structures

SIZE = 96


def draw_heart(lv_radius: float = 12.0, wall: float = 4.0, rv_radius: float = 7.0,
               angle_deg: float = 0.0, centre=(47.5, 47.5), size: int = SIZE,
               lv_intensity: float = 0.9, with_rv: bool = True, with_lv: bool = True):
  """(labels, image): an LV disc in a myocardial ring of width `wall`, and an RV disc whose
  centre sits `angle_deg` counter-clockwise (as displayed) from the canonical left side."""
  yy, xx = np.mgrid[:size, :size].astype(np.float64)
  cy, cx = centre
  d = np.hypot(yy - cy, xx - cx)
  labels = np.zeros((size, size), np.uint8)
  image = np.zeros((size, size), np.float64)
  if with_rv:
    reach = lv_radius + wall + rv_radius + 1.0
    a = math.radians(angle_deg)
    ry, rx = cy + reach * math.sin(a), cx - reach * math.cos(a)
    rv = np.hypot(yy - ry, xx - rx) < rv_radius
    labels[rv], image[rv] = structures.RV_BLOOD_POOL, 0.6
  ring = d < lv_radius + wall
  labels[ring], image[ring] = structures.LV_MYOCARDIUM, 0.3
  if with_lv:
    lv = d < lv_radius
    labels[lv], image[lv] = structures.LV_BLOOD_POOL, lv_intensity
  return labels, image


@pytest.mark.parametrize("radius", [6.0, 10.0, 15.0])
def test_lv_disc_area_is_pi_r_squared(radius):
  labels, image = draw_heart(lv_radius=radius)
  out = factors.measure_factors(labels, image)
  assert abs(out["lv_area"] - math.pi * radius ** 2) < 0.04 * math.pi * radius ** 2
  assert abs(out["rv_area"] - math.pi * 7.0 ** 2) < 0.05 * math.pi * 49.0


@pytest.mark.parametrize("wall", [2.0, 4.0, 7.0])
def test_ring_width_is_the_myocardial_thickness(wall):
  labels, _ = draw_heart(lv_radius=11.0, wall=wall)
  thickness = factors.measure_factors(labels)["myo_thickness"]
  assert abs(thickness - wall) < 0.12 * wall + 0.1, thickness


@pytest.mark.parametrize("angle", [0.0, 35.0, 90.0, -60.0, 150.0, 179.0, -179.0])
def test_rv_placed_at_an_angle_gives_that_rotation(angle):
  labels, _ = draw_heart(angle_deg=angle)
  rotation = factors.measure_factors(labels)["rotation"]
  assert abs(factors.wrap_degrees(rotation - angle)) < 2.0, (angle, rotation)
  assert -180.0 < rotation <= 180.0


def test_position_is_the_lv_centroid_from_the_image_centre_and_intensity_its_median():
  labels, image = draw_heart(centre=(40.0, 55.0), lv_intensity=0.75)
  out = factors.measure_factors(labels, image)
  assert abs(out["position_x"] - (55.0 - 47.5)) < 0.1
  assert abs(out["position_y"] - (40.0 - 47.5)) < 0.1
  assert out["intensity"] == pytest.approx(0.75)


def test_absent_structures_give_nan_and_specks_are_ignored():
  labels, image = draw_heart(with_rv=False)
  out = factors.measure_factors(labels, image)
  assert np.isnan(out["rv_area"]) and np.isnan(out["rotation"])
  assert np.isfinite(out["lv_area"]) and np.isfinite(out["myo_thickness"])
  no_lv_labels, no_lv_image = draw_heart(with_lv=False)
  no_lv = factors.measure_factors(no_lv_labels, no_lv_image)
  for name in ("lv_area", "myo_thickness", "rotation", "position_x", "position_y"):
    assert np.isnan(no_lv[name]), name
  # Without an LV the intensity is the median over the whole heart (myocardium 0.3, RV 0.6).
  heart = no_lv_labels > 0
  assert no_lv["intensity"] in (0.3, 0.6) and np.sum(heart) > 0
  empty = factors.measure_factors(np.zeros((8, 8), np.uint8), np.zeros((8, 8)))
  assert all(np.isnan(v) for v in empty.values())
  # A stray LV pixel far away moves neither the area nor the centroid.
  clean = factors.measure_factors(labels, image)
  labels[2, 2] = structures.LV_BLOOD_POOL
  speckled = factors.measure_factors(labels, image)
  assert speckled["lv_area"] == clean["lv_area"]
  assert speckled["position_x"] == clean["position_x"]


def test_intensity_ignores_blurred_boundaries():
  """A blurred LV of any size has the intensity of its plateau, and a brighter LV a higher one."""
  from scipy import ndimage
  values = []
  for radius, brightness in ((5.0, 0.8), (9.0, 0.8), (14.0, 0.8), (9.0, 0.9)):
    labels, image = draw_heart(lv_radius=radius, lv_intensity=brightness)
    blurred = ndimage.uniform_filter(image, 3)  # Mixes each boundary pixel with its neighbours.
    values.append(factors.measure_factors(labels, blurred)["intensity"])
  np.testing.assert_allclose(values[:3], 0.8, atol=1e-6)
  assert values[3] == pytest.approx(0.9)


def test_measure_batch_and_shape_errors():
  hearts = [draw_heart(lv_radius=r) for r in (6.0, 9.0, 12.0)]
  out = factors.measure_batch(np.stack([h[0] for h in hearts]), np.stack([h[1] for h in hearts]))
  assert set(out) == set(factors.FACTORS)
  assert np.all(np.diff(out["lv_area"]) > 0) and out["lv_area"].shape == (3,)
  with pytest.raises(ValueError, match=r"\(N, H, W\)"):
    factors.measure_batch(hearts[0][0])
  with pytest.raises(ValueError, match="differs"):
    factors.measure_factors(hearts[0][0], np.zeros((3, 3)))


def test_spearman_ties_nans_and_constant_series():
  t = np.linspace(-3, 3, 7)
  assert factors.spearman(t, t ** 3) == pytest.approx(1.0)
  assert factors.spearman(t, -np.exp(t)) == pytest.approx(-1.0)
  assert factors.spearman(t, np.ones(7)) == 0.0
  assert np.isnan(factors.spearman(t, np.full(7, np.nan)))
  y = np.array([1.0, np.nan, 2.0, 2.0, 3.0, np.nan, 5.0])
  assert 0.9 < factors.spearman(t, y) < 1.0  # Ties over the finite pairs only.


def test_unwrap_and_circular_spread():
  series = np.array([170.0, 178.0, np.nan, -174.0, -166.0])
  unwrapped = factors.unwrap_degrees(series)
  np.testing.assert_allclose(unwrapped[[0, 1, 3, 4]], [170.0, 178.0, 186.0, 194.0])
  assert np.isnan(unwrapped[2])
  assert factors.spearman(np.arange(5.0), unwrapped) == pytest.approx(1.0)
  around_seam = np.array([175.0, -175.0, 178.0, -178.0])
  assert factors.factor_spread(around_seam, "rotation") < 6.0
  assert factors.factor_spread(around_seam, "lv_area") > 150.0
