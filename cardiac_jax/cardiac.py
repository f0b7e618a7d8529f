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
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

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
