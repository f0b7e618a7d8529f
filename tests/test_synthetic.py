"""Tests of the synthetic short-axis cine cohort (data_pipelines.synthetic).

One tiny cohort (10 subjects, two per group, small images and few frames) is generated once per
session and read back through the ACDC reader, so the tests check the written files.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os

import nibabel as nib
import numpy as np
import pytest

from cardiac_jax import cardiac
from cardiac_jax import structures
from data_pipelines import acdc
from data_pipelines import synthetic

SEED = 3
NUM_SUBJECTS = 10
RANGES = synthetic.AcquisitionRanges(image_size=(128, 144), spacing_mm=(1.6, 1.8),
                                     num_frames=(14, 16))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synthetic"))
  subjects = synthetic.synthesize_cohort(root, NUM_SUBJECTS, SEED, ranges=RANGES)
  return root, subjects


def _subject_dir(root, params):
  return os.path.join(root, "training", params.subject)


def _labels_4d(root, params):
  path = os.path.join(_subject_dir(root, params), f"{params.subject}_4d_gt.nii.gz")
  return np.asarray(nib.load(path).dataobj)


def _lv_volumes(root, params):
  return synthetic.lv_volume_curve_from_labels(_labels_4d(root, params), params.voxel_spacing_mm)


def _render(seed, index, ranges=RANGES):
  rng = synthetic.subject_generator(seed, index)
  params = synthetic.sample_subject_parameters(
      rng, synthetic.group_of_subject(seed, index), synthetic.subject_name(index, 10), index,
      ranges)
  return (params, *synthetic.render_short_axis(params, rng))


def test_rendering_is_deterministic_per_seed():
  params_a, image_a, labels_a, affine_a = _render(SEED, 4)
  params_b, image_b, labels_b, affine_b = _render(SEED, 4)
  assert params_a == params_b
  np.testing.assert_array_equal(image_a, image_b)
  np.testing.assert_array_equal(labels_a, labels_b)
  np.testing.assert_array_equal(affine_a, affine_b)
  params_c, image_c, _, _ = _render(SEED + 1, 4)
  assert params_c != params_a
  assert image_c.shape != image_a.shape or not np.array_equal(image_c, image_a)


def test_subject_does_not_depend_on_cohort_size(cohort, tmp_path):
  root, subjects = cohort
  small = synthetic.synthesize_cohort(str(tmp_path), 2, SEED, ranges=RANGES)
  for a, b in zip(small, subjects[:2], strict=True):
    for field in dataclasses.fields(a):
      x, y = getattr(a, field.name), getattr(b, field.name)
      assert x == y or (x != x and y != y), field.name   # NaN marks an absent MINF defect
  name = subjects[1].subject
  for suffix in ("_4d.nii.gz", "_4d_gt.nii.gz"):
    a = np.asarray(nib.load(os.path.join(root, "training", name, name + suffix)).dataobj)
    b = np.asarray(nib.load(os.path.join(tmp_path, "training", name, name + suffix)).dataobj)
    np.testing.assert_array_equal(a, b)


def test_groups_are_balanced():
  groups = [synthetic.group_of_subject(SEED, i) for i in range(25)]
  for block in range(5):
    assert sorted(groups[5 * block:5 * block + 5]) == sorted(structures.GROUPS)
  assert groups[:5] != groups[5:10] or groups[5:10] != groups[10:15]


def test_file_layout_and_info_cfg(cohort):
  root, subjects = cohort
  names = sorted(os.listdir(os.path.join(root, "training")))
  assert names == [f"patient{i:03d}" for i in range(1, NUM_SUBJECTS + 1)]
  assert synthetic.subject_name(1234, 5000) == "patient1235"
  for params in subjects:
    directory = _subject_dir(root, params)
    s = params.subject
    expected = {"Info.cfg", f"{s}_4d.nii.gz", f"{s}_4d_gt.nii.gz"}
    for frame in (params.ed_frame, params.es_frame):
      expected |= {f"{s}_frame{frame:02d}.nii.gz", f"{s}_frame{frame:02d}_gt.nii.gz"}
    assert set(os.listdir(directory)) == expected
    info = acdc.parse_info_cfg(os.path.join(directory, "Info.cfg"))
    assert (info.ed_frame, info.es_frame, info.group, info.num_frames) == (
        params.ed_frame, params.es_frame, params.group, params.nb_frame)
    assert 140 <= info.height_cm <= 200 and 35 <= info.weight_kg <= 180
    assert 8 <= params.nz <= 16
  assert collections.Counter(p.group for p in subjects) == {g: 2 for g in structures.GROUPS}


def test_parameters_csv_round_trips(cohort):
  root, subjects = cohort
  rows = synthetic.read_parameters_csv(os.path.join(root, synthetic.PARAMETERS_CSV))
  assert [r.subject for r in rows] == [p.subject for p in subjects]
  for row, params in zip(rows, subjects):
    assert row.group == params.group and row.ed_frame == params.ed_frame
    assert math.isclose(row.lv_edv_ml, params.lv_edv_ml, rel_tol=1e-5)
    assert math.isclose(row.spacing_mm, params.spacing_mm, rel_tol=1e-6)
    assert math.isnan(row.minf_defect_centre_deg) == (params.group != "MINF")


def test_nifti_geometry_and_label_values(cohort):
  root, subjects = cohort
  for params in subjects:
    directory = _subject_dir(root, params)
    cine = nib.load(os.path.join(directory, f"{params.subject}_4d.nii.gz"))
    assert cine.get_data_dtype() == np.int16
    assert cine.shape == (params.nx, params.ny, params.nz, params.nb_frame)
    zooms = cine.header.get_zooms()
    np.testing.assert_allclose(zooms[:3], params.voxel_spacing_mm, rtol=1e-6)
    np.testing.assert_allclose(zooms[3], params.frame_duration_ms, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(cine.affine[:3, :3], axis=0),
                               params.voxel_spacing_mm, rtol=1e-5)
    assert cine.header.get_xyzt_units() == ("mm", "msec")
    subject = acdc.load_subject(directory, load_cine=False)
    np.testing.assert_allclose(subject.spacing_mm, params.voxel_spacing_mm, rtol=1e-6)
    assert set(np.unique(_labels_4d(root, params))) <= {0, 1, 2, 3}
    np.testing.assert_array_equal(subject.ed_labels,
                                  _labels_4d(root, params)[..., params.ed_frame - 1])
  spacings = {p.spacing_mm for p in subjects}
  assert len(spacings) > 1


def test_measured_volumes_follow_targets(cohort):
  root, subjects = cohort
  for params in subjects:
    labels = _labels_4d(root, params)
    ed = cardiac.structure_volumes_ml(labels[..., params.ed_frame - 1], params.voxel_spacing_mm)
    es = cardiac.structure_volumes_ml(labels[..., params.es_frame - 1], params.voxel_spacing_mm)
    assert ed["lv"] == pytest.approx(params.lv_edv_ml, rel=0.05), params.subject
    assert es["lv"] == pytest.approx(params.lv_esv_ml, rel=0.05), params.subject
    assert ed["rv"] == pytest.approx(params.rv_edv_ml, rel=0.05), params.subject
    assert es["rv"] == pytest.approx(params.rv_esv_ml, rel=0.07), params.subject
    # Incompressible myocardium: roughly the same volume at ED and ES.
    assert es["myo"] == pytest.approx(ed["myo"], rel=0.08), params.subject
    if params.group == "RV":
      assert ed["rv"] > ed["lv"]
  ef = collections.defaultdict(list)
  for params in subjects:
    volumes = _lv_volumes(root, params)
    ef[params.group].append(cardiac.ejection_fraction(volumes.max(), volumes.min()))
  assert max(ef["DCM"]) < min(ef["NOR"])
  assert max(ef["MINF"]) < min(ef["NOR"])
  assert min(ef["HCM"]) > max(ef["DCM"])


def test_ed_es_frames_are_volume_extremes(cohort):
  root, subjects = cohort
  for params in subjects:
    volumes = _lv_volumes(root, params)
    assert int(np.argmax(volumes)) + 1 == params.ed_frame, params.subject
    assert int(np.argmin(volumes)) + 1 == params.es_frame, params.subject
    # ES in the first half of the cycle, filling then the atrial kick before the next ED.
    phase = (params.es_frame - params.ed_frame) / params.nb_frame
    assert 0.25 <= phase <= 0.45


def test_shifted_start_puts_ed_at_a_later_frame():
  ranges = dataclasses.replace(RANGES, shifted_start_probability=1.0)
  params, _, labels, _ = _render(SEED, 0, ranges)
  assert params.ed_frame > 1
  volumes = synthetic.lv_volume_curve_from_labels(labels, params.voxel_spacing_mm)
  assert int(np.argmax(volumes)) + 1 == params.ed_frame
  assert int(np.argmin(volumes)) + 1 == params.es_frame


def test_base_to_apex_taper(cohort):
  root, subjects = cohort
  for params in subjects:
    labels = _labels_4d(root, params)[..., params.ed_frame - 1]
    lv_area = np.count_nonzero(labels == structures.LV_BLOOD_POOL, axis=(0, 1))
    rv_area = np.count_nonzero(labels == structures.RV_BLOOD_POOL, axis=(0, 1))
    widest = int(np.argmax(lv_area))
    assert widest <= params.nz // 3, params.subject
    assert np.all(np.diff(lv_area[widest:]) <= 0), params.subject
    assert lv_area[-1] <= 0.05 * lv_area.max(), params.subject
    assert rv_area[-1] == 0 and rv_area[-2] == 0, params.subject


def _sector_wall_thickness_mm(labels, centre, direction, half_width, spacing):
  """Wall thickness (mm) in an angular sector of a slice, from the areas inside it.

  Radii of the endocardium and epicardium follow from the sector's cavity and cavity+wall
  areas, A = r^2 dtheta / 2, which is sub-pixel accurate unlike counting pixels along a ray.
  """
  xs, ys = np.meshgrid(np.arange(labels.shape[0]), np.arange(labels.shape[1]), indexing="ij")
  angle = np.arctan2(ys - centre[1], xs - centre[0])
  inside = np.abs((angle - direction + np.pi) % (2 * np.pi) - np.pi) < half_width
  cavity = np.count_nonzero(inside & (labels == structures.LV_BLOOD_POOL)) * spacing ** 2
  wall = np.count_nonzero(inside & (labels == structures.LV_MYOCARDIUM)) * spacing ** 2
  return math.sqrt((cavity + wall) / half_width) - math.sqrt(cavity / half_width)


def test_minf_defect_is_akinetic_and_thin(cohort):
  root, subjects = cohort
  minf = [p for p in subjects if p.group == "MINF"]
  assert minf
  for params in minf:
    labels = _labels_4d(root, params)
    # A slice in the middle of the scar's long-axis range.
    u_mid = 0.5 * (params.minf_defect_start + min(params.minf_defect_end, 0.75))
    z = params.stack_top_mm + params.slice_thickness_mm * (np.arange(params.nz) + 0.5)
    k = int(np.argmin(np.abs(z - u_mid * params.lv_length_mm)))
    ed, es = labels[:, :, k, params.ed_frame - 1], labels[:, :, k, params.es_frame - 1]
    centre = np.argwhere(ed == structures.LV_BLOOD_POOL).mean(axis=0)
    # Image angles are measured from +X towards +Y, like the parameters'.
    scar = math.radians(params.lv_rv_axis_deg + params.minf_defect_centre_deg)
    half = math.radians(params.minf_defect_width_deg / 2.0 - 12.0)

    def thickening(direction):
      t_ed = _sector_wall_thickness_mm(ed, centre, direction, half, params.spacing_mm)
      t_es = _sector_wall_thickness_mm(es, centre, direction, half, params.spacing_mm)
      return t_ed, t_es / t_ed

    scar_ed, scar_thickening = thickening(scar)
    remote_ed, remote_thickening = thickening(scar + math.pi)
    assert scar_ed < 0.8 * remote_ed, params.subject
    assert scar_thickening < 1.08, params.subject
    assert remote_thickening > scar_thickening + 0.1, params.subject


def test_blood_pool_brighter_than_myocardium(cohort):
  root, subjects = cohort
  for params in subjects:
    subject = acdc.load_subject(_subject_dir(root, params))
    image, labels = subject.ed_image, subject.ed_labels
    lv = np.median(image[labels == structures.LV_BLOOD_POOL])
    rv = np.median(image[labels == structures.RV_BLOOD_POOL])
    myo = np.median(image[labels == structures.LV_MYOCARDIUM])
    assert lv > 1.8 * myo and rv > 1.8 * myo, params.subject
    assert image.min() >= 0
    # Rician noise: the darkest voxels (air, lungs) are above zero but far below the blood.
    assert 0 < np.percentile(image, 1) < 0.2 * lv


def test_cohort_is_idempotent_and_repairs_incomplete_subjects(cohort, tmp_path):
  root = str(tmp_path)
  synthetic.synthesize_cohort(root, 2, SEED, ranges=RANGES)
  name = synthetic.subject_name(0, 2)
  cine = os.path.join(root, "training", name, f"{name}_4d.nii.gz")
  first_mtime = os.stat(cine).st_mtime_ns
  other = os.path.join(root, "training", "patient002", "patient002_4d_gt.nii.gz")
  os.remove(other)
  synthetic.synthesize_cohort(root, 2, SEED, ranges=RANGES)
  assert os.stat(cine).st_mtime_ns == first_mtime
  assert os.path.isfile(other)
  assert not os.path.exists(os.path.join(root, ".staging"))


def test_bad_inputs_raise_clear_errors():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="unknown group"):
    synthetic.sample_subject_parameters(rng, "XYZ", "patient001")
  tiny = synthetic.AcquisitionRanges(image_size=(40, 40), spacing_mm=(1.2, 1.2))
  with pytest.raises(ValueError, match="field of view"):
    synthetic.sample_subject_parameters(rng, "RV", "patient001", 0, tiny)
  with pytest.raises(ValueError, match="num_frames"):
    synthetic.AcquisitionRanges(num_frames=(4, 6))
