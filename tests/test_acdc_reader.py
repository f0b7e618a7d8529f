"""Tests of the ACDC-layout reader on a tiny cohort written here with nibabel.

`write_subject` (also used by test_prepare.py) writes a phantom heart: per slice an LV blood
pool disc inside a myocardial ring and an RV disc beside it, larger towards slice 1 (the base).
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest

from cardiac_jax import structures
from data_pipelines import acdc
from data_pipelines.errors import InvalidInputError

SHAPE = (48, 44, 6)
SPACING = (1.5, 1.6, 8.0)
# LV blood-pool radius (mm) per slice at ED; 0 = no heart. Slice 1 is the base.
ED_RADII_MM = (0.0, 15.0, 13.0, 11.0, 8.0, 0.0)
ES_SCALE = 0.7
WALL_MM = 7.0
# RV radius per mm of LV blood-pool radius, so the RV shrinks from ED to ES as well.
RV_PER_LV_RADIUS = 0.75


def phantom_labels(lv_radii_mm, shape=SHAPE, spacing=SPACING, lv_centre_px=(22.0, 24.0),
                   rv_offset_mm=(4.0, -26.0), wall_mm=WALL_MM,
                   rv_per_lv_radius=RV_PER_LV_RADIUS) -> np.ndarray:
  """(X, Y, Z) canonical labels of the phantom; RV centre at LV centre + rv_offset_mm."""
  rows, cols = np.mgrid[:shape[0], :shape[1]].astype(float)
  dist_lv = np.hypot((rows - lv_centre_px[0]) * spacing[0], (cols - lv_centre_px[1]) * spacing[1])
  rv_row = lv_centre_px[0] + rv_offset_mm[0] / spacing[0]
  rv_col = lv_centre_px[1] + rv_offset_mm[1] / spacing[1]
  dist_rv = np.hypot((rows - rv_row) * spacing[0], (cols - rv_col) * spacing[1])
  labels = np.zeros(shape, np.uint8)
  for z, radius in enumerate(lv_radii_mm):
    if radius <= 0:
      continue
    plane = labels[:, :, z]
    plane[dist_rv < rv_per_lv_radius * radius] = structures.RV_BLOOD_POOL
    plane[dist_lv < radius + wall_mm] = structures.LV_MYOCARDIUM
    plane[dist_lv < radius] = structures.LV_BLOOD_POOL
  return labels


def phantom_image(labels: np.ndarray, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  intensity = np.array([30.0, 200.0, 90.0, 220.0])
  return (intensity[labels] + rng.normal(0, 5, labels.shape)).astype(np.float32)


def _to_convention(labels: np.ndarray, convention: str) -> np.ndarray:
  source = structures.LABEL_CONVENTIONS[convention]
  canonical_to_name = {structures.RV_BLOOD_POOL: "rv", structures.LV_MYOCARDIUM: "myo",
                       structures.LV_BLOOD_POOL: "lv"}
  out = np.zeros_like(labels)
  for value, name in canonical_to_name.items():
    out[labels == value] = source[name]
  return out


def save_nifti(path: str, data: np.ndarray, spacing=SPACING) -> None:
  image = nib.Nifti1Image(data, np.diag([*spacing[:3], 1.0]))
  image.header.set_zooms(tuple(spacing[:3]) + tuple(1.0 for _ in data.shape[3:]))
  nib.save(image, path)


def write_subject(root: str, subject: str, *, group: str = "NOR", ed: int = 1, es: int = 4,
                  num_frames: int = 6, partition: str = "training", seed: int = 0,
                  label_convention: str = "acdc", ed_radii_mm=ED_RADII_MM,
                  spacing=SPACING, write_cine: bool = False) -> str:
  """Writes one ACDC-layout subject folder; returns its path."""
  directory = os.path.join(root, partition, subject)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "Info.cfg"), "w") as f:
    f.write(f"ED: {ed}\nES: {es}\nGroup: {group}\nHeight: 172.0\nNbFrame: {num_frames}\n"
            f"Weight: 70.5\n")
  ed_labels = phantom_labels(ed_radii_mm, spacing=spacing)
  es_labels = phantom_labels(tuple(r * ES_SCALE for r in ed_radii_mm), spacing=spacing)
  frames = {}
  for frame, labels in ((ed, ed_labels), (es, es_labels)):
    image = phantom_image(labels, seed + frame)
    frames[frame] = image
    save_nifti(os.path.join(directory, f"{subject}_frame{frame:02d}.nii.gz"), image, spacing)
    save_nifti(os.path.join(directory, f"{subject}_frame{frame:02d}_gt.nii.gz"),
               _to_convention(labels, label_convention), spacing)
  if write_cine:
    cine = np.stack([frames.get(t + 1, frames[ed]) for t in range(num_frames)], axis=-1)
    save_nifti(os.path.join(directory, f"{subject}_4d.nii.gz"), cine, spacing)
  return directory


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("acdc"))
  write_subject(root, "patient001", group="DCM", ed=1, es=4, write_cine=True)
  write_subject(root, "patient090", group="MINF", ed=4, es=2, num_frames=8, seed=1)
  write_subject(root, "patient101", group="HCM", partition="testing", seed=2,
                label_convention="ukbb")
  return root


def test_list_subjects_finds_both_partitions(cohort):
  refs = acdc.list_subjects(cohort)
  assert [(r.partition, r.subject) for r in refs] == [
      ("training", "patient001"), ("training", "patient090"), ("testing", "patient101")]


def test_list_subjects_rejects_empty_root(tmp_path):
  with pytest.raises(InvalidInputError, match="no patientXXX"):
    acdc.list_subjects(str(tmp_path))


def test_load_subject_reads_frames_from_info_cfg(cohort):
  refs = {r.subject: r for r in acdc.list_subjects(cohort)}
  subject = acdc.load_subject(refs["patient090"])
  assert subject.info == acdc.SubjectInfo(ed_frame=4, es_frame=2, group="MINF", num_frames=8,
                                          height_cm=172.0, weight_kg=70.5)
  assert subject.ed_image.shape == SHAPE and subject.ed_image.dtype == np.float32
  assert subject.spacing_mm == pytest.approx(SPACING)
  np.testing.assert_array_equal(subject.ed_labels, phantom_labels(ED_RADII_MM))
  np.testing.assert_array_equal(
      subject.es_labels, phantom_labels(tuple(r * ES_SCALE for r in ED_RADII_MM)))
  # The ED image is the one written for frame 4: its LV blood pool is bright.
  assert subject.ed_image[subject.ed_labels == structures.LV_BLOOD_POOL].mean() > 200
  assert subject.cine is None


def test_load_subject_with_cine(cohort):
  subject = acdc.load_subject(os.path.join(cohort, "training", "patient001"), load_cine=True)
  assert subject.cine.shape == (*SHAPE, 6)
  np.testing.assert_allclose(subject.cine[..., 0], subject.ed_image)
  np.testing.assert_allclose(subject.cine[..., 3], subject.es_image)


def test_label_convention_is_remapped(cohort):
  directory = os.path.join(cohort, "testing", "patient101")
  subject = acdc.load_subject(directory, label_convention="ukbb")
  np.testing.assert_array_equal(subject.ed_labels, phantom_labels(ED_RADII_MM))
  # Read as "acdc", the ukbb LV (value 1) would be taken for the RV: the parameter matters.
  wrong = acdc.load_subject(directory, label_convention="acdc")
  np.testing.assert_array_equal(wrong.ed_labels == structures.RV_BLOOD_POOL,
                                subject.ed_labels == structures.LV_BLOOD_POOL)


@pytest.mark.parametrize("content, message", [
    ("ED: 1\nES: 4\nGroup: NOR\nHeight: 170\nNbFrame: 6\n", "lacks Weight"),
    ("ED: one\nES: 4\nGroup: NOR\nHeight: 170\nNbFrame: 6\nWeight: 60\n", "ED is not a number"),
    ("ED: 1\nES: 9\nGroup: NOR\nHeight: 170\nNbFrame: 6\nWeight: 60\n", "exceeds NbFrame"),
    ("ED: 1\nES: 4\nGroup: XYZ\nHeight: 170\nNbFrame: 6\nWeight: 60\n", "unknown Group"),
    ("ED 1\n", "not 'key: value'"),
])
def test_malformed_info_cfg_names_the_file(tmp_path, content, message):
  path = tmp_path / "Info.cfg"
  path.write_text(content)
  with pytest.raises(InvalidInputError, match=message) as error:
    acdc.parse_info_cfg(str(path))
  assert str(path) in str(error.value)


def test_info_cfg_accepts_arv_alias(tmp_path):
  path = tmp_path / "Info.cfg"
  path.write_text("ED: 1\nES: 4\nGroup: ARV\nHeight: 170\nNbFrame: 6\nWeight: 60\n")
  assert acdc.parse_info_cfg(str(path)).group == "RV"


def test_missing_info_cfg_and_frame(tmp_path):
  directory = write_subject(str(tmp_path), "patient002")
  os.remove(os.path.join(directory, "patient002_frame04_gt.nii.gz"))
  with pytest.raises(InvalidInputError, match=r"patient002_frame04_gt\.nii\.gz: file is missing"):
    acdc.load_subject(directory)
  os.remove(os.path.join(directory, "Info.cfg"))
  with pytest.raises(InvalidInputError, match=r"Info\.cfg: Info\.cfg is missing"):
    acdc.load_subject(directory)


def test_corrupt_nifti_names_the_file(tmp_path):
  directory = write_subject(str(tmp_path), "patient003")
  path = os.path.join(directory, "patient003_frame01.nii.gz")
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(InvalidInputError, match="patient003_frame01.nii.gz: cannot read NIfTI"):
    acdc.load_subject(directory)
  with open(path, "wb") as f:
    f.write(b"this is not gzip at all" * 20)
  with pytest.raises(InvalidInputError, match="patient003_frame01.nii.gz: cannot read NIfTI"):
    acdc.load_subject(directory)


def test_bad_labels_nan_and_shape_mismatch(tmp_path):
  directory = write_subject(str(tmp_path), "patient004")
  gt = os.path.join(directory, "patient004_frame01_gt.nii.gz")
  labels = phantom_labels(ED_RADII_MM)
  labels[0, 0, 0] = 7
  save_nifti(gt, labels)
  with pytest.raises(InvalidInputError, match=r"frame01_gt.nii.gz: label values \[7\]"):
    acdc.load_subject(directory)
  save_nifti(gt, phantom_labels(ED_RADII_MM)[:40])
  with pytest.raises(InvalidInputError, match="does not match image"):
    acdc.load_subject(directory)
  save_nifti(gt, phantom_labels(ED_RADII_MM))
  image = phantom_image(phantom_labels(ED_RADII_MM), 0)
  image[3, 3, 3] = np.nan
  save_nifti(os.path.join(directory, "patient004_frame01.nii.gz"), image)
  with pytest.raises(InvalidInputError, match="frame01.nii.gz: 1 voxels are NaN"):
    acdc.load_subject(directory)
