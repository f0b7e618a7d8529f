"""Tests of cardiac measurements against shapes with known volumes and wall thickness."""

from __future__ import annotations

import numpy as np
import pytest

from cardiac_jax import cardiac
from cardiac_jax import structures

LV, MYO, RV = structures.LV_BLOOD_POOL, structures.LV_MYOCARDIUM, structures.RV_BLOOD_POOL


def _radius_mm(shape_xy, spacing_xy, centre_px):
  rows, cols = np.mgrid[:shape_xy[0], :shape_xy[1]].astype(float)
  return np.hypot((rows - centre_px[0]) * spacing_xy[0], (cols - centre_px[1]) * spacing_xy[1])


def _ring_slice(shape_xy, spacing_xy, inner_mm, outer_mm, centre_px=None):
  centre_px = centre_px or ((shape_xy[0] - 1) / 2, (shape_xy[1] - 1) / 2)
  radius = _radius_mm(shape_xy, spacing_xy, centre_px)
  plane = np.zeros(shape_xy, np.uint8)
  plane[radius < outer_mm] = MYO
  plane[radius < inner_mm] = LV
  return plane


def test_cuboid_volume_is_exact():
  labels = np.zeros((20, 20, 10), np.uint8)
  labels[2:12, 3:11, 1:4] = LV          # 10 x 8 x 3 voxels
  spacing = (1.25, 1.5, 8.0)
  assert cardiac.structure_volume_ml(labels, LV, spacing) == pytest.approx(
      10 * 8 * 3 * 1.25 * 1.5 * 8.0 / 1000)
  assert cardiac.voxel_volume_ml(spacing) == pytest.approx(0.015)


def test_cylinder_and_ellipsoid_volumes_match_geometry():
  spacing = (0.5, 0.5, 2.0)
  # Cylinder of radius 20 mm over 25 slices (50 mm): pi r^2 h.
  radius = _radius_mm((100, 100), spacing[:2], (49.5, 49.5))
  labels = np.zeros((100, 100, 30), np.uint8)
  labels[:, :, 2:27][radius < 20.0] = LV
  expected = np.pi * 20.0 ** 2 * 50.0 / 1000
  volumes = cardiac.structure_volumes_ml(labels, spacing)
  # Digitisation error of the disc edge: well within one ring of voxels around it.
  edge_voxels_ml = 2 * np.pi * 20.0 * 0.5 * 50.0 / 1000
  assert abs(volumes["lv"] - expected) < 0.5 * edge_voxels_ml
  assert volumes["rv"] == 0 and volumes["myo"] == 0
  # Ellipsoid with semi-axes 20, 15, 30 mm (axis z along slices of 2 mm): 4/3 pi abc.
  xs, ys, zs = np.mgrid[:100, :100, :40].astype(float)
  inside = (((xs - 49.5) * 0.5 / 20) ** 2 + ((ys - 49.5) * 0.5 / 15) ** 2
            + ((zs - 19.5) * 2.0 / 30) ** 2) < 1
  labels = np.where(inside, RV, 0).astype(np.uint8)
  expected = 4 / 3 * np.pi * 20 * 15 * 30 / 1000
  assert cardiac.structure_volume_ml(labels, RV, spacing) == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("spacing_xy", [(1.0, 1.0), (1.25, 1.5)])
def test_annulus_wall_thickness(spacing_xy):
  inner_mm, outer_mm = 12.0, 21.0
  plane = _ring_slice((64, 64), spacing_xy, inner_mm, outer_mm)
  thickness = cardiac.slice_wall_thickness_mm(plane, spacing_xy)
  assert abs(thickness - (outer_mm - inner_mm)) <= 0.5 * max(spacing_xy)


def test_wall_thickness_averages_closed_rings_only():
  spacing = (1.0, 1.0, 8.0)
  labels = np.zeros((64, 64, 3), np.uint8)
  labels[:, :, 0] = _ring_slice((64, 64), spacing[:2], 10.0, 14.0)   # 4 mm wall
  labels[:, :, 1] = _ring_slice((64, 64), spacing[:2], 10.0, 18.0)   # 8 mm wall
  open_ring = _ring_slice((64, 64), spacing[:2], 10.0, 30.0)
  open_ring[30:34, 31:] = np.where(open_ring[30:34, 31:] == MYO, 0, open_ring[30:34, 31:])
  labels[:, :, 2] = open_ring                                         # basal: open, ignored
  assert cardiac.closed_lv_ring(labels[:, :, 0])
  assert not cardiac.closed_lv_ring(labels[:, :, 2])
  assert cardiac.mean_wall_thickness_mm(labels, spacing) == pytest.approx(6.0, abs=0.5)


def test_wall_thickness_needs_a_closed_ring():
  labels = np.zeros((32, 32, 2), np.uint8)
  labels[10:20, 10:20, 0] = LV                                        # no myocardium at all
  with pytest.raises(ValueError, match="closed LV myocardial ring"):
    cardiac.mean_wall_thickness_mm(labels, (1.0, 1.0, 5.0))


def test_ef_sv_and_mass_formulas():
  assert cardiac.stroke_volume_ml(150.0, 60.0) == 90.0
  assert cardiac.ejection_fraction(150.0, 60.0) == pytest.approx(60.0)
  assert cardiac.ejection_fraction(100.0, 100.0) == 0.0
  assert cardiac.myocardial_mass_g(120.0) == pytest.approx(126.0)
  with pytest.raises(ValueError, match="positive end-diastolic"):
    cardiac.ejection_fraction(0.0, 0.0)


def test_subject_attributes_names_and_values():
  spacing = (1.0, 1.0, 10.0)
  ed = np.zeros((64, 64, 4), np.uint8)
  es = np.zeros_like(ed)
  for z in range(1, 3):
    ed[:, :, z] = _ring_slice((64, 64), spacing[:2], 12.0, 18.0)
    es[:, :, z] = _ring_slice((64, 64), spacing[:2], 8.0, 15.0)
    ed[2:10, 2:10, z] = RV
    es[2:7, 2:7, z] = RV
  attributes = cardiac.subject_attributes(ed, es, spacing)
  assert tuple(attributes) == structures.ATTRIBUTE_NAMES
  voxel_ml = 0.01
  assert attributes["lv_edv_ml"] == pytest.approx(np.sum(ed == LV) * voxel_ml)
  assert attributes["rv_edv_ml"] == pytest.approx(2 * 64 * voxel_ml)
  assert attributes["rv_esv_ml"] == pytest.approx(2 * 25 * voxel_ml)
  assert attributes["myo_es_ml"] == pytest.approx(np.sum(es == MYO) * voxel_ml)
  assert attributes["lv_sv_ml"] == pytest.approx(
      attributes["lv_edv_ml"] - attributes["lv_esv_ml"])
  assert attributes["lv_ef"] == pytest.approx(
      100 * attributes["lv_sv_ml"] / attributes["lv_edv_ml"])
  assert attributes["rv_ef"] == pytest.approx(100 * (64 - 25) / 64)
  assert attributes["myo_mass_g"] == pytest.approx(1.05 * attributes["myo_ed_ml"])
  assert attributes["lv_wall_thickness_mm"] == pytest.approx(6.0, abs=0.5)
  with pytest.raises(ValueError, match="differ in shape"):
    cardiac.subject_attributes(ed, es[:, :, :3], spacing)


def test_bad_spacing_is_refused():
  with pytest.raises(ValueError, match="spacing"):
    cardiac.voxel_volume_ml((1.0, 0.0, 5.0))
