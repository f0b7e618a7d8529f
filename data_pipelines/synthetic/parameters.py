"""The parameters of one synthetic subject and the rules that name and group subjects.

`SubjectParameters` holds everything that generates a subject (diagnostic group, body size,
target LV/RV volumes, cardiac-cycle timing, heart shape and pose, acquisition and contrast);
`AcquisitionRanges` the ranges its acquisition is drawn from. `cardiac_cycle_volume` is the
target volume curve of a ventricle over one cycle (the phases of the Wiggers diagram).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cardiac_jax import structures

# Entropy tag that separates the group-permutation streams from the per-subject streams.
_GROUP_STREAM_TAG = 0x67726F7570


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
