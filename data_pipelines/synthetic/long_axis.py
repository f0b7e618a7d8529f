"""Long-axis 4-chamber view of the same heart as the short-axis stack.

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
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from cardiac_jax import structures
from data_pipelines.synthetic.geometry import (IMAGE_BOUNDARIES, NUM_ANGLES, short_axis_geometry,
                                               smooth_step)
from data_pipelines.synthetic.parameters import SubjectParameters
from data_pipelines.synthetic.sampling import uniform
from data_pipelines.synthetic.short_axis import (bias_field, ellipse_coverage, ramp, render_thorax,
                                                 rician_magnitude, short_axis_affine, smooth_noise)

_TWO_PI = 2.0 * math.pi


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
      slice_thickness_mm=round(uniform(rng, (6.0, 8.0)) * 2.0) / 2.0,
      apex_angle_deg=uniform(rng, (35, 60)), scene_rotation_deg=uniform(rng, (-20, 20)),
      heart_offset_x_mm=uniform(rng, (-12, 12)), heart_offset_y_mm=uniform(rng, (-12, 12)),
      la_min_ml=uniform(rng, (20, 32)) * uniform(rng, la_scale),
      la_reservoir_fraction=uniform(rng, (0.3, 0.45)),
      ra_min_ml=uniform(rng, (20, 32)) * uniform(rng, ra_scale),
      ra_reservoir_fraction=uniform(rng, (0.25, 0.4)),
      atrial_wall_mm=uniform(rng, (1.8, 2.6)),
      atrial_blood_contrast=uniform(rng, (0.9, 1.0)),
      leaflet_thickness_mm=uniform(rng, (1.2, 1.8)),
      coil_rotation_deg=uniform(rng, (0, 360)))


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
  sides = np.round(math.radians(p.lv_rv_axis_deg) / (_TWO_PI / NUM_ANGLES)).astype(int)
  sides = np.array([sides, sides + NUM_ANGLES // 2]) % NUM_ANGLES
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
  opening = smooth_step((phase - p.es_phase) / 0.05) * smooth_step((1.0 - phase) / 0.03)
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
  return ramp(0.5 * thickness - distance, pixel)


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
  thorax = render_thorax(plane, rng, x, y)[..., 0]
  liver_centre = (origin + (low[0] - 35.0) * apex + (high[1] + 25.0) * septal)
  texture = smooth_noise(rng, (view.nx, view.ny, 1), 6.0 / pixel)[..., 0]
  liver = ellipse_coverage(x[:, None], y[None, :], liver_centre[0], liver_centre[1], 75.0,
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
  below_valve = ramp(s - geometry.base[:, None], pixel)
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
      return (ramp((half_width - radial) / np.sqrt(1.0 + slope * slope), pixel) * tip
              * below_valve)

    def ellipsoid(centre, axes, grow=0.0):
      k = np.sqrt(np.clip(1.0 - (v / axes[:, 1]) ** 2, 0.0, None))[:, None]
      return ellipse_coverage(s, w, centre[:, None, 0], centre[:, None, 1],
                              axes[:, None, 0] * k + grow + 1e-3,
                              axes[:, None, 1] * k + grow + 1e-3, pixel)

    above_valve = 1.0 - below_valve
    la_side = ramp(geometry.septum_w - w, pixel)
    layer = surround + cover("fat_outer") * (fat - surround)
    # Atrial walls with a thin layer of fat, then the atrial blood pools, split by the septum.
    wall_grow = view.atrial_wall_mm
    for centre, axes in ((geometry.la_centre, geometry.la_axes),
                         (geometry.ra_centre, geometry.ra_axes)):
      layer += ellipsoid(centre, axes, wall_grow + 1.5) * above_valve * (fat - layer)
    for centre, axes in ((geometry.la_centre, geometry.la_axes),
                         (geometry.ra_centre, geometry.ra_axes)):
      layer += ellipsoid(centre, axes, wall_grow) * above_valve * (myocardium - layer)
    septum = ramp(0.5 * wall_grow - np.abs(w - geometry.septum_w), pixel)
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

  gain = bias_field(plane, x, y)[..., 0] * np.float32(p.intensity_scale)
  image = np.repeat((thorax * gain)[..., None], num_frames, axis=-1).astype(np.float32)
  flat = image.reshape(-1, num_frames)
  flat[where] = (heart * gain.reshape(-1)[where][None, :]).T
  labels = np.zeros(image.shape, np.uint8)
  labels.reshape(-1, num_frames)[where] = labels_heart.T
  rician_magnitude(image, p.noise_level * p.intensity_scale, rng)
  affine = long_axis_affine(p, view, origin)
  return image[:, :, None, :], labels[:, :, None, :], affine
