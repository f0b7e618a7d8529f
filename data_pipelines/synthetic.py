"""The synthetic short-axis cine MRI cohort: the default data of every model.

Each subject is a 2D+time stack of short-axis balanced-SSFP (bSSFP) cine images in the ACDC
layout (see /specs/data_formats.md), with labels for every frame and the parameters that
generated it. The generator has two separate halves so other renderers (e.g. a long-axis
4-chamber view) can reuse the same subjects:

1. `sample_subject_parameters` draws a `SubjectParameters`: diagnostic group (the five ACDC
   groups NOR, MINF, DCM, HCM, RV), body size, target LV/RV volumes and ejection fractions,
   timing of the cardiac cycle, heart shape, position and orientation, acquisition geometry and
   image contrast.
2. `render_short_axis` turns those parameters into images and labels.

Heart model (all lengths in mm, volumes in ml):
- The LV is a solid of revolution around its long axis with a normalised longitudinal
  coordinate u in [0, 1] from the base plane (u = 0) to the epicardial apex (u = 1). The cavity
  cross-section radius is a(t) e(theta) sqrt(1 - (u / u_c)^beta) ("bullet"-like for beta > 2),
  u_c < 1 leaving an apical wall; e(theta) is a slight in-plane ellipticity.
- The base plane descends towards the fixed apex in systole in proportion to the ejected volume
  (longitudinal shortening). Myocardium is incompressible: the wall area of every material
  sector scales with L_ED / L(t), so R_epi^2 = R_endo^2 + (L_ED / L(t)) W_ED and the wall
  thickens as the cavity shrinks.
- Slices are slabs of the slice thickness, base to apex. A slab's boundary radius is the
  root-mean-square radius of its sub-slabs, so its area is the slab average of the
  cross-sectional area and the labelled volume (voxel count x voxel volume) equals the volume of
  the model. a(t) (and the RV crescent depth d(t)) are solved in closed form from the target
  volume curve on exactly that discretisation, so measured volumes follow the targets.
- LV volume over the cycle: ejection (cosine) to ES at 30-40 % of the cycle, rapid early
  filling, slow filling in diastasis and the atrial kick before the next ED (the phases of the
  Wiggers diagram). The RV follows the same timing with its own EDV and EF.
- MINF: an infarcted sector (angle x long-axis range) is thinned and akinetic: its endocardium
  does not move inward and the wall does not thicken. HCM: thick, optionally asymmetric
  (septal) hypertrophy. RV: a crescent wrapped around the septum whose depth scales with the RV
  volume and which ends before the apex.
- Image formation: partial volume (in-plane antialiasing with edge ramps one pixel wide, widened
  by the through-slab variation of each boundary), thorax with subcutaneous fat, chest-wall
  muscle, lungs with vessels, liver, stomach, spine and descending aorta with smooth filtered
  noise texture, a smooth multiplicative coil sensitivity (bias) field, Rician noise (magnitude
  of complex Gaussian noise), a random global intensity scale and int16 storage.

Long-axis 4-chamber view (`render_long_axis_4ch`, written on request as
<subject>_la_4ch.nii.gz (X, Y, 1, T) with labels <subject>_la_4ch_gt.nii.gz): the same heart
cut by the plane through the LV long axis and the LV -> RV direction. The ventricles are the
short-axis model evaluated on thin slabs along the axis (`long_axis_geometry`), so volumes,
wall thickening, base descent (the valve plane moves towards the fixed apex in systole) and the
group abnormalities are those of the short-axis images. The atria are prolate ellipsoids above
the valve plane, split by the interatrial septum, whose volume V = V_min + f (EDV - V(t)) rises
while the ventricles eject (reservoir), falls in early filling and in the atrial kick; their
size depends on the group (dilated LA in DCM, HCM, MINF; dilated RA with RV disease). Mitral and
tricuspid leaflets are closed in systole and swing towards the apex while the ventricles fill.
Image formation as for the short axis (thorax model on one plane plus the liver dome, partial
volume from edge ramps and three sub-planes across the slab, coil bias, Rician noise). Labels:
0 background, 1 RV, 2 LV myocardium, 3 LV blood pool, 4 LA, 5 RA (structures.LA_BLOOD_POOL,
structures.RA_BLOOD_POOL). The affine places the plane in the scanner frame of the short-axis
stack (it holds the stack's slice normal and passes through the LV axis at the mid slice).

Determinism: subject i (0-based, written as patient{i+1:03d}) uses np.random.default_rng([seed,
i]) for its parameters and then its rendering, so it is identical whatever the cohort size. The
4-chamber view uses its own stream `long_axis_generator(seed, i)`, so adding it to a cohort
leaves the short-axis files as they were.
Groups are balanced: each consecutive block of five subjects holds each group once, in an order
drawn from the block's own seeded permutation.

Held-out cohorts (`synthesize_held_out_cohort`): extra subjects of one group for analyses that
must not reuse the subjects a model was trained on (the TCAV concept pool of Clough et al., a
held-out set of disease-negative subjects). They are numbered after the main cohort
(patient{N+1}, ... for a cohort of N), so their ids never collide with it, and drawn from their
own streams (`HELD_OUT_STREAM_TAG`), independent of every main-cohort subject. Every cohort
records the acquisition ranges it was drawn from (acquisition_ranges.json), so a held-out cohort
is acquired like the cohort it complements.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import uuid
from typing import Optional, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from cardiac_jax import cardiac
from cardiac_jax import structures

PARAMETERS_CSV = "parameters.csv"
ACQUISITION_RANGES_JSON = "acquisition_ranges.json"
PARTITION = "training"
_STAGING_DIR = ".staging"
# Entropy tag that separates the group-permutation streams from the per-subject streams.
_GROUP_STREAM_TAG = 0x67726F7570
# Entropy tag of the subject streams of held-out cohorts ("heldout").
HELD_OUT_STREAM_TAG = 0x68656C646F7574
_TWO_PI = 2.0 * math.pi
# Angular and through-slab resolution of the boundary tables of the heart model.
_NUM_ANGLES = 256
_SUB_SLABS = 6
_NOISE_BLOCK_VOXELS = 1 << 19


@dataclasses.dataclass(frozen=True)
class AcquisitionRanges:
  """Ranges the acquisition geometry is drawn from (inclusive bounds).

  The defaults give scanner-like stacks; tests shrink them for speed.
  """
  image_size: tuple[int, int] = (160, 224)
  field_of_view_mm: tuple[float, float] = (280.0, 380.0)
  spacing_mm: tuple[float, float] = (1.2, 1.8)
  slice_thickness_mm: tuple[float, float] = (5.0, 10.0)
  num_slices: tuple[int, int] = (8, 14)
  num_frames: tuple[int, int] = (20, 25)
  # Probability that the sequence starts before end-diastole (ED not at frame 1).
  shifted_start_probability: float = 0.05

  def __post_init__(self):
    for name in ("image_size", "field_of_view_mm", "spacing_mm", "slice_thickness_mm",
                 "num_slices", "num_frames"):
      lo, hi = getattr(self, name)
      if not 0 < lo <= hi:
        raise ValueError(f"AcquisitionRanges.{name} must be 0 < low <= high, got {(lo, hi)}")
    if self.num_frames[0] < 10:
      raise ValueError(f"AcquisitionRanges.num_frames must start at >= 10 frames to resolve the "
                       f"cardiac cycle, got {self.num_frames}")
    if not 0.0 <= self.shifted_start_probability <= 1.0:
      raise ValueError("AcquisitionRanges.shifted_start_probability must be in [0, 1], got "
                       f"{self.shifted_start_probability}")


@dataclasses.dataclass(frozen=True)
class SubjectParameters:
  """Every parameter that generates one synthetic subject (lengths mm, volumes ml, angles deg).

  Angles are in the image plane of the stored arrays, measured from the +X voxel axis towards
  +Y. Frame numbers are 1-based as in ACDC's Info.cfg.
  """
  subject: str
  subject_index: int
  group: str
  # Demographics.
  height_cm: float
  weight_kg: float
  heart_rate_bpm: float
  # Acquisition.
  nb_frame: int
  ed_frame: int
  es_frame: int
  phase_shift_frames: int
  nx: int
  ny: int
  nz: int
  spacing_mm: float
  slice_thickness_mm: float
  stack_top_mm: float            # top of the first slab relative to the ED base plane (< 0: above)
  slice_normal_r: float          # slice normal (base -> apex) in scanner RAS coordinates
  slice_normal_a: float
  slice_normal_s: float
  plane_rotation_deg: float      # in-plane rotation of the voxel axes about the slice normal
  # Function.
  lv_edv_ml: float
  lv_esv_ml: float
  lv_ef_percent: float
  rv_edv_ml: float
  rv_esv_ml: float
  rv_ef_percent: float
  es_phase: float                # fraction of the cycle from ED to ES (on a frame)
  early_filling_duration: float  # fraction of the cycle of rapid early filling
  atrial_onset_phase: float      # cycle phase where the atrial kick starts
  diastasis_fraction: float      # fraction of the stroke volume filled in diastasis
  atrial_fraction: float         # fraction of the stroke volume filled by the atrial kick
  base_descent_mm: float         # base-plane excursion towards the apex at ES
  # LV shape (at ED).
  lv_sphericity: float           # cavity long axis / cavity short-axis diameter
  lv_profile_exponent: float     # beta of the radius profile sqrt(1 - (u / u_c)^beta)
  lv_cavity_length_mm: float
  lv_length_mm: float            # base plane to epicardial apex
  lv_wall_thickness_mm: float    # nominal (free-wall) thickness at the base
  lv_max_wall_thickness_mm: float
  septal_asymmetry: float        # septal / free-wall thickness (HCM > 1)
  apex_wall_thickness_mm: float
  lv_ellipticity: float
  lv_ellipse_angle_deg: float
  border_irregularity: float     # amplitude of low-order harmonics of the LV borders
  border_phase_seed: int         # seeds the phases of those harmonics
  papillary_radius_mm: float
  # RV shape.
  rv_sector_half_width_deg: float
  rv_length_fraction: float      # where the RV ends along the LV long axis
  rv_crescent_exponent: float
  rv_wall_thickness_mm: float
  epicardial_fat_mm: float
  left_atrium_radius_mm: float
  # MINF regional wall-motion defect (NaN when absent).
  minf_defect_centre_deg: float  # relative to the LV -> RV axis
  minf_defect_width_deg: float
  minf_defect_start: float       # along the long axis, fraction of the LV length from the base
  minf_defect_end: float
  minf_defect_thinning: float    # fractional wall thinning in the scar
  # Placement.
  lv_centre_x_mm: float          # LV axis at the mid slice, from the image centre
  lv_centre_y_mm: float
  slice_drift_x_mm: float        # LV axis shift per slice (oblique long axis)
  slice_drift_y_mm: float
  scene_rotation_deg: float
  lv_rv_axis_deg: float
  # Thorax.
  body_width_mm: float
  body_depth_mm: float
  subcutaneous_fat_mm: float
  lv_offset_left_mm: float       # LV centre relative to the body centre (patient left)
  lv_offset_anterior_mm: float
  # Contrast (relative to LV blood), bias field, noise, scale.
  myocardium_contrast: float
  rv_blood_contrast: float
  fat_contrast: float
  liver_contrast: float
  bias_field_strength: float
  coil_rotation_deg: float
  noise_level: float             # sigma of the complex noise relative to LV blood
  intensity_scale: float         # stored value of noise-free LV blood

  @property
  def voxel_spacing_mm(self) -> tuple[float, float, float]:
    return (self.spacing_mm, self.spacing_mm, self.slice_thickness_mm)

  @property
  def frame_duration_ms(self) -> float:
    return 60000.0 / self.heart_rate_bpm / self.nb_frame

  def frame_phases(self) -> np.ndarray:
    """(T,) cardiac-cycle phase in [0, 1) of every frame; phase 0 is ED."""
    frames = np.arange(self.nb_frame)
    return ((frames - self.phase_shift_frames) % self.nb_frame) / self.nb_frame

  def lv_volume_curve_ml(self, phase=None) -> np.ndarray:
    """Target LV cavity volume (ml) at `phase` (default: every frame)."""
    return self._volume_curve(self.lv_edv_ml, self.lv_esv_ml, phase)

  def rv_volume_curve_ml(self, phase=None) -> np.ndarray:
    """Target RV cavity volume (ml) at `phase` (default: every frame)."""
    return self._volume_curve(self.rv_edv_ml, self.rv_esv_ml, phase)

  def _volume_curve(self, edv_ml, esv_ml, phase) -> np.ndarray:
    return cardiac_cycle_volume(
        self.frame_phases() if phase is None else phase, edv_ml, esv_ml,
        es_phase=self.es_phase, early_filling_duration=self.early_filling_duration,
        atrial_onset_phase=self.atrial_onset_phase,
        diastasis_fraction=self.diastasis_fraction, atrial_fraction=self.atrial_fraction)


def subject_name(index: int, num_subjects: int) -> str:
  """ACDC-style id of 0-based subject `index`: patient001, ...; more digits above 999."""
  width = max(3, len(str(num_subjects)))
  return f"patient{index + 1:0{width}d}"


def group_of_subject(seed: int, index: int) -> str:
  """Group of 0-based subject `index`: each block of five holds every group once."""
  block, position = divmod(index, len(structures.GROUPS))
  order = np.random.default_rng([seed, _GROUP_STREAM_TAG, block]).permutation(
      len(structures.GROUPS))
  return structures.GROUPS[int(order[position])]


# ---------------------------------------------------------------------------------------------
# Cardiac cycle
# ---------------------------------------------------------------------------------------------

def cardiac_cycle_volume(phase, edv_ml: float, esv_ml: float, *, es_phase: float,
                         early_filling_duration: float, atrial_onset_phase: float,
                         diastasis_fraction: float, atrial_fraction: float) -> np.ndarray:
  """Chamber volume over one cardiac cycle (phase 0 = ED, 1 = next ED).

  Ejection follows a half cosine from EDV to ESV (zero slope at ED and ES, so ES is the clear
  minimum). Filling is rapid early filling (half cosine, 1 - diastasis - atrial of the stroke
  volume), a slow linear rise in diastasis, and the atrial kick, a cosine ramp truncated at 85 %
  of its half period so the volume still rises at the next ED and ED is the clear maximum.
  """
  phase = np.mod(np.asarray(phase, dtype=np.float64), 1.0)
  stroke = edv_ml - esv_ml
  early_fraction = 1.0 - diastasis_fraction - atrial_fraction
  ejection = edv_ml - stroke * 0.5 * (1.0 - np.cos(np.pi * np.clip(phase / es_phase, 0, 1)))
  early_end = es_phase + early_filling_duration
  x_early = np.clip((phase - es_phase) / early_filling_duration, 0, 1)
  x_diastasis = np.clip((phase - early_end) / (atrial_onset_phase - early_end), 0, 1)
  x_atrial = np.clip((phase - atrial_onset_phase) / (1.0 - atrial_onset_phase), 0, 1)
  atrial_ramp = (1.0 - np.cos(0.85 * np.pi * x_atrial)) / (1.0 - np.cos(0.85 * np.pi))
  filling = esv_ml + stroke * (early_fraction * 0.5 * (1.0 - np.cos(np.pi * x_early))
                               + diastasis_fraction * x_diastasis
                               + atrial_fraction * atrial_ramp)
  return np.where(phase <= es_phase, ejection, filling)


# ---------------------------------------------------------------------------------------------
# Parameter sampling
# ---------------------------------------------------------------------------------------------

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


def _uniform(rng: np.random.Generator, bounds) -> float:
  return float(rng.uniform(bounds[0], bounds[1]))


def _cavity_profile(u: np.ndarray, cavity_end: float, exponent: float) -> np.ndarray:
  """Squared normalised cavity radius at long-axis coordinate u (0 outside [0, cavity_end])."""
  x = np.clip(u / cavity_end, 0.0, 1.0)
  return np.where((u >= 0) & (u <= cavity_end), 1.0 - x ** exponent, 0.0)


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
  heart_rate_bpm = _uniform(rng, (70, 95) if group == "DCM" else (55, 85))

  # Volumes and ejection fractions.
  lv_edv = _uniform(rng, g["lv_edv"])
  lv_ef = _uniform(rng, g["lv_ef"])
  rv_edv = lv_edv * _uniform(rng, (0.9, 1.15)) if g["rv_edv"] is None else _uniform(
      rng, g["rv_edv"])
  rv_ef = _uniform(rng, g["rv_ef"])

  # Timing of the cycle; ES is placed exactly on a frame.
  nb_frame = int(rng.integers(ranges.num_frames[0], ranges.num_frames[1] + 1))
  es_index = int(round(_uniform(rng, (0.30, 0.40)) * nb_frame))
  es_phase = es_index / nb_frame
  early_filling_duration = _uniform(rng, (0.12, 0.20))
  atrial_onset_phase = _uniform(rng, (0.78, 0.86))
  atrial_fraction = _uniform(rng, g["atrial"])
  diastasis_fraction = _uniform(rng, (0.03, 0.08))
  phase_shift = 0
  if rng.random() < ranges.shifted_start_probability:
    # Like ACDC patient090: the acquisition starts in late diastole, a few frames before ED.
    phase_shift = int(rng.integers(1, min(4, nb_frame - es_index - 1) + 1))

  # LV shape from the target EDV: V = pi a^2 L_c mean(profile) with L_c = 2 a sphericity.
  sphericity = _uniform(rng, g["sphericity"])
  exponent = _uniform(rng, (2.2, 3.0))
  mean_profile = exponent / (exponent + 1.0)
  radius_mm = (lv_edv * 1000.0 / (math.pi * 2.0 * sphericity * mean_profile)) ** (1.0 / 3.0)
  cavity_length = 2.0 * sphericity * radius_mm
  wall = _uniform(rng, g["wall"])
  septal_asymmetry = 1.0
  if group == "HCM":
    # The sampled thickness is the maximal (septal) one; asymmetric septal hypertrophy in
    # about two thirds of subjects.
    septal_asymmetry = _uniform(rng, (1.3, 1.9)) if rng.random() < 0.65 else _uniform(
        rng, (1.0, 1.15))
    max_wall, wall = wall, wall / septal_asymmetry
  else:
    max_wall = wall
  apex_wall = wall * _uniform(rng, (0.55, 0.8))
  lv_length = cavity_length + apex_wall

  # Slices: about num_slices slabs from just above the base to just past the apex.
  target_slices = int(rng.integers(ranges.num_slices[0], ranges.num_slices[1] + 1))
  thickness = float(np.clip(lv_length * 1.15 / target_slices, *ranges.slice_thickness_mm))
  thickness = round(thickness * 2.0) / 2.0
  stack_top = -_uniform(rng, (0.2, 0.9)) * thickness
  below_apex = _uniform(rng, (0.2, 0.7)) * thickness
  nz = int(math.ceil((lv_length + below_apex - stack_top) / thickness))

  # Minor shape and texture of the heart.
  rv_half_width = _uniform(rng, (90, 120) if group == "RV" else (70, 95))
  minf = dict(centre=math.nan, width=math.nan, start=math.nan, end=math.nan, thinning=math.nan)
  if group == "MINF":
    territory = float(rng.choice([70.0, 180.0, -100.0]))  # anterior, lateral, inferior walls
    minf = dict(centre=territory + _uniform(rng, (-20, 20)), width=_uniform(rng, (60, 120)),
                start=_uniform(rng, (0.05, 0.45)), end=_uniform(rng, (0.8, 1.0)),
                thinning=_uniform(rng, (0.35, 0.55)))

  # Orientation: the RV lies to the patient's right and anterior of the LV; the whole scene is
  # rotated in plane by the scanner's choice of axes.
  scene_rotation = _uniform(rng, (-30, 30))
  lv_rv_axis = 200.0 + _uniform(rng, (-15, 15)) + scene_rotation

  # Acquisition geometry.
  spacing = round(_uniform(rng, ranges.spacing_mm), 3)
  size = int(np.clip(round(_uniform(rng, ranges.field_of_view_mm) / spacing), *ranges.image_size))
  nx = size
  ny = int(np.clip(round(size * _uniform(rng, (0.8, 1.0))), *ranges.image_size)) if (
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
      slice_normal_s=float(normal[2]), plane_rotation_deg=_uniform(rng, (0, 360)),
      lv_edv_ml=lv_edv, lv_esv_ml=lv_edv * (1.0 - lv_ef / 100.0), lv_ef_percent=lv_ef,
      rv_edv_ml=rv_edv, rv_esv_ml=rv_edv * (1.0 - rv_ef / 100.0), rv_ef_percent=rv_ef,
      es_phase=es_phase, early_filling_duration=early_filling_duration,
      atrial_onset_phase=atrial_onset_phase, diastasis_fraction=diastasis_fraction,
      atrial_fraction=atrial_fraction, base_descent_mm=_uniform(rng, g["descent"]),
      lv_sphericity=sphericity, lv_profile_exponent=exponent, lv_cavity_length_mm=cavity_length,
      lv_length_mm=lv_length, lv_wall_thickness_mm=wall, lv_max_wall_thickness_mm=max_wall,
      septal_asymmetry=septal_asymmetry, apex_wall_thickness_mm=apex_wall,
      lv_ellipticity=_uniform(rng, (0.0, 0.06)), lv_ellipse_angle_deg=_uniform(rng, (0, 180)),
      border_irregularity=_uniform(rng, (0.01, 0.03)),
      border_phase_seed=int(rng.integers(0, 2 ** 31)),
      papillary_radius_mm=_uniform(rng, (2.0, 3.5)),
      rv_sector_half_width_deg=rv_half_width, rv_length_fraction=_uniform(rng, (0.7, 0.85)),
      rv_crescent_exponent=_uniform(rng, (0.45, 0.7)),
      rv_wall_thickness_mm=_uniform(rng, (2.5, 4.0)),
      epicardial_fat_mm=_uniform(rng, (1.5, 4.0)),
      left_atrium_radius_mm=radius_mm * _uniform(rng, (0.8, 1.0)),
      minf_defect_centre_deg=minf["centre"], minf_defect_width_deg=minf["width"],
      minf_defect_start=minf["start"], minf_defect_end=minf["end"],
      minf_defect_thinning=minf["thinning"],
      lv_centre_x_mm=0.0, lv_centre_y_mm=0.0,
      slice_drift_x_mm=_uniform(rng, (-1.5, 1.5)), slice_drift_y_mm=_uniform(rng, (-1.5, 1.5)),
      scene_rotation_deg=scene_rotation, lv_rv_axis_deg=lv_rv_axis % 360.0,
      body_width_mm=body_width, body_depth_mm=body_width * _uniform(rng, (0.65, 0.78)),
      subcutaneous_fat_mm=float(np.clip(4.0 + 1.6 * (bmi - 20.0) + rng.normal(0, 3), 3, 45)),
      lv_offset_left_mm=_uniform(rng, (20, 40)), lv_offset_anterior_mm=_uniform(rng, (5, 30)),
      myocardium_contrast=_uniform(rng, (0.22, 0.35)),
      rv_blood_contrast=_uniform(rng, (0.88, 1.0)),
      fat_contrast=_uniform(rng, (0.7, 0.95)), liver_contrast=_uniform(rng, (0.3, 0.45)),
      bias_field_strength=_uniform(rng, (0.2, 0.6)), coil_rotation_deg=_uniform(rng, (0, 360)),
      noise_level=_uniform(rng, (0.02, 0.06)), intensity_scale=_uniform(rng, (150, 1500)))

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
    natural = -0.5 * (low[axis] + high[axis]) + _uniform(rng, (-20, 20))
    centre[axis] = float(np.clip(natural, lo_c, hi_c))
  return dataclasses.replace(params, lv_centre_x_mm=float(centre[0]),
                             lv_centre_y_mm=float(centre[1]))


# ---------------------------------------------------------------------------------------------
# Heart geometry
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ShortAxisGeometry:
  """Polar boundary tables of the heart around the LV axis, per slab and frame (mm).

  `theta` is (A,). Label tables (Z, T, A) hold each boundary's slab-effective radius (root mean
  square over the slab, so the labelled area is the slab-average area). Image tables
  (C, 2, Z, T, A) describe the same slab for partial volume as two halves: the sub-slabs with
  the smaller and with the larger radii, each with its root-mean-square radius and edge width
  (pixel size widened by the spread of the radii in that half). C indexes `IMAGE_BOUNDARIES`.
  """
  theta: np.ndarray
  lv_endo: np.ndarray
  lv_epi: np.ndarray
  rv_outer: np.ndarray           # outer boundary of the RV cavity (= lv_epi outside the RV)
  image_radii: np.ndarray
  image_edges: np.ndarray
  left_atrium: np.ndarray        # (Z, T) radius of the atrium above the base (unlabelled)
  papillary_centres: np.ndarray  # (Z, T, 2, 2) x, y of two papillary muscles from the LV axis
  papillary_radii: np.ndarray    # (Z, T, 2)
  lv_cavity_scale: np.ndarray    # (T,) a(t)
  rv_depth: np.ndarray           # (T,) d(t)


# Boundaries of the image tables, outermost first.
IMAGE_BOUNDARIES = ("fat_outer", "heart_outer", "rv_outer", "lv_epi", "lv_endo")


def _smooth_step(x):
  x = np.clip(x, 0.0, 1.0)
  return x * x * (3.0 - 2.0 * x)


def _window(x, low, high, taper):
  """1 inside [low, high], 0 outside, smooth transitions of width `taper` centred on the ends."""
  return _smooth_step((x - low) / taper + 0.5) * _smooth_step((high - x) / taper + 0.5)


def _wrap_angle(angle):
  return (angle + np.pi) % _TWO_PI - np.pi


def _solve_quadratic(c2, c1, c0):
  """Largest root of c2 x^2 + c1 x + c0 = 0 (c2 > 0), floored at 0 where none is real."""
  disc = np.maximum(c1 * c1 - 4.0 * c2 * c0, 0.0)
  return np.maximum((-c1 + np.sqrt(disc)) / (2.0 * c2), 0.0)


def _border_harmonics(seed: int, theta: np.ndarray, u: np.ndarray, orders) -> np.ndarray:
  """Unit-amplitude sum of angular harmonics whose phases drift along the long axis.

  (Z, T, S, A) for theta (A,) and u (Z, T, S); deterministic in `seed`.
  """
  rng = np.random.default_rng(seed)
  total = np.zeros(u.shape + theta.shape)
  for order in orders:
    phase, drift = rng.uniform(0, _TWO_PI), rng.uniform(-3.0, 3.0)
    total += np.cos(order * theta + phase + drift * u[..., None]) / len(orders) ** 0.5
  return total


def _slab_rms(radius):
  """(Z, T, A) root-mean-square radius over the sub-slab axis 2 of (Z, T, S, A)."""
  return np.sqrt(np.mean(radius ** 2, axis=2))


def _slab_halves(radius, pixel):
  """Two-half partial-volume description of a slab: radii and edges, each (2, Z, T, A)."""
  ordered = np.sort(radius, axis=2)
  half = ordered.shape[2] // 2
  radii, edges = [], []
  for part in (ordered[:, :, :half], ordered[:, :, half:]):
    radii.append(_slab_rms(part))
    edges.append(np.sqrt(pixel ** 2 + 12.0 * np.var(part, axis=2)))
  return np.stack(radii), np.stack(edges)


def short_axis_geometry(params: SubjectParameters) -> ShortAxisGeometry:
  """The heart's boundaries on the short-axis stack of `params` (see the module docstring)."""
  p = params
  h = p.slice_thickness_mm
  theta = np.arange(_NUM_ANGLES) * (_TWO_PI / _NUM_ANGLES)
  d_theta = _TWO_PI / _NUM_ANGLES
  lv_ml = p.lv_volume_curve_ml()
  rv_ml = p.rv_volume_curve_ml()
  ed = p.ed_frame - 1

  # Long-axis coordinate u of every sub-slab (Z, T, S): the base descends with the ejected
  # fraction of the stroke volume, the apex stays.
  z = p.stack_top_mm + h * (np.arange(p.nz)[:, None] + (np.arange(_SUB_SLABS) + 0.5)
                            / _SUB_SLABS)
  ejected = (p.lv_edv_ml - lv_ml) / (p.lv_edv_ml - p.lv_esv_ml)
  base = p.base_descent_mm * ejected
  length = p.lv_length_mm - base
  u = (z[:, None, :] - base[None, :, None]) / length[None, :, None]
  cavity_end = p.lv_cavity_length_mm / p.lv_length_mm
  cavity_profile = _cavity_profile(u, cavity_end, p.lv_profile_exponent)[..., None]
  epi_profile = _cavity_profile(u, 1.0, p.lv_profile_exponent)[..., None]

  # Angular shape: slight ellipticity plus low-order irregularities of endo- and epicardium.
  axis = math.radians(p.lv_rv_axis_deg)
  ellipse = (1.0 + p.lv_ellipticity * np.cos(2.0 * (theta - math.radians(
      p.lv_ellipse_angle_deg))) + p.border_irregularity * _border_harmonics(
          p.border_phase_seed, theta, u, (3, 4, 5, 7)))
  septal = _window(np.abs(_wrap_angle(theta - axis)), -1.0, math.radians(45), math.radians(60))
  wall = p.lv_wall_thickness_mm * (1.0 + (p.septal_asymmetry - 1.0) * septal) * (
      1.0 + 2.0 * p.border_irregularity * _border_harmonics(
          p.border_phase_seed + 1, theta, u, (2, 3, 5)))
  if p.group == "MINF":
    half = math.radians(p.minf_defect_width_deg) / 2.0
    offset = _wrap_angle(theta - axis - math.radians(p.minf_defect_centre_deg))
    defect = (_window(offset, -half, half, math.radians(20))
              * _window(u, p.minf_defect_start, p.minf_defect_end, 0.1)[..., None])
    wall = wall * (1.0 - p.minf_defect_thinning * defect)
  else:
    defect = np.zeros((1, 1, 1, 1))

  # LV cavity: R = e P (D a_ED + (1 - D) a(t)); the scar sector keeps its ED radius. The volume
  # is quadratic in a(t) on the slab discretisation, so a(t) is solved exactly per frame.
  weight = 0.5 * d_theta * h / _SUB_SLABS
  shape2 = ellipse ** 2 * cavity_profile
  a_ed = math.sqrt(lv_ml[ed] * 1000.0 / (weight * shape2[:, ed].sum()))
  c2 = weight * (shape2 * (1.0 - defect) ** 2).sum(axis=(0, 2, 3))
  c1 = weight * (shape2 * 2.0 * defect * (1.0 - defect)).sum(axis=(0, 2, 3)) * a_ed
  c0 = weight * (shape2 * defect ** 2).sum(axis=(0, 2, 3)) * a_ed ** 2
  a_t = _solve_quadratic(c2, c1, c0 - lv_ml * 1000.0)
  scale = defect * a_ed + (1.0 - defect) * a_t[None, :, None, None]
  endo = ellipse * np.sqrt(cavity_profile) * scale

  # Epicardium: incompressible wall, area scaled by the longitudinal shortening except in the
  # akinetic scar, which neither moves nor thickens. The ED wall belongs to the material
  # coordinate u, so it moves with the base.
  endo_ed = ellipse * np.sqrt(cavity_profile) * a_ed
  epi_ed = (a_ed * ellipse + wall) * np.sqrt(epi_profile)
  stretch = 1.0 + (p.lv_length_mm / length[None, :, None, None] - 1.0) * (1.0 - defect)
  epi = np.sqrt(endo ** 2 + (epi_ed ** 2 - endo_ed ** 2) * stretch)

  # RV crescent: R_out = R_epi + d(t) g(theta) P_rv(u); its area is quadratic in d(t).
  x = _wrap_angle(theta - axis) / math.radians(p.rv_sector_half_width_deg)
  crescent = np.clip(1.0 - x * x, 0.0, None) ** p.rv_crescent_exponent
  rv_profile = np.sqrt(_cavity_profile(u, p.rv_length_fraction, 2.0))[..., None]
  shape_rv = crescent * rv_profile
  b1 = weight * (2.0 * epi * shape_rv).sum(axis=(0, 2, 3))
  b2 = weight * (shape_rv ** 2).sum(axis=(0, 2, 3))
  depth = _solve_quadratic(b2, b1, -rv_ml * 1000.0)
  rv_outer = epi + depth[None, :, None, None] * shape_rv

  # RV free wall (thinning out at the insertions) and epicardial fat, per sub-slab so every
  # boundary stays outside the one it encloses.
  heart = rv_outer + p.rv_wall_thickness_mm * np.clip(
      (rv_outer - epi) / p.rv_wall_thickness_mm, 0.0, 1.0)
  fat_variation = 1.0 + 0.5 * np.cos(theta - axis - 1.0) * np.cos(3.0 * theta)
  fat = heart + p.epicardial_fat_mm * fat_variation * np.clip(heart / 10.0, 0.0, 1.0)
  halves = [_slab_halves(r, p.spacing_mm) for r in (fat, heart, rv_outer, epi, endo)]

  # Left atrium above the base plane (u < 0), narrowing upwards; blood without a label.
  atrium = np.clip(1.0 - (np.clip(-u, 0.0, None) / 0.35) ** 2, 0.0, None) * (u < 0)
  left_atrium = p.left_atrium_radius_mm * np.sqrt(np.mean(atrium, axis=2))

  # Papillary muscles opposite the septum, in the mid-ventricle, near the wall, moving with it
  # and thickening in systole.
  lv_endo = _slab_rms(endo)
  angles = axis + np.radians([140.0, -130.0])
  index = np.round(angles / d_theta).astype(int) % _NUM_ANGLES
  presence = np.mean(_window(u, 0.3, 0.75, 0.15), axis=2)
  reach = 0.72 * lv_endo[:, :, index]
  papillary_centres = np.stack([reach * np.cos(angles), reach * np.sin(angles)], axis=-1)
  papillary_radii = (p.papillary_radius_mm * np.sqrt(presence)[..., None]
                     * (1.0 + 0.4 * ejected)[None, :, None]) * (lv_endo[:, :, index] > 8.0)
  return ShortAxisGeometry(
      theta=theta, lv_endo=lv_endo, lv_epi=_slab_rms(epi), rv_outer=_slab_rms(rv_outer),
      image_radii=np.stack([r for r, _ in halves]).astype(np.float32),
      image_edges=np.stack([e for _, e in halves]).astype(np.float32),
      left_atrium=left_atrium, papillary_centres=papillary_centres,
      papillary_radii=papillary_radii, lv_cavity_scale=a_t, rv_depth=depth)


