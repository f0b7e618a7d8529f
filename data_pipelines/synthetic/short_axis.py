"""Short-axis rendering: the images, labels and affine of a subject's cine stack.

- Image formation: partial volume (in-plane antialiasing with edge ramps one pixel wide, widened
  by the through-slab variation of each boundary), thorax with subcutaneous fat, chest-wall
  muscle, lungs with vessels, liver, stomach, spine and descending aorta with smooth filtered
  noise texture, a smooth multiplicative coil sensitivity (bias) field, Rician noise (magnitude
  of complex Gaussian noise), a random global intensity scale and int16 storage.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from cardiac_jax import structures
from data_pipelines.synthetic.geometry import (IMAGE_BOUNDARIES, NUM_ANGLES, heart_extent_mm,
                                               short_axis_geometry, slice_offsets_mm)
from data_pipelines.synthetic.parameters import SubjectParameters

_TWO_PI = 2.0 * math.pi


_NOISE_BLOCK_VOXELS = 1 << 19


def ramp(distance, width):
  """Partial-volume coverage of a boundary at signed distance (inside > 0) with edge width."""
  return np.clip(0.5 + distance / width, 0.0, 1.0)


def ellipse_coverage(x, y, cx, cy, ax, ay, pixel):
  """Partial-volume coverage of an axis-aligned ellipse (first-order signed distance)."""
  dx, dy = (x - cx) / ax, (y - cy) / ay
  q = np.sqrt(dx * dx + dy * dy) + 1e-9
  gradient = np.sqrt((dx / ax) ** 2 + (dy / ay) ** 2) / q + 1e-9
  return ramp((1.0 - q) / gradient, pixel)


def smooth_noise(rng: np.random.Generator, shape, correlation_px: float) -> np.ndarray:
  """Zero-mean, unit-variance smooth random texture of `shape` (X, Y, Z), smooth in-plane."""
  step = max(1, int(correlation_px // 2))
  coarse = rng.standard_normal((shape[0] // step + 3, shape[1] // step + 3, shape[2]))
  coarse = ndimage.gaussian_filter(coarse, (1.0, 1.0, 0.0), mode="wrap")
  fine = ndimage.zoom(coarse, (step, step, 1), order=1)[:shape[0], :shape[1]]
  return ((fine - fine.mean()) / (fine.std() + 1e-9)).astype(np.float32)


def render_thorax(params: SubjectParameters, rng: np.random.Generator, x: np.ndarray,
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

  texture = smooth_noise(rng, (len(x), len(y), nz), 6.0 / pixel)
  fine = smooth_noise(rng, (len(x), len(y), nz), 2.5 / pixel)
  body = ellipse_coverage(pp, qq, 0, 0, half_w, half_d, pixel)
  inner = ellipse_coverage(pp, qq, 0, 0, half_w - fat, half_d - fat, pixel)
  cavity = ellipse_coverage(pp, qq, 0, -8.0, half_w - fat - muscle, half_d - fat - muscle - 8,
                            pixel)
  image = body * p.fat_contrast * (1.0 + 0.12 * fine)
  image += inner * (0.30 * (1.0 + 0.08 * texture) - image)
  # Inside the rib cage: mediastinal soft tissue and fat.
  image += cavity * (0.45 * (1.0 + 0.15 * fine) - image)

  # Lungs shrink towards the apex as the diaphragm rises; the liver and stomach come in.
  lung_scale = 1.0 - 0.35 * level
  lung_r = ellipse_coverage(pp, qq, -0.48 * half_w, -5.0, 0.44 * half_w * lung_scale,
                            0.78 * half_d * lung_scale, pixel)
  lung_l = ellipse_coverage(pp, qq, 0.55 * half_w, 8.0, 0.36 * half_w * lung_scale,
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

  liver = ellipse_coverage(pp, qq, -0.25 * half_w, half_d * (1.25 - 0.85 * level),
                           0.62 * half_w, 0.75 * half_d, pixel) * inner
  image += liver * (p.liver_contrast * (1.0 + 0.08 * texture) - image)
  stomach_size = np.clip((level - 0.4) / 0.6, 0.0, 1.0)
  stomach = ellipse_coverage(pp, qq, 0.42 * half_w, 0.35 * half_d, 35.0 * stomach_size + 1e-3,
                             28.0 * stomach_size + 1e-3, pixel) * inner
  image += stomach * (0.6 * (1.0 + 0.1 * fine) - image)

  # Spine (marrow, cortex, canal), paraspinal muscles and the descending aorta.
  spine_q = half_d - fat - 48.0
  for side in (-1.0, 1.0):
    para = ellipse_coverage(pp, qq, side * 32.0, spine_q + 28.0, 24.0, 17.0, pixel)
    image += para * (0.3 * (1.0 + 0.08 * texture) - image)
  cortex = ellipse_coverage(pp, qq, 0.0, spine_q, 19.0, 17.0, pixel)
  image += cortex * (0.12 - image)
  marrow = ellipse_coverage(pp, qq, 0.0, spine_q, 16.5, 14.5, pixel)
  image += marrow * (0.5 * (1.0 + 0.1 * fine) - image)
  canal = ellipse_coverage(pp, qq, 0.0, spine_q + 27.0, 7.0, 6.0, pixel)
  image += canal * (0.8 - image)
  aorta = ellipse_coverage(pp, qq, 24.0, spine_q - 24.0, 12.0, 12.0, pixel)
  image += aorta * (0.9 - image)
  # Point-spread function of the acquisition.
  return ndimage.gaussian_filter(image.astype(np.float32), (0.5, 0.5, 0.0))


def bias_field(params: SubjectParameters, x: np.ndarray, y: np.ndarray) -> np.ndarray:
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


def rician_magnitude(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> None:
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
  thorax = render_thorax(p, rng, x, y)

  # The heart is rendered only in a box around it, for all slabs and frames at once: (Z, T, P).
  low, high = heart_extent_mm(p, geometry)
  x0 = max(int(np.searchsorted(x, low[0] - 2 * pixel)) - 1, 0)
  x1 = min(int(np.searchsorted(x, high[0] + 2 * pixel)) + 1, p.nx)
  y0 = max(int(np.searchsorted(y, low[1] - 2 * pixel)) - 1, 0)
  y1 = min(int(np.searchsorted(y, high[1] + 2 * pixel)) + 1, p.ny)
  offsets = slice_offsets_mm(p)
  shape = (p.nz, x1 - x0, y1 - y0)
  rx = np.broadcast_to(x[None, x0:x1, None] - offsets[:, 0, None, None], shape)
  ry = np.broadcast_to(y[None, None, y0:y1] - offsets[:, 1, None, None], shape)
  rx = rx.reshape(p.nz, 1, -1).astype(np.float32)              # (Z, 1, P)
  ry = ry.reshape(p.nz, 1, -1).astype(np.float32)
  rho = np.sqrt(rx * rx + ry * ry)
  angle_index = (np.round(np.arctan2(ry, rx) * (NUM_ANGLES / _TWO_PI)).astype(np.intp)
                 % NUM_ANGLES)
  # One flat index into any (Z, T, A) table gives its value at every (slab, frame, pixel).
  rows = (np.arange(p.nz)[:, None] * p.nb_frame + np.arange(p.nb_frame)[None, :]) * NUM_ANGLES
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
  gain = bias_field(p, x, y) * np.float32(p.intensity_scale)
  heart *= np.ascontiguousarray(gain[x0:x1, y0:y1].reshape(-1, p.nz).T)[:, None, :]
  image = np.repeat((thorax * gain)[..., None], p.nb_frame, axis=3)
  labels = np.zeros(image.shape, np.uint8)
  box = (x1 - x0, y1 - y0)
  image[x0:x1, y0:y1] = heart.reshape(p.nz, p.nb_frame, *box).transpose(2, 3, 0, 1)
  labels[x0:x1, y0:y1] = heart_labels.reshape(p.nz, p.nb_frame, *box).transpose(2, 3, 0, 1)

  # Rician noise, in blocks of X rows so the temporaries stay in cache.
  rows = max(1, _NOISE_BLOCK_VOXELS // (p.ny * p.nz * p.nb_frame))
  for start in range(0, p.nx, rows):
    rician_magnitude(image[start:start + rows], p.noise_level * p.intensity_scale, rng)
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
