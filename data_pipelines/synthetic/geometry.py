"""Heart geometry: polar boundary tables of the heart model per slab and frame.

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
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

from data_pipelines.synthetic.parameters import SubjectParameters

_TWO_PI = 2.0 * math.pi


# Angular and through-slab resolution of the boundary tables of the heart model.
NUM_ANGLES = 256
_SUB_SLABS = 6


def _cavity_profile(u: np.ndarray, cavity_end: float, exponent: float) -> np.ndarray:
  """Squared normalised cavity radius at long-axis coordinate u (0 outside [0, cavity_end])."""
  x = np.clip(u / cavity_end, 0.0, 1.0)
  return np.where((u >= 0) & (u <= cavity_end), 1.0 - x ** exponent, 0.0)


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


def smooth_step(x):
  """Cubic smoothstep 3x^2 - 2x^3 of x clipped to [0, 1]."""
  x = np.clip(x, 0.0, 1.0)
  return x * x * (3.0 - 2.0 * x)


def _window(x, low, high, taper):
  """1 inside [low, high], 0 outside, smooth transitions of width `taper` centred on the ends."""
  return smooth_step((x - low) / taper + 0.5) * smooth_step((high - x) / taper + 0.5)


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


# The last geometry computed, keyed by its parameters without the heart's in-plane position
# (which the boundaries do not depend on): sampling places the heart from its extent and
# rendering draws it, so every subject needs the same tables twice.
_LAST_GEOMETRY: list = [None, None]


def short_axis_geometry(params: SubjectParameters) -> ShortAxisGeometry:
  """The heart's boundaries on the short-axis stack of `params` (see the module docstring).

  The tables are read-only: the last result is reused for parameters that differ only in
  lv_centre_x_mm / lv_centre_y_mm.
  """
  key = repr(dataclasses.replace(params, lv_centre_x_mm=0.0, lv_centre_y_mm=0.0))
  if _LAST_GEOMETRY[0] != key:
    geometry = _compute_short_axis_geometry(params)
    for field in dataclasses.fields(geometry):
      getattr(geometry, field.name).setflags(write=False)
    _LAST_GEOMETRY[:] = [key, geometry]
  return _LAST_GEOMETRY[1]


def _compute_short_axis_geometry(params: SubjectParameters) -> ShortAxisGeometry:
  p = params
  h = p.slice_thickness_mm
  theta = np.arange(NUM_ANGLES) * (_TWO_PI / NUM_ANGLES)
  d_theta = _TWO_PI / NUM_ANGLES
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
  index = np.round(angles / d_theta).astype(int) % NUM_ANGLES
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


def slice_offsets_mm(params: SubjectParameters) -> np.ndarray:
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
  points = points + slice_offsets_mm(params)[:, None, :]
  return points.min(axis=(0, 1)), points.max(axis=(0, 1))
