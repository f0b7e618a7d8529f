"""Drawing a subject's parameters for its diagnostic group (`sample_subject_parameters`).

The group ranges (LV/RV volumes and ejection fractions, wall thickness, shape, base descent,
atrial fraction) follow the five ACDC groups; the heart is then placed inside the field of view
from its rendered extent (`geometry.heart_extent_mm`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from cardiac_jax import structures
from data_pipelines.synthetic.geometry import heart_extent_mm
from data_pipelines.synthetic.parameters import AcquisitionRanges, SubjectParameters

# Per group: LV EDV (ml), LV EF (%), nominal wall (mm), RV EDV (ml, None: tied to LV EDV),
# RV EF (%), sphericity (long axis / diameter), base descent at ES (mm), atrial fraction.
_GROUP_RANGES = {
    "NOR": dict(lv_edv=(100, 180), lv_ef=(55, 70), wall=(7, 11), rv_edv=None, rv_ef=(50, 65),
                sphericity=(1.75, 2.05), descent=(10, 16), atrial=(0.15, 0.30)),
    "DCM": dict(lv_edv=(220, 350), lv_ef=(10, 35), wall=(5, 8), rv_edv=(120, 240),
                rv_ef=(25, 55), sphericity=(1.30, 1.60), descent=(3, 7), atrial=(0.05, 0.15)),
    "HCM": dict(lv_edv=(80, 150), lv_ef=(65, 80), wall=(13, 25), rv_edv=(80, 150),
                rv_ef=(55, 70), sphericity=(1.85, 2.25), descent=(6, 12), atrial=(0.30, 0.45)),
    "MINF": dict(lv_edv=(140, 260), lv_ef=(25, 45), wall=(7, 10), rv_edv=(100, 190),
                 rv_ef=(40, 60), sphericity=(1.45, 1.80), descent=(5, 10), atrial=(0.15, 0.35)),
    "RV": dict(lv_edv=(100, 170), lv_ef=(50, 65), wall=(7, 10), rv_edv=(200, 350),
               rv_ef=(20, 40), sphericity=(1.70, 2.00), descent=(8, 14), atrial=(0.15, 0.30)),
}


def uniform(rng: np.random.Generator, bounds) -> float:
  """One draw of `rng` uniform in [bounds[0], bounds[1])."""
  return float(rng.uniform(bounds[0], bounds[1]))


def sample_subject_parameters(rng: np.random.Generator, group: str, subject: str,
                              subject_index: int = 0,
                              ranges: AcquisitionRanges = AcquisitionRanges(),
                              ) -> SubjectParameters:
  """Draws every generating parameter of one subject of `group` (one of structures.GROUPS)."""
  if group not in _GROUP_RANGES:
    raise ValueError(f"unknown group {group!r}; expected one of {list(structures.GROUPS)}")
  g = _GROUP_RANGES[group]

  # Body: height and BMI by sex; weight from BMI.
  male = rng.random() < 0.6
  height_cm = float(np.clip(rng.normal(176.0 if male else 163.0, 7.0), 150.0, 198.0))
  bmi = float(np.clip(rng.normal(26.5, 4.0), 18.0, 42.0))
  height_cm = round(height_cm)
  weight_kg = float(round(bmi * (height_cm / 100.0) ** 2))
  heart_rate_bpm = uniform(rng, (70, 95) if group == "DCM" else (55, 85))

  # Volumes and ejection fractions.
  lv_edv = uniform(rng, g["lv_edv"])
  lv_ef = uniform(rng, g["lv_ef"])
  rv_edv = lv_edv * uniform(rng, (0.9, 1.15)) if g["rv_edv"] is None else uniform(
      rng, g["rv_edv"])
  rv_ef = uniform(rng, g["rv_ef"])

  # Timing of the cycle; ES is placed exactly on a frame.
  nb_frame = int(rng.integers(ranges.num_frames[0], ranges.num_frames[1] + 1))
  es_index = int(round(uniform(rng, (0.30, 0.40)) * nb_frame))
  es_phase = es_index / nb_frame
  early_filling_duration = uniform(rng, (0.12, 0.20))
  atrial_onset_phase = uniform(rng, (0.78, 0.86))
  atrial_fraction = uniform(rng, g["atrial"])
  diastasis_fraction = uniform(rng, (0.03, 0.08))
  phase_shift = 0
  if rng.random() < ranges.shifted_start_probability:
    # Like ACDC patient090: the acquisition starts in late diastole, a few frames before ED.
    phase_shift = int(rng.integers(1, min(4, nb_frame - es_index - 1) + 1))

  # LV shape from the target EDV: V = pi a^2 L_c mean(profile) with L_c = 2 a sphericity.
  sphericity = uniform(rng, g["sphericity"])
  exponent = uniform(rng, (2.2, 3.0))
  mean_profile = exponent / (exponent + 1.0)
  radius_mm = (lv_edv * 1000.0 / (math.pi * 2.0 * sphericity * mean_profile)) ** (1.0 / 3.0)
  cavity_length = 2.0 * sphericity * radius_mm
  wall = uniform(rng, g["wall"])
  septal_asymmetry = 1.0
  if group == "HCM":
    # The sampled thickness is the maximal (septal) one; asymmetric septal hypertrophy in
    # about two thirds of subjects.
    septal_asymmetry = uniform(rng, (1.3, 1.9)) if rng.random() < 0.65 else uniform(
        rng, (1.0, 1.15))
    max_wall, wall = wall, wall / septal_asymmetry
  else:
    max_wall = wall
  apex_wall = wall * uniform(rng, (0.55, 0.8))
  lv_length = cavity_length + apex_wall

  # Slices: about num_slices slabs from just above the base to just past the apex.
  target_slices = int(rng.integers(ranges.num_slices[0], ranges.num_slices[1] + 1))
  thickness = float(np.clip(lv_length * 1.15 / target_slices, *ranges.slice_thickness_mm))
  thickness = round(thickness * 2.0) / 2.0
  stack_top = -uniform(rng, (0.2, 0.9)) * thickness
  below_apex = uniform(rng, (0.2, 0.7)) * thickness
  nz = int(math.ceil((lv_length + below_apex - stack_top) / thickness))

  # Minor shape and texture of the heart.
  rv_half_width = uniform(rng, (90, 120) if group == "RV" else (70, 95))
  minf = dict(centre=math.nan, width=math.nan, start=math.nan, end=math.nan, thinning=math.nan)
  if group == "MINF":
    territory = float(rng.choice([70.0, 180.0, -100.0]))  # anterior, lateral, inferior walls
    minf = dict(centre=territory + uniform(rng, (-20, 20)), width=uniform(rng, (60, 120)),
                start=uniform(rng, (0.05, 0.45)), end=uniform(rng, (0.8, 1.0)),
                thinning=uniform(rng, (0.35, 0.55)))

  # Orientation: the RV lies to the patient's right and anterior of the LV; the whole scene is
  # rotated in plane by the scanner's choice of axes.
  scene_rotation = uniform(rng, (-30, 30))
  lv_rv_axis = 200.0 + uniform(rng, (-15, 15)) + scene_rotation

  # Acquisition geometry.
  spacing = round(uniform(rng, ranges.spacing_mm), 3)
  size = int(np.clip(round(uniform(rng, ranges.field_of_view_mm) / spacing), *ranges.image_size))
  nx = size
  ny = int(np.clip(round(size * uniform(rng, (0.8, 1.0))), *ranges.image_size)) if (
      rng.random() < 0.4) else size
  normal = np.array([-0.6, 0.55, -0.55]) + rng.normal(0.0, 0.1, 3)
  normal /= np.linalg.norm(normal)

  # The oblique short-axis plane cuts the chest wider than an axial slice would.
  body_width = float(np.clip(1.15 * (280.0 + 6.0 * (bmi - 25.0) + 0.8 * (height_cm - 170.0)
                                     + rng.normal(0.0, 12.0)), 270.0, 480.0))
  params = SubjectParameters(
      subject=subject, subject_index=subject_index, group=group,
      height_cm=float(height_cm), weight_kg=weight_kg, heart_rate_bpm=heart_rate_bpm,
      nb_frame=nb_frame, ed_frame=phase_shift + 1, es_frame=phase_shift + es_index + 1,
      phase_shift_frames=phase_shift, nx=nx, ny=ny, nz=nz, spacing_mm=spacing,
      slice_thickness_mm=thickness, stack_top_mm=stack_top,
      slice_normal_r=float(normal[0]), slice_normal_a=float(normal[1]),
      slice_normal_s=float(normal[2]), plane_rotation_deg=uniform(rng, (0, 360)),
      lv_edv_ml=lv_edv, lv_esv_ml=lv_edv * (1.0 - lv_ef / 100.0), lv_ef_percent=lv_ef,
      rv_edv_ml=rv_edv, rv_esv_ml=rv_edv * (1.0 - rv_ef / 100.0), rv_ef_percent=rv_ef,
      es_phase=es_phase, early_filling_duration=early_filling_duration,
      atrial_onset_phase=atrial_onset_phase, diastasis_fraction=diastasis_fraction,
      atrial_fraction=atrial_fraction, base_descent_mm=uniform(rng, g["descent"]),
      lv_sphericity=sphericity, lv_profile_exponent=exponent, lv_cavity_length_mm=cavity_length,
      lv_length_mm=lv_length, lv_wall_thickness_mm=wall, lv_max_wall_thickness_mm=max_wall,
      septal_asymmetry=septal_asymmetry, apex_wall_thickness_mm=apex_wall,
      lv_ellipticity=uniform(rng, (0.0, 0.06)), lv_ellipse_angle_deg=uniform(rng, (0, 180)),
      border_irregularity=uniform(rng, (0.01, 0.03)),
      border_phase_seed=int(rng.integers(0, 2 ** 31)),
      papillary_radius_mm=uniform(rng, (2.0, 3.5)),
      rv_sector_half_width_deg=rv_half_width, rv_length_fraction=uniform(rng, (0.7, 0.85)),
      rv_crescent_exponent=uniform(rng, (0.45, 0.7)),
      rv_wall_thickness_mm=uniform(rng, (2.5, 4.0)),
      epicardial_fat_mm=uniform(rng, (1.5, 4.0)),
      left_atrium_radius_mm=radius_mm * uniform(rng, (0.8, 1.0)),
      minf_defect_centre_deg=minf["centre"], minf_defect_width_deg=minf["width"],
      minf_defect_start=minf["start"], minf_defect_end=minf["end"],
      minf_defect_thinning=minf["thinning"],
      lv_centre_x_mm=0.0, lv_centre_y_mm=0.0,
      slice_drift_x_mm=uniform(rng, (-1.5, 1.5)), slice_drift_y_mm=uniform(rng, (-1.5, 1.5)),
      scene_rotation_deg=scene_rotation, lv_rv_axis_deg=lv_rv_axis % 360.0,
      body_width_mm=body_width, body_depth_mm=body_width * uniform(rng, (0.65, 0.78)),
      subcutaneous_fat_mm=float(np.clip(4.0 + 1.6 * (bmi - 20.0) + rng.normal(0, 3), 3, 45)),
      lv_offset_left_mm=uniform(rng, (20, 40)), lv_offset_anterior_mm=uniform(rng, (5, 30)),
      myocardium_contrast=uniform(rng, (0.22, 0.35)),
      rv_blood_contrast=uniform(rng, (0.88, 1.0)),
      fat_contrast=uniform(rng, (0.7, 0.95)), liver_contrast=uniform(rng, (0.3, 0.45)),
      bias_field_strength=uniform(rng, (0.2, 0.6)), coil_rotation_deg=uniform(rng, (0, 360)),
      noise_level=uniform(rng, (0.02, 0.06)), intensity_scale=uniform(rng, (150, 1500)))

  # Place the heart: the LV axis near the image centre, but the whole heart (at every slice and
  # frame) inside the field of view with a margin.
  low, high = heart_extent_mm(params)
  centre = np.zeros(2)
  for axis, n in enumerate((nx, ny)):
    half_fov = 0.5 * n * spacing
    margin = 6.0 + 2.0 * spacing
    lo_c, hi_c = -half_fov + margin - low[axis], half_fov - margin - high[axis]
    if lo_c > hi_c:
      raise ValueError(
          f"{subject}: the {group} heart ({high[axis] - low[axis]:.0f} mm across) does not fit "
          f"in a {2 * half_fov:.0f} mm field of view; widen AcquisitionRanges.image_size or "
          "field_of_view_mm")
    natural = -0.5 * (low[axis] + high[axis]) + uniform(rng, (-20, 20))
    centre[axis] = float(np.clip(natural, lo_c, hi_c))
  return dataclasses.replace(params, lv_centre_x_mm=float(centre[0]),
                             lv_centre_y_mm=float(centre[1]))