def _slice_offsets_mm(params: SubjectParameters) -> np.ndarray:
  """(Z, 2) in-plane position of the LV axis on every slice, relative to the image centre."""
  k = np.arange(params.nz) - (params.nz - 1) / 2.0
  return np.stack([params.lv_centre_x_mm + k * params.slice_drift_x_mm,
                   params.lv_centre_y_mm + k * params.slice_drift_y_mm], axis=-1)


def heart_extent_mm(params: SubjectParameters, geometry: Optional[ShortAxisGeometry] = None,
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(low, high) x/y bounds of the heart over all slices and frames, from the image centre."""
  geometry = geometry if geometry is not None else short_axis_geometry(params)
  fat = geometry.image_radii[0] + 0.5 * geometry.image_edges[0]
  outer = np.maximum(fat.max(axis=(0, 2)), geometry.left_atrium.max(axis=1)[:, None] + 2.0)
  points = outer[..., None] * np.stack([np.cos(geometry.theta), np.sin(geometry.theta)], -1)
  points = points + _slice_offsets_mm(params)[:, None, :]
  return points.min(axis=(0, 1)), points.max(axis=(0, 1))


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

def _ramp(distance, width):
  """Partial-volume coverage of a boundary at signed distance (inside > 0) with edge width."""
  return np.clip(0.5 + distance / width, 0.0, 1.0)


def _ellipse_coverage(x, y, cx, cy, ax, ay, pixel):
  """Partial-volume coverage of an axis-aligned ellipse (first-order signed distance)."""
  dx, dy = (x - cx) / ax, (y - cy) / ay
  q = np.sqrt(dx * dx + dy * dy) + 1e-9
  gradient = np.sqrt((dx / ax) ** 2 + (dy / ay) ** 2) / q + 1e-9
  return _ramp((1.0 - q) / gradient, pixel)


def _smooth_noise(rng: np.random.Generator, shape, correlation_px: float) -> np.ndarray:
  """Zero-mean, unit-variance smooth random texture of `shape` (X, Y, Z), smooth in-plane."""
  step = max(1, int(correlation_px // 2))
  coarse = rng.standard_normal((shape[0] // step + 3, shape[1] // step + 3, shape[2]))
  coarse = ndimage.gaussian_filter(coarse, (1.0, 1.0, 0.0), mode="wrap")
  fine = ndimage.zoom(coarse, (step, step, 1), order=1)[:shape[0], :shape[1]]
  return ((fine - fine.mean()) / (fine.std() + 1e-9)).astype(np.float32)


def _render_thorax(params: SubjectParameters, rng: np.random.Generator, x: np.ndarray,
                   y: np.ndarray) -> np.ndarray:
  """Static surroundings of the heart, (X, Y, Z) float32 relative to LV blood = 1.

  Anatomy is placed in a patient frame (p towards the patient's left, q posterior) centred on
  the body and rotated into the image by the scene rotation.
  """
  p = params
  pixel = p.spacing_mm
  nz = p.nz
  rot = math.radians(p.scene_rotation_deg)
  # Body centre in image coordinates.
  body_c = np.array([p.lv_centre_x_mm, p.lv_centre_y_mm]) - np.array([
      math.cos(rot) * p.lv_offset_left_mm + math.sin(rot) * p.lv_offset_anterior_mm,
      math.sin(rot) * p.lv_offset_left_mm - math.cos(rot) * p.lv_offset_anterior_mm])
  dx, dy = x[:, None] - body_c[0], y[None, :] - body_c[1]
  pp = (math.cos(rot) * dx + math.sin(rot) * dy)[..., None]    # (X, Y, 1)
  qq = (-math.sin(rot) * dx + math.cos(rot) * dy)[..., None]
  half_w, half_d = p.body_width_mm / 2.0, p.body_depth_mm / 2.0
  fat = p.subcutaneous_fat_mm
  muscle = 12.0
  level = (np.arange(nz) / max(nz - 1, 1))[None, None, :]      # 0 base ... 1 apex

  texture = _smooth_noise(rng, (len(x), len(y), nz), 6.0 / pixel)
  fine = _smooth_noise(rng, (len(x), len(y), nz), 2.5 / pixel)
  body = _ellipse_coverage(pp, qq, 0, 0, half_w, half_d, pixel)
  inner = _ellipse_coverage(pp, qq, 0, 0, half_w - fat, half_d - fat, pixel)
  cavity = _ellipse_coverage(pp, qq, 0, -8.0, half_w - fat - muscle, half_d - fat - muscle - 8,
                             pixel)
  image = body * p.fat_contrast * (1.0 + 0.12 * fine)
  image += inner * (0.30 * (1.0 + 0.08 * texture) - image)
  # Inside the rib cage: mediastinal soft tissue and fat.
  image += cavity * (0.45 * (1.0 + 0.15 * fine) - image)

  # Lungs shrink towards the apex as the diaphragm rises; the liver and stomach come in.
  lung_scale = 1.0 - 0.35 * level
  lung_r = _ellipse_coverage(pp, qq, -0.48 * half_w, -5.0, 0.44 * half_w * lung_scale,
                             0.78 * half_d * lung_scale, pixel)
  lung_l = _ellipse_coverage(pp, qq, 0.55 * half_w, 8.0, 0.36 * half_w * lung_scale,
                             0.72 * half_d * lung_scale, pixel)
  lungs = np.maximum(lung_r, lung_l) * cavity
  image += lungs * (0.04 * (1.0 + 0.3 * texture) - image)
  # Pulmonary vessels: bright dots scattered in the lungs.
  impulses = np.zeros(image.shape, np.float32)
  count = int(rng.integers(60, 120)) * nz
  ix = rng.integers(0, len(x), count)
  iy = rng.integers(0, len(y), count)
  iz = rng.integers(0, nz, count)
  impulses[ix, iy, iz] = rng.uniform(0.5, 1.0, count)
  vessels = ndimage.gaussian_filter(impulses, (1.5 / pixel, 1.5 / pixel, 0)) * (
      2.0 * math.pi * (1.5 / pixel) ** 2)
  image += lungs * np.clip(vessels, 0, 1) * 0.35

  liver = _ellipse_coverage(pp, qq, -0.25 * half_w, half_d * (1.25 - 0.85 * level),
                            0.62 * half_w, 0.75 * half_d, pixel) * inner
  image += liver * (p.liver_contrast * (1.0 + 0.08 * texture) - image)
  stomach_size = np.clip((level - 0.4) / 0.6, 0.0, 1.0)
  stomach = _ellipse_coverage(pp, qq, 0.42 * half_w, 0.35 * half_d, 35.0 * stomach_size + 1e-3,
                              28.0 * stomach_size + 1e-3, pixel) * inner
  image += stomach * (0.6 * (1.0 + 0.1 * fine) - image)

  # Spine (marrow, cortex, canal), paraspinal muscles and the descending aorta.
  spine_q = half_d - fat - 48.0
  for side in (-1.0, 1.0):
    para = _ellipse_coverage(pp, qq, side * 32.0, spine_q + 28.0, 24.0, 17.0, pixel)
    image += para * (0.3 * (1.0 + 0.08 * texture) - image)
  cortex = _ellipse_coverage(pp, qq, 0.0, spine_q, 19.0, 17.0, pixel)
  image += cortex * (0.12 - image)
  marrow = _ellipse_coverage(pp, qq, 0.0, spine_q, 16.5, 14.5, pixel)
  image += marrow * (0.5 * (1.0 + 0.1 * fine) - image)
  canal = _ellipse_coverage(pp, qq, 0.0, spine_q + 27.0, 7.0, 6.0, pixel)
  image += canal * (0.8 - image)
  aorta = _ellipse_coverage(pp, qq, 24.0, spine_q - 24.0, 12.0, 12.0, pixel)
  image += aorta * (0.9 - image)
  # Point-spread function of the acquisition.
  return ndimage.gaussian_filter(image.astype(np.float32), (0.5, 0.5, 0.0))


def _bias_field(params: SubjectParameters, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """(X, Y, Z) smooth multiplicative receive-coil sensitivity, 1 at the heart."""
  p = params
  rot = math.radians(p.coil_rotation_deg)
  centre = np.array([p.lv_centre_x_mm, p.lv_centre_y_mm])
  z = (np.arange(p.nz) - (p.nz - 1) / 2.0) * p.slice_thickness_mm
  reach = 0.45 * p.body_width_mm
  total = np.zeros((len(x), len(y), p.nz))
  at_heart = 0.0
  # Four coil elements around the chest, at unequal distances from the heart.
  for k, distance in enumerate((0.55, 0.75, 0.65, 0.85)):
    angle = rot + k * math.pi / 2.0
    cx = centre[0] + distance * p.body_width_mm * 0.5 * math.cos(angle)
    cy = centre[1] + distance * p.body_depth_mm * 0.5 * math.sin(angle)
    cz = 30.0 * (k % 2 - 0.5)
    d2 = ((x[:, None, None] - cx) ** 2 + (y[None, :, None] - cy) ** 2
          + (z[None, None, :] - cz) ** 2)
    total += 1.0 / (1.0 + d2 / reach ** 2)
    at_heart += 1.0 / (1.0 + ((centre[0] - cx) ** 2 + (centre[1] - cy) ** 2 + cz ** 2)
                       / reach ** 2)
  field = 1.0 + p.bias_field_strength * (total / at_heart - 1.0) * 2.0
  return np.clip(field, 0.3, 3.0).astype(np.float32)


_COS_TABLE = np.cos(np.arange(65536) * (_TWO_PI / 65536)).astype(np.float32)


def _rician_magnitude(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> None:
  """In place: signal <- |signal + sigma (n1 + i n2)|, n1, n2 independent standard normals.

  Uses the polar form of the complex noise, n1 + i n2 = sqrt(2 E) exp(i phi) with E ~ Exp(1)
  and phi uniform, so |S + noise|^2 = S^2 + 2 sigma S sqrt(2E) cos(phi) + 2 sigma^2 E. This
  draws one exponential and 16 random bits per voxel instead of two normals (about twice as
  fast); phi is quantised to 2^16 levels, far below anything visible.
  """
  shape = signal.shape
  exponential = rng.standard_exponential(shape, dtype=np.float32)
  cos_phi = _COS_TABLE[np.frombuffer(rng.bytes(2 * signal.size), dtype=np.uint16)].reshape(shape)
  sigma = np.float32(sigma)
  cross = np.sqrt(exponential * np.float32(2.0))
  cross *= cos_phi
  cross *= signal
  cross *= np.float32(2.0) * sigma
  np.square(signal, out=signal)
  signal += cross
  exponential *= np.float32(2.0) * sigma * sigma
  signal += exponential
  np.maximum(signal, 0.0, out=signal)
  np.sqrt(signal, out=signal)


def render_short_axis(params: SubjectParameters, rng: np.random.Generator,
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Renders the short-axis cine stack of one subject.

  Args:
    params: the subject (from `sample_subject_parameters`).
    rng: random generator for the texture, vessels and noise (continue the subject's stream).

  Returns:
    image: (X, Y, Z, T) float32, non-negative scanner-like intensities (noise-free LV blood at
      the heart is params.intensity_scale).
    labels: (X, Y, Z, T) uint8 in the ACDC convention (0 bg, 1 RV, 2 LV myocardium, 3 LV).
    affine: (4, 4) voxel -> scanner (RAS, mm) transform; column norms are the voxel spacing.
  """
  p = params
  geometry = short_axis_geometry(p)
  pixel = np.float32(p.spacing_mm)
  x = (np.arange(p.nx) - (p.nx - 1) / 2.0) * p.spacing_mm
  y = (np.arange(p.ny) - (p.ny - 1) / 2.0) * p.spacing_mm
  thorax = _render_thorax(p, rng, x, y)

  # The heart is rendered only in a box around it, for all slabs and frames at once: (Z, T, P).
  low, high = heart_extent_mm(p, geometry)
  x0 = max(int(np.searchsorted(x, low[0] - 2 * pixel)) - 1, 0)
  x1 = min(int(np.searchsorted(x, high[0] + 2 * pixel)) + 1, p.nx)
  y0 = max(int(np.searchsorted(y, low[1] - 2 * pixel)) - 1, 0)
  y1 = min(int(np.searchsorted(y, high[1] + 2 * pixel)) + 1, p.ny)
  offsets = _slice_offsets_mm(p)
  shape = (p.nz, x1 - x0, y1 - y0)
  rx = np.broadcast_to(x[None, x0:x1, None] - offsets[:, 0, None, None], shape)
  ry = np.broadcast_to(y[None, None, y0:y1] - offsets[:, 1, None, None], shape)
  rx = rx.reshape(p.nz, 1, -1).astype(np.float32)              # (Z, 1, P)
  ry = ry.reshape(p.nz, 1, -1).astype(np.float32)
  rho = np.sqrt(rx * rx + ry * ry)
  angle_index = (np.round(np.arctan2(ry, rx) * (_NUM_ANGLES / _TWO_PI)).astype(np.intp)
                 % _NUM_ANGLES)
  # One flat index into any (Z, T, A) table gives its value at every (slab, frame, pixel).
  rows = (np.arange(p.nz)[:, None] * p.nb_frame + np.arange(p.nb_frame)[None, :]) * _NUM_ANGLES
  flat_index = rows[..., None] + angle_index                   # (Z, T, P)

  def at_pixels(table):
    return np.take(table.reshape(-1), flat_index)

  def ramp(radius, edge):
    """Coverage of the disc-like region inside `radius` with a linear edge of width `edge`."""
    coverage = radius - rho
    coverage /= edge
    coverage += np.float32(0.5)
    return np.clip(coverage, 0.0, 1.0, out=coverage)

  def coverage(name):
    """Slab partial-volume coverage: the mean of its two halves' coverages."""
    c = IMAGE_BOUNDARIES.index(name)
    radii, edges = geometry.image_radii[c], geometry.image_edges[c]
    total = ramp(at_pixels(radii[0]), at_pixels(edges[0]))
    total += ramp(at_pixels(radii[1]), at_pixels(edges[1]))
    total *= np.float32(0.5)
    return total

  myocardium = np.float32(p.myocardium_contrast)
  fat = np.float32(p.fat_contrast)
  lv_blood, rv_blood = np.float32(1.0), np.float32(p.rv_blood_contrast)
  # Surroundings, with the (unlabelled) left atrium and its wall above the base.
  crop = np.ascontiguousarray(thorax[x0:x1, y0:y1].reshape(-1, p.nz).T)[:, None, :]
  atrium = geometry.left_atrium[..., None].astype(np.float32)
  present = atrium > 0.5
  surround = crop + ramp(atrium + 2.0, pixel) * present * (myocardium - crop)
  surround += ramp(atrium, pixel) * present * (np.float32(0.97) - surround)
  # The heart as nested regions: each term swaps the tissue outside a boundary for the one
  # inside it, weighted by the boundary's partial-volume coverage.
  lv_cavity = coverage("lv_endo")
  heart = surround + coverage("fat_outer") * (fat - surround)
  heart += coverage("heart_outer") * (myocardium - fat)
  heart += (coverage("rv_outer") - coverage("lv_epi")) * (rv_blood - myocardium)
  heart += lv_cavity * (lv_blood - myocardium)
  for m in range(2):
    centre = geometry.papillary_centres[:, :, m, :].astype(np.float32)
    distance = np.sqrt((rx - centre[..., 0:1]) ** 2 + (ry - centre[..., 1:2]) ** 2)
    radius = geometry.papillary_radii[:, :, m, None].astype(np.float32)
    # ramp(r, e) measures from rho; shifting by rho - distance measures from the muscle centre.
    heart += ramp(radius + rho - distance, pixel) * (radius > 0.5) * lv_cavity * (
        myocardium - lv_blood)

  # Labels at pixel centres on the slab-effective boundaries: labelled areas are the model's.
  # The boundaries are nested (endo <= epi <= RV outer), so counting the ones a pixel lies
  # inside gives the ACDC label: 3 LV blood pool, 2 LV myocardium, 1 RV blood pool.
  assert (structures.LV_BLOOD_POOL, structures.LV_MYOCARDIUM, structures.RV_BLOOD_POOL) == (
      3, 2, 1)
  heart_labels = np.zeros(heart.shape, np.uint8)
  for table in (geometry.lv_endo, geometry.lv_epi, geometry.rv_outer):
    heart_labels += rho < at_pixels(table.astype(np.float32))

  # Receive-coil bias and the global scale multiply the noise-free signal.
  gain = _bias_field(p, x, y) * np.float32(p.intensity_scale)
  heart *= np.ascontiguousarray(gain[x0:x1, y0:y1].reshape(-1, p.nz).T)[:, None, :]
  image = np.repeat((thorax * gain)[..., None], p.nb_frame, axis=3)
  labels = np.zeros(image.shape, np.uint8)
  box = (x1 - x0, y1 - y0)
  image[x0:x1, y0:y1] = heart.reshape(p.nz, p.nb_frame, *box).transpose(2, 3, 0, 1)
  labels[x0:x1, y0:y1] = heart_labels.reshape(p.nz, p.nb_frame, *box).transpose(2, 3, 0, 1)

  # Rician noise, in blocks of X rows so the temporaries stay in cache.
  rows = max(1, _NOISE_BLOCK_VOXELS // (p.ny * p.nz * p.nb_frame))
  for start in range(0, p.nx, rows):
    _rician_magnitude(image[start:start + rows], p.noise_level * p.intensity_scale, rng)
  return image, labels, short_axis_affine(p)


def short_axis_affine(params: SubjectParameters) -> np.ndarray:
  """(4, 4) voxel -> RAS mm affine of the stack: an oblique short-axis plane.

  Columns are the voxel axes scaled by the spacing (X, Y in-plane, Z along the slice normal
  from base to apex); the stack centre sits at the scanner's isocentre.
  """
  p = params
  normal = np.array([p.slice_normal_r, p.slice_normal_a, p.slice_normal_s])
  normal /= np.linalg.norm(normal)
  helper = np.array([0.0, 0.0, 1.0]) if abs(normal[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
  u = np.cross(normal, helper)
  u /= np.linalg.norm(u)
  v = np.cross(normal, u)
  psi = math.radians(p.plane_rotation_deg)
  axis_x = math.cos(psi) * u + math.sin(psi) * v
  axis_y = np.cross(normal, axis_x)
  rotation = np.stack([axis_x, axis_y, normal], axis=1)
  affine = np.eye(4)
  affine[:3, :3] = rotation * np.array(p.voxel_spacing_mm)[None, :]
  centre_voxel = (np.array([p.nx, p.ny, p.nz]) - 1) / 2.0
  affine[:3, 3] = -affine[:3, :3] @ centre_voxel
  return affine


# ---------------------------------------------------------------------------------------------
# Long-axis 4-chamber view
# ---------------------------------------------------------------------------------------------

LONG_AXIS_4CH = "la_4ch"
# Entropy tag of the long-axis streams: the 4-chamber view has its own random stream per
# subject, so adding it to a cohort leaves every short-axis file as it was.
_LONG_AXIS_STREAM_TAG = 0x6C61346368
# Thickness of the thin slabs on which the heart model is evaluated along its long axis.
_LONG_AXIS_SLAB_MM = 2.0
# Sub-planes across the imaged slab (through-plane partial volume).
_LONG_AXIS_SUB_PLANES = 3
# Largest slope |dR/ds| used to turn a radius difference into a distance (apex, base corners).
_MAX_BOUNDARY_SLOPE = 6.0
# Group factors of the atrial volumes (LA, RA): dilated atria of DCM and of the stiff HCM and
# infarcted ventricles, a dilated RA with RV disease.
_ATRIAL_SCALE = {"NOR": ((0.9, 1.1), (0.9, 1.1)), "MINF": ((1.2, 1.5), (1.0, 1.2)),
                 "DCM": ((1.5, 2.0), (1.2, 1.5)), "HCM": ((1.3, 1.7), (1.0, 1.2)),
                 "RV": ((0.9, 1.1), (1.5, 2.0))}


def long_axis_generator(seed: int, index: int, tags: Sequence[int] = ()) -> np.random.Generator:
  """The random stream of the 4-chamber view of 0-based subject `index` (`tags` as in
  `subject_generator`)."""
  return np.random.default_rng([seed, _LONG_AXIS_STREAM_TAG, *tags, index])


@dataclasses.dataclass(frozen=True)
class LongAxisView:
  """The 4-chamber acquisition and the atria of one subject (lengths mm, volumes ml).

  The image plane contains the LV long axis and the LV -> RV direction of the short-axis model.
  In-plane heart coordinates: s along the long axis from the ED base (valve) plane towards the
  apex, w across it, positive towards the septum and the RV. `apex_angle_deg` is the angle of
  the apex direction from the patient's left towards anterior; `scene_rotation_deg` rotates the
  patient frame into the image as in the short-axis thorax.
  """
  nx: int
  ny: int
  spacing_mm: float
  slice_thickness_mm: float
  apex_angle_deg: float
  scene_rotation_deg: float
  heart_offset_x_mm: float       # centre of the heart's bounding box from the image centre
  heart_offset_y_mm: float
  la_min_ml: float               # LA volume after the atrial contraction (at ED)
  la_reservoir_fraction: float   # LA filling per ml of LV ejection (reservoir phase)
  ra_min_ml: float
  ra_reservoir_fraction: float
  atrial_wall_mm: float
  atrial_blood_contrast: float
  leaflet_thickness_mm: float
  coil_rotation_deg: float


@dataclasses.dataclass(frozen=True)
class LongAxisGeometry:
  """The heart model cut by the 4-chamber plane, per frame.

  `s` (K,) are the thin-slab centres along the long axis; `radii` (C, K, T, 2) the boundaries
  of IMAGE_BOUNDARIES at the septal/RV (index 0) and lateral (index 1) side of the LV axis, held
  constant above the first slab that lies wholly below the valve plane (the plane itself cuts
  the ventricles); `slopes` their derivative along s. `base` (T,) is the valve-plane position;
  atria are ellipses in (s, w) with centres (T, 2) and semi-axes (T, 2) = (along s, along w).
  """
  s: np.ndarray
  radii: np.ndarray
  slopes: np.ndarray
  base: np.ndarray
  septum_w: float
  la_centre: np.ndarray
  la_axes: np.ndarray
  ra_centre: np.ndarray
  ra_axes: np.ndarray
  la_volume_ml: np.ndarray
  ra_volume_ml: np.ndarray
  valve_open: np.ndarray         # (T,) 0 closed (systole) ... 1 open (filling)


def sample_long_axis_view(params: SubjectParameters, rng: np.random.Generator) -> LongAxisView:
  """Draws the 4-chamber acquisition and atria of the subject `params` from its own stream."""
  p = params
  la_scale, ra_scale = _ATRIAL_SCALE[p.group]
  return LongAxisView(
      nx=p.nx, ny=p.ny, spacing_mm=p.spacing_mm,
      slice_thickness_mm=round(_uniform(rng, (6.0, 8.0)) * 2.0) / 2.0,
      apex_angle_deg=_uniform(rng, (35, 60)), scene_rotation_deg=_uniform(rng, (-20, 20)),
      heart_offset_x_mm=_uniform(rng, (-12, 12)), heart_offset_y_mm=_uniform(rng, (-12, 12)),
      la_min_ml=_uniform(rng, (20, 32)) * _uniform(rng, la_scale),
      la_reservoir_fraction=_uniform(rng, (0.3, 0.45)),
      ra_min_ml=_uniform(rng, (20, 32)) * _uniform(rng, ra_scale),
      ra_reservoir_fraction=_uniform(rng, (0.25, 0.4)),
      atrial_wall_mm=_uniform(rng, (1.8, 2.6)),
      atrial_blood_contrast=_uniform(rng, (0.9, 1.0)),
      leaflet_thickness_mm=_uniform(rng, (1.2, 1.8)),
      coil_rotation_deg=_uniform(rng, (0, 360)))


def long_axis_geometry(params: SubjectParameters, view: LongAxisView) -> LongAxisGeometry:
  """Cuts the short-axis heart model of `params` along its long axis (see LongAxisGeometry).

  The ventricles are `short_axis_geometry` evaluated on a stack of thin slabs from the ED base
  plane to beyond the apex, so their volumes, wall thickening, base descent and group
  abnormalities are those of the short-axis images. The atria are prolate ellipsoids above the
  valve plane whose volume rises while the ventricles eject (reservoir), falls in early filling
  (conduit) and in the atrial kick (booster): V = V_min + f (EDV - V(t)).
  """
  p = params
  dz = _LONG_AXIS_SLAB_MM
  num_slabs = int(math.ceil((p.lv_length_mm + p.epicardial_fat_mm + 2.0) / dz))
  fine = dataclasses.replace(p, nz=num_slabs, slice_thickness_mm=dz, stack_top_mm=0.0)
  geometry = short_axis_geometry(fine)
  s = dz * (np.arange(num_slabs) + 0.5)
  sides = np.round(math.radians(p.lv_rv_axis_deg) / (_TWO_PI / _NUM_ANGLES)).astype(int)
  sides = np.array([sides, sides + _NUM_ANGLES // 2]) % _NUM_ANGLES
  # RMS of the two slab halves: the radius of the whole thin slab. (C, K, T, 2).
  radii = np.sqrt(np.mean(geometry.image_radii[..., sides].astype(np.float64) ** 2, axis=1))

  lv_ml = p.lv_volume_curve_ml()
  ejected = (p.lv_edv_ml - lv_ml) / (p.lv_edv_ml - p.lv_esv_ml)
  base = p.base_descent_mm * ejected
  # Slabs straddling the valve plane have a partly empty RMS; the plane is drawn explicitly.
  first_inside = np.ceil(base / dz - 1e-9).astype(int)
  for t, k0 in enumerate(first_inside):
    radii[:, :k0, t] = radii[:, k0:k0 + 1, t]
  slopes = np.clip(np.gradient(radii, dz, axis=1), -_MAX_BOUNDARY_SLOPE, _MAX_BOUNDARY_SLOPE)

  ed = p.ed_frame - 1
  lv_epi, lv_endo = (radii[IMAGE_BOUNDARIES.index(n), first_inside[ed], ed]
                     for n in ("lv_epi", "lv_endo"))
  rv_outer = radii[IMAGE_BOUNDARIES.index("rv_outer"), first_inside[ed], ed, 0]
  septum_w = 0.5 * (lv_endo[0] + lv_epi[0])
  la_volume = view.la_min_ml + view.la_reservoir_fraction * (p.lv_edv_ml - lv_ml)
  ra_volume = view.ra_min_ml + view.ra_reservoir_fraction * (
      p.rv_edv_ml - p.rv_volume_curve_ml())

  def atrium(volume_ml, annulus_half_width, side):
    # Slightly prolate (c = 1.15 b) with a mouth at the valve plane about as wide as the
    # annulus; the septal edge sits against the interatrial septum.
    b = (3.0 * volume_ml * 1000.0 / (4.0 * math.pi * 1.15)) ** (1.0 / 3.0)
    c = 1.15 * b
    depth = np.clip(1.0 - (np.minimum(annulus_half_width, 0.95 * b) / b) ** 2, 0.05, 1.0)
    centre_s = base - c * np.sqrt(depth)
    centre_w = septum_w + side * (b + 0.5 * view.atrial_wall_mm + 1.0)
    return (np.stack([centre_s, np.broadcast_to(centre_w, base.shape)], axis=-1),
            np.stack([c, b], axis=-1))

  la_centre, la_axes = atrium(la_volume, 0.5 * (lv_endo[0] + lv_endo[1]), -1.0)
  ra_centre, ra_axes = atrium(ra_volume, 0.5 * (rv_outer - lv_epi[0]), 1.0)
  # Atrioventricular valves: closed from the onset of ejection to ES, open while filling.
  phase = p.frame_phases()
  opening = _smooth_step((phase - p.es_phase) / 0.05) * _smooth_step((1.0 - phase) / 0.03)
  return LongAxisGeometry(
      s=s, radii=radii, slopes=slopes, base=base, septum_w=float(septum_w),
      la_centre=la_centre, la_axes=la_axes, ra_centre=ra_centre, ra_axes=ra_axes,
      la_volume_ml=la_volume, ra_volume_ml=ra_volume, valve_open=opening)


def _long_axis_frame(view: LongAxisView) -> tuple[np.ndarray, np.ndarray]:
  """Unit vectors (in image mm) of the apex direction d and the septal direction e."""
  rot = math.radians(view.scene_rotation_deg)
  left = np.array([math.cos(rot), math.sin(rot)])
  posterior = np.array([-math.sin(rot), math.cos(rot)])
  phi = math.radians(view.apex_angle_deg)
  apex = math.cos(phi) * left - math.sin(phi) * posterior
  # The RV lies to the patient's right and anterior of the LV.
  septal = -math.sin(phi) * left - math.cos(phi) * posterior
  return apex, septal


def _long_axis_origin(params: SubjectParameters, view: LongAxisView,
                      geometry: LongAxisGeometry) -> tuple[np.ndarray, np.ndarray]:
  """Image position (mm from the centre) of the LV axis at the ED base plane, and the
  (s, w) bounding box of the heart ((2,) low, (2,) high) it was placed with."""
  fat = IMAGE_BOUNDARIES.index("fat_outer")
  margin = 2.0 * view.atrial_wall_mm
  low = np.array([min((geometry.la_centre[:, 0] - geometry.la_axes[:, 0]).min(),
                      (geometry.ra_centre[:, 0] - geometry.ra_axes[:, 0]).min()) - margin,
                  min(-geometry.radii[fat, ..., 1].max(),
                      (geometry.la_centre[:, 1] - geometry.la_axes[:, 1]).min() - margin)])
  high = np.array([params.lv_length_mm + params.epicardial_fat_mm,
                   max(geometry.radii[fat, ..., 0].max(),
                       (geometry.ra_centre[:, 1] + geometry.ra_axes[:, 1]).max() + margin)])
  apex, septal = _long_axis_frame(view)
  centre_sw = 0.5 * (low + high)
  target = np.array([view.heart_offset_x_mm, view.heart_offset_y_mm])
  origin = target - centre_sw[0] * apex - centre_sw[1] * septal
  # The heart's box, rotated into the image, must lie inside the field of view.
  corners = np.array([[a, b] for a in (low[0], high[0]) for b in (low[1], high[1])])
  points = origin + corners[:, :1] * apex + corners[:, 1:] * septal
  half_fov = 0.5 * np.array([view.nx, view.ny]) * view.spacing_mm - 2.0 * view.spacing_mm
  overflow = np.abs(points).max(axis=0) - half_fov
  if np.any(overflow > 0):
    # Move the heart back inside where the offset pushed it out; fail if it cannot fit.
    shift = -np.sign(points.mean(axis=0)) * np.maximum(overflow, 0.0)
    origin = origin + shift
    points = points + shift
    if np.any(np.abs(points).max(axis=0) > half_fov + 1e-6):
      raise ValueError(f"{params.subject}: the 4-chamber heart ({high - low} mm) does not fit "
                       f"in the {2 * half_fov} mm long-axis field of view; widen "
                       "AcquisitionRanges.image_size or field_of_view_mm")
  return origin, np.stack([low, high])


def long_axis_affine(params: SubjectParameters, view: LongAxisView,
                     origin_mm: np.ndarray) -> np.ndarray:
  """(4, 4) voxel -> RAS mm affine of the 4-chamber plane, consistent with the short axis.

  The plane holds the short-axis slice normal (the LV long axis, base -> apex) and the LV -> RV
  direction of the short-axis images, and passes through the LV axis at the short-axis stack's
  mid slice (the per-slice drift of the axis is neglected). Image X, Y map to the in-plane
  directions; Z, scaled by the slice thickness, is their normalised cross product.
  """
  p = params
  short = short_axis_affine(p)
  axis_x, axis_y, normal = (short[:3, i] / np.linalg.norm(short[:3, i]) for i in range(3))
  angle = math.radians(p.lv_rv_axis_deg)
  toward_rv = math.cos(angle) * axis_x + math.sin(angle) * axis_y
  # RAS of the LV axis at the ED base plane: the stack centre is at the isocentre, and the
  # mid-voxel's depth below the ED base plane is stack_top + thickness * nz / 2.
  base_point = (p.lv_centre_x_mm * axis_x + p.lv_centre_y_mm * axis_y
                - (p.stack_top_mm + p.slice_thickness_mm * p.nz / 2.0) * normal)
  apex, septal = _long_axis_frame(view)
  column_x = view.spacing_mm * (apex[0] * normal + septal[0] * toward_rv)
  column_y = view.spacing_mm * (apex[1] * normal + septal[1] * toward_rv)
  column_z = np.cross(column_x, column_y)
  column_z *= view.slice_thickness_mm / np.linalg.norm(column_z)
  affine = np.eye(4)
  affine[:3, 0], affine[:3, 1], affine[:3, 2] = column_x, column_y, column_z
  centre_voxel = (np.array([view.nx, view.ny]) - 1) / 2.0
  # Image point (x, y) mm from the centre has s = (x - origin).apex, w = (x - origin).septal.
  affine[:3, 3] = (base_point - (origin_mm @ apex) * normal - (origin_mm @ septal) * toward_rv
                   - (column_x * centre_voxel[0] + column_y * centre_voxel[1]))
  return affine


def _segment_coverage(s, w, start, direction, length, thickness, pixel):
  """Partial-volume coverage of a thin bar from `start` (T, 2) along unit `direction` (T, 2)."""
  ds, dw = s - start[:, None, 0], w - start[:, None, 1]
  along = np.clip(ds * direction[:, None, 0] + dw * direction[:, None, 1], 0.0, length[:, None])
  distance = np.hypot(ds - along * direction[:, None, 0], dw - along * direction[:, None, 1])
  return _ramp(0.5 * thickness - distance, pixel)


def render_long_axis_4ch(params: SubjectParameters, rng: np.random.Generator,
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Renders the 4-chamber long-axis cine of one subject (same heart as its short axis).

  Args:
    params: the subject (from `sample_subject_parameters`).
    rng: the subject's long-axis stream (`long_axis_generator`): acquisition, atria, texture,
      noise.

  Returns:
    image: (X, Y, 1, T) float32 scanner-like intensities, frames as in the short axis.
    labels: (X, Y, 1, T) uint8: 0 background, 1 RV, 2 LV myocardium, 3 LV, 4 LA, 5 RA blood
      pool (structures.*), at pixel centres on the central plane of the slab.
    affine: (4, 4) voxel -> RAS mm (`long_axis_affine`).
  """
  p = params
  view = sample_long_axis_view(p, rng)
  geometry = long_axis_geometry(p, view)
  origin, (low, high) = _long_axis_origin(p, view, geometry)
  apex, septal = _long_axis_frame(view)
  pixel = view.spacing_mm
  x = (np.arange(view.nx) - (view.nx - 1) / 2.0) * pixel
  y = (np.arange(view.ny) - (view.ny - 1) / 2.0) * pixel
  gx, gy = np.meshgrid(x - origin[0], y - origin[1], indexing="ij")
  s_all = gx * apex[0] + gy * apex[1]
  w_all = gx * septal[0] + gy * septal[1]

  # Surroundings: the short-axis thorax model on one plane centred on the LV, plus the dome of
  # the liver below the right heart, which the tilted 4-chamber plane cuts.
  lv_mid = origin + 0.5 * p.lv_length_mm * apex
  plane = dataclasses.replace(p, nx=view.nx, ny=view.ny, nz=1, lv_centre_x_mm=float(lv_mid[0]),
                              lv_centre_y_mm=float(lv_mid[1]),
                              scene_rotation_deg=view.scene_rotation_deg,
                              coil_rotation_deg=view.coil_rotation_deg)
  thorax = _render_thorax(plane, rng, x, y)[..., 0]
  liver_centre = (origin + (low[0] - 35.0) * apex + (high[1] + 25.0) * septal)
  texture = _smooth_noise(rng, (view.nx, view.ny, 1), 6.0 / pixel)[..., 0]
  liver = _ellipse_coverage(x[:, None], y[None, :], liver_centre[0], liver_centre[1], 75.0,
                            75.0, pixel) * (thorax > 0.2)
  thorax += liver * (p.liver_contrast * (1.0 + 0.08 * texture) - thorax)

  # The heart only in the box of its (s, w) extent: (T, P) arrays over those pixels.
  box = ((s_all > low[0] - 3 * pixel) & (s_all < high[0] + 3 * pixel)
         & (w_all > low[1] - 3 * pixel) & (w_all < high[1] + 3 * pixel))
  where = np.flatnonzero(box.reshape(-1))
  s = s_all.reshape(-1)[where][None, :].astype(np.float64)
  w = w_all.reshape(-1)[where][None, :].astype(np.float64)
  num_frames = p.nb_frame
  septal_side = w > 0
  # Thin-slab index and fraction of every pixel along the long axis.
  position = np.clip(s / _LONG_AXIS_SLAB_MM - 0.5, 0.0, len(geometry.s) - 1.0)
  k0 = np.minimum(position.astype(int), len(geometry.s) - 2)
  fraction = position - k0
  frames = np.arange(num_frames)[:, None]

  def boundary(name):
    """Radius and slope of a boundary at every pixel's s and side: (T, P) each."""
    c = IMAGE_BOUNDARIES.index(name)
    side = np.where(septal_side, 0, 1)
    out = []
    for table in (geometry.radii[c], geometry.slopes[c]):
      a, b = table[k0, frames, side], table[k0 + 1, frames, side]
      out.append(a + fraction * (b - a))
    return out

  tables = {name: boundary(name) for name in IMAGE_BOUNDARIES}
  below_valve = _ramp(s - geometry.base[:, None], pixel)
  # Outside the ventricles (RV side only has an RV; beyond the apex nothing).
  radial = np.abs(w)

  myocardium = p.myocardium_contrast
  fat, lv_blood, rv_blood = p.fat_contrast, 1.0, p.rv_blood_contrast
  atrial_blood = view.atrial_blood_contrast
  surround = thorax.reshape(-1)[where][None, :]
  heart = np.zeros((num_frames, where.size))
  offsets = (np.arange(_LONG_AXIS_SUB_PLANES) - (_LONG_AXIS_SUB_PLANES - 1) / 2.0) * (
      view.slice_thickness_mm / _LONG_AXIS_SUB_PLANES)
  for v in offsets:
    def cover(name):
      radius, slope = tables[name]
      # A circle of radius R cut at distance v from its centre: half-width sqrt(R^2 - v^2).
      half_width = np.sqrt(np.maximum(radius * radius - v * v, 0.0))
      # Fading out the last pixel of width keeps the tips (apex) from leaving a line on the axis.
      tip = np.clip(half_width / pixel, 0.0, 1.0)
      return (_ramp((half_width - radial) / np.sqrt(1.0 + slope * slope), pixel) * tip
              * below_valve)

    def ellipsoid(centre, axes, grow=0.0):
      k = np.sqrt(np.clip(1.0 - (v / axes[:, 1]) ** 2, 0.0, None))[:, None]
      return _ellipse_coverage(s, w, centre[:, None, 0], centre[:, None, 1],
                               axes[:, None, 0] * k + grow + 1e-3,
                               axes[:, None, 1] * k + grow + 1e-3, pixel)

    above_valve = 1.0 - below_valve
    la_side = _ramp(geometry.septum_w - w, pixel)
    layer = surround + cover("fat_outer") * (fat - surround)
    # Atrial walls with a thin layer of fat, then the atrial blood pools, split by the septum.
    wall_grow = view.atrial_wall_mm
    for centre, axes in ((geometry.la_centre, geometry.la_axes),
                         (geometry.ra_centre, geometry.ra_axes)):
      layer += ellipsoid(centre, axes, wall_grow + 1.5) * above_valve * (fat - layer)
    for centre, axes in ((geometry.la_centre, geometry.la_axes),
                         (geometry.ra_centre, geometry.ra_axes)):
      layer += ellipsoid(centre, axes, wall_grow) * above_valve * (myocardium - layer)
    septum = _ramp(0.5 * wall_grow - np.abs(w - geometry.septum_w), pixel)
    la = ellipsoid(geometry.la_centre, geometry.la_axes) * la_side * above_valve
    ra = ellipsoid(geometry.ra_centre, geometry.ra_axes) * (1.0 - la_side) * above_valve
    layer += (la + ra) * (1.0 - septum) * (atrial_blood - layer)
    # Ventricles, nested as in the short-axis images (the RV cavity lies between the LV
    # epicardium and the RV outer boundary, which coincide away from the RV).
    layer += cover("heart_outer") * (myocardium - layer)
    layer += (cover("rv_outer") - cover("lv_epi")) * (rv_blood - myocardium)
    layer += cover("lv_endo") * (lv_blood - myocardium)
    heart += layer
  heart /= len(offsets)

  # Mitral and tricuspid leaflets, hinged on the annulus at the valve plane: across the orifice
  # when closed (systole), swung towards the apex when open (filling).
  def at_valve(name, side):
    table = geometry.radii[IMAGE_BOUNDARIES.index(name), :, :, side]
    return np.array([np.interp(b, geometry.s, table[:, t]) for t, b in enumerate(geometry.base)])

  annulus = np.stack([at_valve("lv_endo", 0), at_valve("lv_endo", 1), at_valve("lv_epi", 0),
                      at_valve("rv_outer", 0)], axis=-1)
  hinges = {"mitral": (annulus[:, 1] * -1.0, annulus[:, 0]),
            "tricuspid": (annulus[:, 2], annulus[:, 3])}
  swing = 0.5 * math.pi * 0.85 * geometry.valve_open
  for low_w, high_w in hinges.values():
    length = 0.55 * (high_w - low_w)
    for hinge_w, inward in ((low_w, 1.0), (high_w, -1.0)):
      start = np.stack([geometry.base + 0.5, hinge_w], axis=-1)
      direction = np.stack([np.sin(swing), inward * np.cos(swing)], axis=-1)
      leaflet = _segment_coverage(s, w, start, direction, length, view.leaflet_thickness_mm,
                                  pixel)
      heart += leaflet * (myocardium - heart)

  # Labels at pixel centres on the central plane.
  ventricle = s >= geometry.base[:, None]
  labels_heart = np.zeros(heart.shape, np.uint8)
  r = {name: tables[name][0] for name in ("lv_endo", "lv_epi", "rv_outer")}
  labels_heart[ventricle & (radial < r["rv_outer"]) & septal_side] = structures.RV_BLOOD_POOL
  labels_heart[ventricle & (radial < r["lv_epi"])] = structures.LV_MYOCARDIUM
  labels_heart[ventricle & (radial < r["lv_endo"])] = structures.LV_BLOOD_POOL

  def inside(centre, axes):
    return (((s - centre[:, None, 0]) / axes[:, None, 0]) ** 2
            + ((w - centre[:, None, 1]) / axes[:, None, 1]) ** 2) < 1.0

  atrial = ~ventricle
  labels_heart[atrial & inside(geometry.la_centre, geometry.la_axes)
               & (w < geometry.septum_w - 0.5 * view.atrial_wall_mm)] = structures.LA_BLOOD_POOL
  labels_heart[atrial & inside(geometry.ra_centre, geometry.ra_axes)
               & (w > geometry.septum_w + 0.5 * view.atrial_wall_mm)] = structures.RA_BLOOD_POOL

  gain = _bias_field(plane, x, y)[..., 0] * np.float32(p.intensity_scale)
  image = np.repeat((thorax * gain)[..., None], num_frames, axis=-1).astype(np.float32)
  flat = image.reshape(-1, num_frames)
  flat[where] = (heart * gain.reshape(-1)[where][None, :]).T
  labels = np.zeros(image.shape, np.uint8)
  labels.reshape(-1, num_frames)[where] = labels_heart.T
  _rician_magnitude(image, p.noise_level * p.intensity_scale, rng)
  affine = long_axis_affine(p, view, origin)
  return image[:, :, None, :], labels[:, :, None, :], affine


# ---------------------------------------------------------------------------------------------
# Writing the ACDC layout
# ---------------------------------------------------------------------------------------------

def _subject_files(params: SubjectParameters) -> list[str]:
  s = params.subject
  frames = sorted({params.ed_frame, params.es_frame})
  names = ["Info.cfg", f"{s}_4d.nii.gz", f"{s}_4d_gt.nii.gz"]
  for frame in frames:
    names += [f"{s}_frame{frame:02d}.nii.gz", f"{s}_frame{frame:02d}_gt.nii.gz"]
  return names


def _nifti(data: np.ndarray, affine: np.ndarray, params: SubjectParameters,
           spacing_mm: Optional[tuple[float, float, float]] = None) -> nib.Nifti1Image:
  """A NIfTI image with the subject's voxel spacing (or `spacing_mm`) and frame duration."""
  image = nib.Nifti1Image(data, affine)
  header = image.header
  header.set_data_dtype(data.dtype)
  spacing_mm = params.voxel_spacing_mm if spacing_mm is None else tuple(spacing_mm)
  zooms = spacing_mm + ((params.frame_duration_ms,) if data.ndim == 4 else ())
  header.set_zooms(zooms)
  header.set_xyzt_units("mm", "msec")
  image.set_qform(affine, code=1)
  image.set_sform(affine, code=1)
  return image


def info_cfg_text(params: SubjectParameters) -> str:
  """Contents of the subject's Info.cfg, ACDC key names."""
  return (f"ED: {params.ed_frame}\nES: {params.es_frame}\nGroup: {params.group}\n"
          f"Height: {params.height_cm:.1f}\nNbFrame: {params.nb_frame}\n"
          f"Weight: {params.weight_kg:.1f}\n")


def write_acdc_subject(root: str, params: SubjectParameters, image: np.ndarray,
                       labels: np.ndarray, affine: np.ndarray) -> str:
  """Writes one subject into root/training/<subject>/ and returns that directory.

  The subject is written into a staging directory first and renamed into place, so an
  interrupted run never leaves a half-written subject. Images are stored as int16 (rounded,
  clipped), labels as uint8.
  """
  expected = (params.nx, params.ny, params.nz, params.nb_frame)
  if image.shape != expected or labels.shape != expected:
    raise ValueError(f"{params.subject}: image {image.shape} / labels {labels.shape} do not "
                     f"match the parameters' (X, Y, Z, T) = {expected}")
  final = os.path.join(root, PARTITION, params.subject)
  staging = os.path.join(root, _STAGING_DIR, f"{params.subject}-{uuid.uuid4().hex[:8]}")
  os.makedirs(staging)
  try:
    stored = np.clip(np.rint(image), 0, np.iinfo(np.int16).max).astype(np.int16)
    labels = labels.astype(np.uint8)
    s = params.subject
    nib.save(_nifti(stored, affine, params), os.path.join(staging, f"{s}_4d.nii.gz"))
    nib.save(_nifti(labels, affine, params), os.path.join(staging, f"{s}_4d_gt.nii.gz"))
    for frame in sorted({params.ed_frame, params.es_frame}):
      t = frame - 1
      nib.save(_nifti(np.ascontiguousarray(stored[..., t]), affine, params),
               os.path.join(staging, f"{s}_frame{frame:02d}.nii.gz"))
      nib.save(_nifti(np.ascontiguousarray(labels[..., t]), affine, params),
               os.path.join(staging, f"{s}_frame{frame:02d}_gt.nii.gz"))
    with open(os.path.join(staging, "Info.cfg"), "w", encoding="utf-8") as f:
      f.write(info_cfg_text(params))
    os.makedirs(os.path.dirname(final), exist_ok=True)
    if os.path.exists(final):
      shutil.rmtree(final)
    os.rename(staging, final)
  finally:
    if os.path.exists(staging):
      shutil.rmtree(staging, ignore_errors=True)
  return final


def subject_is_complete(root: str, params: SubjectParameters) -> bool:
  """Whether root/training/<subject>/ holds every file of `params` with a matching Info.cfg."""
  directory = os.path.join(root, PARTITION, params.subject)
  if not all(os.path.isfile(os.path.join(directory, name)) for name in _subject_files(params)):
    return False
  with open(os.path.join(directory, "Info.cfg"), encoding="utf-8") as f:
    return f.read() == info_cfg_text(params)


def long_axis_files(params: SubjectParameters) -> list[str]:
  """Names of the 4-chamber cine and its labels in the subject's folder."""
  s = params.subject
  return [f"{s}_{LONG_AXIS_4CH}.nii.gz", f"{s}_{LONG_AXIS_4CH}_gt.nii.gz"]


def long_axis_is_complete(root: str, params: SubjectParameters) -> bool:
  """Whether root/training/<subject>/ holds both 4-chamber files."""
  directory = os.path.join(root, PARTITION, params.subject)
  return all(os.path.isfile(os.path.join(directory, name)) for name in long_axis_files(params))


def write_long_axis_subject(root: str, params: SubjectParameters, image: np.ndarray,
                            labels: np.ndarray, affine: np.ndarray) -> list[str]:
  """Writes the 4-chamber cine (int16) and labels (uint8) next to the short-axis files.

  Each file is written under a temporary name in the subject folder and renamed into place,
  labels first, so the cine's presence means both are complete. Returns the two paths.
  """
  if image.ndim != 4 or image.shape[2] != 1 or image.shape[3] != params.nb_frame or (
      labels.shape != image.shape):
    raise ValueError(f"{params.subject}: 4-chamber image {image.shape} / labels {labels.shape} "
                     f"must be (X, Y, 1, {params.nb_frame})")
  directory = os.path.join(root, PARTITION, params.subject)
  os.makedirs(directory, exist_ok=True)
  spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
  stored = np.clip(np.rint(image), 0, np.iinfo(np.int16).max).astype(np.int16)
  image_name, labels_name = long_axis_files(params)
  paths = []
  for name, data in ((labels_name, labels.astype(np.uint8)), (image_name, stored)):
    final = os.path.join(directory, name)
    temporary = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:8]}.nii.gz")
    try:
      nib.save(_nifti(data, affine, params, spacing), temporary)
      os.replace(temporary, final)
    finally:
      if os.path.exists(temporary):
        os.remove(temporary)
    paths.append(final)
  return paths[::-1]


def write_parameters_csv(path: str, subjects: Sequence[SubjectParameters]) -> None:
  """Writes parameters.csv (one row per subject, every generating parameter) atomically."""
  names = [f.name for f in dataclasses.fields(SubjectParameters)]
  partial = f"{path}.partial-{uuid.uuid4().hex[:8]}"
  with open(partial, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=names)
    writer.writeheader()
    for params in subjects:
      writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                       for k, v in dataclasses.asdict(params).items()})
  os.replace(partial, path)


# ---------------------------------------------------------------------------------------------
# Cohort
# ---------------------------------------------------------------------------------------------

def subject_generator(seed: int, index: int, tags: Sequence[int] = ()) -> np.random.Generator:
  """The random stream of 0-based subject `index`: parameters first, then rendering. `tags`
  (e.g. `HELD_OUT_STREAM_TAG`) select a separate family of streams."""
  return np.random.default_rng([seed, *tags, index])


def _synthesize_subject(output_dir: str, num_subjects: int, seed: int, index: int,
                        ranges: AcquisitionRanges, long_axis_4ch: bool = False,
                        group: Optional[str] = None,
                        tags: tuple[int, ...] = ()) -> tuple[SubjectParameters, bool]:
  """Writes subject `index` unless complete; `group` None: the balanced group of the cohort;
  `num_subjects` only sets the width of the id."""
  rng = subject_generator(seed, index, tags)
  params = sample_subject_parameters(rng, group or group_of_subject(seed, index),
                                     subject_name(index, num_subjects), index, ranges)
  wrote = False
  if not subject_is_complete(output_dir, params):
    image, labels, affine = render_short_axis(params, rng)
    write_acdc_subject(output_dir, params, image, labels, affine)
    wrote = True
  # The long-axis view has its own stream, so a cohort written without it gains it later
  # without any short-axis file being rewritten.
  if long_axis_4ch and not long_axis_is_complete(output_dir, params):
    image, labels, affine = render_long_axis_4ch(params, long_axis_generator(seed, index, tags))
    write_long_axis_subject(output_dir, params, image, labels, affine)
    wrote = True
  return params, wrote


def synthesize_cohort(output_dir: str, num_subjects: int, seed: int, *, num_workers: int = 1,
                      ranges: AcquisitionRanges = AcquisitionRanges(),
                      long_axis_4ch: bool = False) -> list[SubjectParameters]:
  """Writes (or completes) a synthetic ACDC-layout cohort and returns its subjects' parameters.

  Subjects whose files are already complete are skipped, so an interrupted run resumes where it
  stopped. `num_workers` > 1 renders subjects in parallel processes; the result is identical.
  Writes output_dir/training/patientXXX/..., output_dir/parameters.csv and the ranges
  (acquisition_ranges.json); with `long_axis_4ch` also each subject's 4-chamber cine
  <subject>_la_4ch.nii.gz (X, Y, 1, T) and its labels <subject>_la_4ch_gt.nii.gz
  (`render_long_axis_4ch`), added to subjects whose short-axis files exist already without
  touching those.
  """
  if num_subjects < 1:
    raise ValueError(f"num_subjects must be >= 1, got {num_subjects}")
  jobs = [(output_dir, num_subjects, seed, i, ranges, long_axis_4ch)
          for i in range(num_subjects)]
  return _write_cohort(output_dir, jobs, ranges, num_workers)


def synthesize_held_out_cohort(output_dir: str, num_subjects: int, seed: int, *,
                               first_index: int, group: str = "NOR", num_workers: int = 1,
                               ranges: AcquisitionRanges = AcquisitionRanges(),
                               long_axis_4ch: bool = False) -> list[SubjectParameters]:
  """Writes (or completes) `num_subjects` held-out subjects of one `group` (module docstring).

  Subject k is 0-based subject first_index + k (patient{first_index + k + 1}): pass the size of
  the main cohort as `first_index` so that no id is shared with it. Its parameters and images
  come from the stream [seed, HELD_OUT_STREAM_TAG, first_index + k]. Files, resumption and
  workers as in `synthesize_cohort`.
  """
  if group not in structures.GROUPS:
    raise ValueError(f"unknown group {group!r}; expected one of {list(structures.GROUPS)}")
  if num_subjects < 1:
    raise ValueError(f"num_subjects must be >= 1, got {num_subjects}")
  if first_index < 0:
    raise ValueError(f"first_index must be >= 0, got {first_index}")
  last = first_index + num_subjects
  jobs = [(output_dir, last, seed, i, ranges, long_axis_4ch, group, (HELD_OUT_STREAM_TAG,))
          for i in range(first_index, last)]
  return _write_cohort(output_dir, jobs, ranges, num_workers)


def _write_cohort(output_dir: str, jobs: list[tuple], ranges: AcquisitionRanges,
                  num_workers: int) -> list[SubjectParameters]:
  """Runs `_synthesize_subject` over `jobs`, then writes parameters.csv and the ranges."""
  if num_workers < 1:
    raise ValueError(f"num_workers must be >= 1, got {num_workers}")
  os.makedirs(output_dir, exist_ok=True)
  if num_workers == 1:
    results = [_synthesize_subject(*job) for job in jobs]
  else:
    # Spawned workers: safe when the caller has already started JAX or TensorFlow threads.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
      results = list(pool.map(_synthesize_subject, *zip(*jobs)))
  subjects = [params for params, _ in results]
  write_parameters_csv(os.path.join(output_dir, PARAMETERS_CSV), subjects)
  write_acquisition_ranges(output_dir, ranges)
  shutil.rmtree(os.path.join(output_dir, _STAGING_DIR), ignore_errors=True)
  return subjects


def write_acquisition_ranges(root: str, ranges: AcquisitionRanges) -> None:
  """Writes root/acquisition_ranges.json (the ranges a cohort was drawn from) atomically."""
  path = os.path.join(root, ACQUISITION_RANGES_JSON)
  partial = f"{path}.partial-{uuid.uuid4().hex[:8]}"
  with open(partial, "w", encoding="utf-8") as f:
    json.dump(dataclasses.asdict(ranges), f, indent=2)
  os.replace(partial, path)


def read_acquisition_ranges(root: str) -> Optional[AcquisitionRanges]:
  """The ranges recorded in root/acquisition_ranges.json; None when the cohort has no record.

  Raises ValueError naming the file when it is not a valid record."""
  path = os.path.join(root, ACQUISITION_RANGES_JSON)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      values = json.load(f)
    return AcquisitionRanges(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in values.items()})
  except (ValueError, TypeError, AttributeError) as e:
    raise ValueError(f"{path}: not a valid record of acquisition ranges ({e})") from None


# ---------------------------------------------------------------------------------------------
# Preview figure
# ---------------------------------------------------------------------------------------------

def lv_volume_curve_from_labels(labels: np.ndarray, spacing_mm) -> np.ndarray:
  """(T,) LV blood-pool volume in ml of a (X, Y, Z, T) label map."""
  voxel_ml = cardiac.voxel_volume_ml(spacing_mm)
  return np.count_nonzero(labels == structures.LV_BLOOD_POOL, axis=(0, 1, 2)) * voxel_ml


def save_cohort_preview(output_dir: str, png_path: str,
                        subjects: Optional[Sequence[SubjectParameters]] = None,
                        num_slices_shown: int = 6) -> None:
  """Montage of one subject per group read back from the written files.

  Per subject: ED and ES mid-ventricular slices, the same with label overlays, ED slices from
  base to apex, and the LV volume curve measured from the labels of every frame (ED, ES marked).
  """
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import colors
  from matplotlib import pyplot as plt

  if subjects is None:
    subjects = read_parameters_csv(os.path.join(output_dir, PARAMETERS_CSV))
  shown, seen = [], set()
  for params in subjects:
    if params.group not in seen:
      shown.append(params)
      seen.add(params.group)
  columns = 4 + num_slices_shown + 1
  figure = plt.figure(figsize=(1.6 * columns + 1.2, 1.75 * len(shown)), dpi=110)
  grid = figure.add_gridspec(len(shown), columns, width_ratios=[1] * (columns - 1) + [1.9],
                             wspace=0.05, hspace=0.12)
  overlay = colors.ListedColormap([(0, 0, 0, 0), (0.2, 0.5, 1.0, 0.45), (0.1, 0.9, 0.2, 0.45),
                                   (1.0, 0.2, 0.2, 0.45)])
  for row, params in enumerate(shown):
    directory = os.path.join(output_dir, PARTITION, params.subject)
    cine = nib.load(os.path.join(directory, f"{params.subject}_4d.nii.gz"))
    image = np.asarray(cine.dataobj, dtype=np.float32)
    labels = np.asarray(nib.load(os.path.join(directory, f"{params.subject}_4d_gt.nii.gz")
                                 ).dataobj, dtype=np.uint8)
    spacing = cine.header.get_zooms()[:3]
    ed, es = params.ed_frame - 1, params.es_frame - 1
    lv_area = np.count_nonzero(labels[..., ed] == structures.LV_BLOOD_POOL, axis=(0, 1))
    mid = int(np.flatnonzero(lv_area)[len(np.flatnonzero(lv_area)) // 2])
    # Crop around the heart for the mid-slice panels.
    heart = np.argwhere(labels[:, :, mid, ed] > 0)
    centre = heart.mean(axis=0).astype(int)
    half = int(75 / spacing[0])
    window = (slice(max(centre[0] - half, 0), centre[0] + half),
              slice(max(centre[1] - half, 0), centre[1] + half))
    vmax = np.percentile(image[..., mid, ed], 99.5)
    panels = [(image[..., mid, ed], None, "ED"), (image[..., mid, es], None, "ES"),
              (image[..., mid, ed], labels[..., mid, ed], "ED labels"),
              (image[..., mid, es], labels[..., mid, es], "ES labels")]
    for col, (picture, label_map, title) in enumerate(panels):
      axes = figure.add_subplot(grid[row, col])
      axes.imshow(picture[window].T, cmap="gray", vmin=0, vmax=vmax)
      if label_map is not None:
        axes.imshow(label_map[window].T, cmap=overlay, vmin=0, vmax=3, interpolation="nearest")
      axes.set_xticks([])
      axes.set_yticks([])
      if row == 0:
        axes.set_title(title, fontsize=8)
      if col == 0:
        axes.set_ylabel(f"{params.subject}\n{params.group}", fontsize=8)
    levels = np.linspace(0, params.nz - 1, num_slices_shown).round().astype(int)
    for j, k in enumerate(levels):
      axes = figure.add_subplot(grid[row, 4 + j])
      axes.imshow(image[..., k, ed].T, cmap="gray", vmin=0, vmax=vmax)
      axes.set_xticks([])
      axes.set_yticks([])
      axes.set_xlabel(f"z{k}", fontsize=6, labelpad=1)
      if row == 0 and j == 0:
        axes.set_title("ED, base -> apex", fontsize=8, loc="left")
    axes = figure.add_subplot(grid[row, columns - 1])
    volumes = lv_volume_curve_from_labels(labels, spacing)
    frames = np.arange(1, params.nb_frame + 1)
    axes.plot(frames, volumes, "k.-", lw=1, ms=3, label="measured")
    axes.plot(frames, params.lv_volume_curve_ml(), color="tab:orange", lw=0.8, label="target")
    axes.axvline(params.ed_frame, color="tab:blue", lw=0.8)
    axes.axvline(params.es_frame, color="tab:red", lw=0.8)
    axes.tick_params(labelsize=6)
    axes.set_ylabel("LV ml", fontsize=7, labelpad=1)
    axes.yaxis.set_label_position("right")
    axes.yaxis.tick_right()
    axes.text(0.02, 0.04, f"EF {params.lv_ef_percent:.0f}%  ED {params.ed_frame} "
              f"ES {params.es_frame}", transform=axes.transAxes, fontsize=6)
    if row == 0:
      axes.set_title("LV volume", fontsize=8)
      axes.legend(fontsize=5, loc="upper right", frameon=False)
    if row == len(shown) - 1:
      axes.set_xlabel("frame", fontsize=7)
  os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
  figure.savefig(png_path, bbox_inches="tight")
  plt.close(figure)


def save_long_axis_preview(output_dir: str, png_path: str,
                           subjects: Optional[Sequence[SubjectParameters]] = None,
                           num_frames_shown: int = 6) -> None:
  """Strip of 4-chamber frames from ED to ES, one subject per group, read from the files.

  Per subject: `num_frames_shown` frames evenly spaced from ED to ES (valve plane drawn as a
  line through the ED and current mitral-annulus level), then the ED and ES labels.
  """
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import colors
  from matplotlib import pyplot as plt

  if subjects is None:
    subjects = read_parameters_csv(os.path.join(output_dir, PARAMETERS_CSV))
  shown, seen = [], set()
  for params in subjects:
    if params.group not in seen:
      shown.append(params)
      seen.add(params.group)
  columns = num_frames_shown + 2
  figure, axes = plt.subplots(len(shown), columns, figsize=(1.7 * columns, 1.8 * len(shown)),
                              dpi=110, squeeze=False)
  overlay = colors.ListedColormap([(0, 0, 0, 0), (0.2, 0.5, 1.0, 0.5), (0.1, 0.9, 0.2, 0.5),
                                   (1.0, 0.2, 0.2, 0.5), (1.0, 0.65, 0.0, 0.5),
                                   (0.9, 0.2, 0.9, 0.5)])
  for row, params in enumerate(shown):
    directory = os.path.join(output_dir, PARTITION, params.subject)
    image_name, labels_name = long_axis_files(params)
    image = np.asarray(nib.load(os.path.join(directory, image_name)).dataobj,
                       dtype=np.float32)[:, :, 0]
    labels = np.asarray(nib.load(os.path.join(directory, labels_name)).dataobj,
                        dtype=np.uint8)[:, :, 0]
    ed, es = params.ed_frame - 1, params.es_frame - 1
    heart = np.argwhere(labels[..., ed] > 0)
    centre = ((heart.min(axis=0) + heart.max(axis=0)) // 2).astype(int)
    half = int(0.55 * (heart.max(axis=0) - heart.min(axis=0)).max()) + 4
    window = (slice(max(centre[0] - half, 0), centre[0] + half),
              slice(max(centre[1] - half, 0), centre[1] + half))
    vmax = np.percentile(image[..., ed][window], 99.5)
    frames = np.linspace(ed, es, num_frames_shown).round().astype(int)
    for col, frame in enumerate(frames):
      ax = axes[row, col]
      ax.imshow(image[..., frame][window].T, cmap="gray", vmin=0, vmax=vmax)
      phase = "ED" if frame == ed else "ES" if frame == es else f"frame {frame + 1}"
      if row == 0 or frame in (ed, es):
        ax.set_title(phase, fontsize=7, pad=2)
    for col, frame in ((num_frames_shown, ed), (num_frames_shown + 1, es)):
      ax = axes[row, col]
      ax.imshow(image[..., frame][window].T, cmap="gray", vmin=0, vmax=vmax)
      ax.imshow(labels[..., frame][window].T, cmap=overlay, vmin=0, vmax=5,
                interpolation="nearest")
      ax.set_title(f"{'ED' if frame == ed else 'ES'} labels", fontsize=7, pad=2)
    axes[row, 0].set_ylabel(f"{params.subject}\n{params.group}", fontsize=7)
    for ax in axes[row]:
      ax.set_xticks([])
      ax.set_yticks([])
  figure.suptitle("Synthetic 4-chamber cine, ED -> ES (labels: RV blue, LV myo green, LV red, "
                  "LA orange, RA magenta)", fontsize=8, y=0.995)
  figure.tight_layout(pad=0.3, rect=(0.0, 0.0, 1.0, 0.975))
  os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
  figure.savefig(png_path, bbox_inches="tight")
  plt.close(figure)


def _parameters_from_row(row: dict[str, str]) -> SubjectParameters:
  """Parses one parameters.csv row back into SubjectParameters."""
  values = {}
  for field in dataclasses.fields(SubjectParameters):
    text = row[field.name]
    values[field.name] = {"int": int, "float": float}.get(field.type, str)(text)
  return SubjectParameters(**values)


def read_parameters_csv(path: str) -> list[SubjectParameters]:
  """Reads parameters.csv back into SubjectParameters (floats at 6 significant digits)."""
  with open(path, encoding="utf-8") as f:
    return [_parameters_from_row(row) for row in csv.DictReader(f)]
