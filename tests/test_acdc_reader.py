"""Tests of the ACDC-layout reader on a tiny cohort written here with nibabel.

`write_subject` (also used by test_prepare.py) writes a phantom heart: per slice an LV blood
pool disc inside a myocardial ring and an RV disc beside it, larger towards slice 1 (the base).
"""

from __future__ import annotations

import io
import os

import nibabel as nib
import numpy as np
import pytest

from cardiac_jax import structures
from data_pipelines import acdc
from data_pipelines import nifti
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


# ----------------------------------------------------------------------------- hostile input

def _info(path, text: bytes | str) -> str:
  with open(path, "wb") as f:
    f.write(text.encode() if isinstance(text, str) else text)
  return str(path)


_GOOD_INFO = "ED: 1\nES: 4\nGroup: NOR\nHeight: 170\nNbFrame: 6\nWeight: 60\n"


@pytest.mark.parametrize("content, message", [
    (_GOOD_INFO + "ED: 2\n", r"key 'ED' appears twice \(lines 1 and 7\)"),
    (b"ED: 1\nES: 4\xff\xfe\nGroup: NOR\n", r"not UTF-8 text \(byte 0xff at offset 11\)"),
    (b"\x00\x01\x02garbage\x7f" * 10, r"holds binary data \(control character 0x00\)"),
    (_GOOD_INFO.replace("ED: 1", "ED: 0"), "ED must be positive"),
    (_GOOD_INFO.replace("ED: 1", "ED: -3"), "ED must be positive"),
    (_GOOD_INFO.replace("ED: 1", "ED: 1e400"), "ED must be positive and finite"),
    (_GOOD_INFO.replace("Height: 170", "Height: nan"), "Height must be positive and finite"),
    (_GOOD_INFO.replace("ED: 1", "ED: 1.5"), "ED is not an integer"),
    (_GOOD_INFO.replace("Weight: 60", "Weight: sixty"), "Weight is not a number"),
    (_GOOD_INFO.replace("ED: 1", "ED: 4"), r"ED and ES are the same frame \(4\)"),
    ("ED: 1\nES: 1\nGroup: NOR\nHeight: 170\nNbFrame: 1\nWeight: 60\n", "NbFrame is 1"),
    ("", "lacks ED, ES, Group, NbFrame, Height, Weight"),
    ("x" * (acdc.MAX_INFO_CFG_BYTES + 10), "larger than 65536 bytes"),
])
def test_hostile_info_cfg_names_file_and_problem(tmp_path, content, message):
  path = _info(tmp_path / "Info.cfg", content)
  with pytest.raises(InvalidInputError, match=message) as error:
    acdc.parse_info_cfg(path)
  assert str(error.value).startswith(f"{path}: ")


def test_info_cfg_tolerates_bom_crlf_and_extra_keys(tmp_path):
  path = _info(tmp_path / "Info.cfg", ("\ufeff" + _GOOD_INFO + "Comment: fine\n")
               .replace("\n", "\r\n"))
  assert acdc.parse_info_cfg(path) == acdc.SubjectInfo(1, 4, "NOR", 6, 170.0, 60.0)


def test_info_cfg_that_is_a_fifo_does_not_block(tmp_path):
  path = str(tmp_path / "Info.cfg")
  os.mkfifo(path)
  with pytest.raises(InvalidInputError, match="Info.cfg is not a regular file"):
    acdc.parse_info_cfg(path)


def save_header_nifti(path: str, data: np.ndarray, *, affine=None, pixdim=None,
                      qform_code: int = 1, sform_code: int = 1, **fields) -> None:
  """Writes `data` (gzipped) with full control of the header: the sform `affine` (also the
  qform when qform_code is not 0), then raw `pixdim` and other header `fields` patched into the
  bytes, so values nibabel would refuse to write (NaN, unknown codes) reach the file as given."""
  import gzip
  affine = np.diag([*SPACING, 1.0]) if affine is None else np.asarray(affine, float)
  valid = bool(np.all(np.isfinite(affine)) and abs(np.linalg.det(affine[:3, :3])) > 0)
  nib.save(nib.Nifti1Image(data, affine if valid else np.diag([*SPACING, 1.0])), path)
  with gzip.open(path, "rb") as f:
    raw = bytearray(f.read())
  # nibabel rewrites the transforms from the image affine on save: set them in the bytes.
  header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw[:348])), check=False)
  header.set_sform(affine, code=sform_code)
  header.set_qform(affine if qform_code else None, code=qform_code)
  if pixdim is not None:
    header["pixdim"][1:1 + len(pixdim)] = pixdim
  for key, value in fields.items():
    header[key] = value
  raw[:348] = header.binaryblock
  with gzip.open(path, "wb") as f:
    f.write(bytes(raw))


@pytest.mark.parametrize("make, message", [
    (lambda p: nib.save(nib.Nifti1Image(np.zeros((4, 5), np.float32), np.eye(4)), p),
     r"expected a 3D or 4D volume, got shape \(4, 5\)"),
    (lambda p: save_nifti(p, np.zeros((4, 5, 3, 2, 2), np.float32)),
     r"expected a 3D or 4D volume, got shape \(4, 5, 3, 2, 2\)"),
    (lambda p: save_nifti(p, np.zeros((4, 0, 3), np.float32)), "has an empty axis"),
    (lambda p: save_nifti(p, np.zeros((4, 5, 3), np.complex64)), "not a real number type"),
    (lambda p: save_header_nifti(p, np.ones((4, 5, 3), np.float32), pixdim=(1.0, np.nan, 8.0)),
     r"voxel spacing \(pixdim\) \(1.0, nan, 8.0\) is not positive"),
    (lambda p: save_header_nifti(p, np.ones((4, 5, 3), np.float32), pixdim=(1.0, 0.0, 8.0)),
     "is not positive and finite"),
    (lambda p: save_header_nifti(p, np.ones((4, 5, 3), np.float32), pixdim=(-1.0, 1.0, 8.0)),
     "is not positive and finite"),
    (lambda p: save_header_nifti(p, np.ones((4, 5, 3), np.float32),
                                 affine=np.diag([1.0, 1.0, 0.0, 1.0]), qform_code=0),
     "affine .* is singular"),
    (lambda p: save_header_nifti(p, np.ones((4, 5, 3), np.float32),
                                 affine=np.full((4, 4), np.nan), qform_code=0),
     "affine .* holds NaN or infinite"),
    (lambda p: save_header_nifti(p, np.full((4, 5, 3), 100, np.int16), scl_slope=1e37,
                                 scl_inter=0.0),
     "voxels are NaN or infinite"),
    (lambda p: save_header_nifti(p, np.ones((4, 5, 3), np.float32), magic=b"ni1"),
     r"not that of a single file"),
    (lambda p: save_header_nifti(p, np.ones((4, 5, 3), np.float32), vox_offset=np.nan),
     "vox_offset nan does not point past the header"),
    (lambda p: save_header_nifti(p, np.ones((4, 5, 3), np.float32), datatype=1234),
     "header is corrupt"),
])
def test_hostile_nifti_names_file_and_problem(tmp_path, make, message):
  path = str(tmp_path / "volume.nii.gz")
  make(path)
  with pytest.raises(InvalidInputError, match=message) as error:
    nifti.load_nifti(path)
  assert str(error.value).startswith(f"{path}: ")


def test_nifti_header_declaring_huge_volume_fails_fast(tmp_path):
  path = str(tmp_path / "huge.nii.gz")
  dims = np.array([4, 30000, 30000, 30000, 30000, 1, 1, 1], np.int16)
  save_header_nifti(path, np.ones((4, 5, 3), np.float32), dim=dims)
  with pytest.raises(InvalidInputError, match="more than the 536870912 accepted"):
    nifti.load_nifti(path)
  # Within the voxel limit, but 4 GiB of float64 (the float32 copy 2 GiB more): refused from
  # the header before anything is inflated, not found truncated after inflating what is there.
  save_header_nifti(path, np.ones((4, 5, 3), np.float64),
                    dim=np.array([3, 2048, 2048, 128, 1, 1, 1, 1], np.int16))
  with pytest.raises(InvalidInputError, match=r"header declares \(2048, 2048, 128\) voxels of "
                                              r"float64, 4294967296 bytes once decoded, more "
                                              r"than the 1073741824 bytes"):
    nifti.read_nifti_header(path)
  # Within both limits but far more than the file holds: truncation, found without allocating.
  save_header_nifti(path, np.ones((4, 5, 3), np.float32),
                    dim=np.array([3, 400, 400, 400, 1, 1, 1, 1], np.int16))
  with pytest.raises(InvalidInputError, match="the file is truncated: the header declares "
                                              "256000000 bytes"):
    nifti.load_nifti(path)


def test_gzip_bomb_and_corrupt_stream(tmp_path):
  import gzip
  path = str(tmp_path / "bomb.nii.gz")
  save_nifti(path, np.ones((4, 5, 3), np.float32))
  with gzip.open(path, "rb") as f:
    raw = f.read()
  with gzip.open(path, "wb") as f:
    f.write(raw + bytes(64 * 1024 * 1024))       # 64 MiB of zeros past the declared voxels
  with pytest.raises(InvalidInputError, match="decompresses to more data than its header"):
    nifti.load_nifti(path)
  save_nifti(path, np.random.default_rng(0).normal(size=(20, 20, 10)).astype(np.float32))
  with open(path, "rb") as f:
    compressed = bytearray(f.read())
  compressed[len(compressed) // 2] ^= 0xFF
  with open(path, "wb") as f:
    f.write(bytes(compressed))
  with pytest.raises(InvalidInputError, match="cannot read NIfTI, the gzip stream is corrupt"):
    nifti.load_nifti(path)
  # Uncompressed NIfTI cut short.
  plain = str(tmp_path / "plain.nii")
  save_nifti(plain, np.ones((10, 10, 10), np.float32))
  with open(plain, "r+b") as f:
    f.truncate(352 + 100)
  with pytest.raises(InvalidInputError, match="the file is truncated: the header declares 4000"):
    nifti.load_nifti(plain)
  fifo = str(tmp_path / "fifo.nii.gz")
  os.mkfifo(fifo)
  with pytest.raises(InvalidInputError, match="is not a regular file"):
    nifti.load_nifti(fifo)


def test_nifti_multimember_gzip_and_nifti2_are_read(tmp_path):
  import gzip
  data = np.arange(60, dtype=np.int16).reshape(4, 5, 3)
  path = str(tmp_path / "one.nii.gz")
  save_nifti(path, data)
  with gzip.open(path, "rb") as f:
    raw = f.read()
  with open(path, "wb") as f:
    f.write(gzip.compress(raw[:500]) + gzip.compress(raw[500:]))
  loaded, spacing = nifti.load_nifti(path)
  np.testing.assert_array_equal(loaded, data)
  assert spacing == pytest.approx(SPACING)
  path2 = str(tmp_path / "two.nii")
  nib.save(nib.Nifti2Image(data.astype(np.float64), np.diag([*SPACING, 1.0])), path2)
  np.testing.assert_array_equal(nifti.load_nifti(path2)[0], data)


def test_grid_mismatches_say_which_and_how(tmp_path):
  directory = write_subject(str(tmp_path), "patient005")
  gt = os.path.join(directory, "patient005_frame01_gt.nii.gz")
  labels = phantom_labels(ED_RADII_MM)
  shifted = np.diag([*SPACING, 1.0])
  shifted[:3, 3] = (5.0, 0.0, 0.0)
  save_header_nifti(gt, labels, affine=shifted, qform_code=0)
  with pytest.raises(InvalidInputError, match=r"frame01_gt.nii.gz: label affine does not match "
                     r"that of image .*frame01.nii.gz: voxels are up to 5 mm apart .*origin "
                     r"shifted by 5 mm") as error:
    acdc.load_subject(directory)
  assert "voxel axes" not in str(error.value)
  rotated = np.diag([*SPACING, 1.0])
  rotated[:2, :2] = [[0.0, -SPACING[1]], [SPACING[0], 0.0]]
  save_header_nifti(gt, labels, affine=rotated, qform_code=0)
  with pytest.raises(InvalidInputError, match=r"voxel axes \(orientation/scale\) differ"):
    acdc.load_subject(directory)
  # Rounding-level differences are within the tolerance.
  nudged = np.diag([*SPACING, 1.0])
  nudged[:3, 3] = 0.01
  save_header_nifti(gt, labels, affine=nudged, qform_code=0)
  acdc.load_subject(directory)
  # A label file without orientation (qform/sform codes 0) is compared by shape and spacing only.
  save_header_nifti(gt, labels, affine=shifted, qform_code=0, sform_code=0)
  acdc.load_subject(directory)
  save_nifti(gt, labels, spacing=(1.5, 1.6, 10.0))
  with pytest.raises(InvalidInputError, match=r"label spacing \(1.5, 1.6, 10.0\) does not match "
                                              r"image"):
    acdc.load_subject(directory)
  save_nifti(gt, labels)
  es_image = os.path.join(directory, "patient005_frame04.nii.gz")
  es_gt = os.path.join(directory, "patient005_frame04_gt.nii.gz")
  es_labels = np.asarray(nib.load(es_gt).dataobj)
  for path, data in ((es_image, np.asarray(nib.load(es_image).dataobj)), (es_gt, es_labels)):
    save_header_nifti(path, data, affine=shifted, qform_code=0)
  with pytest.raises(InvalidInputError, match=r"frame04.nii.gz: ES frame 4 affine does not match "
                                              r"that of ED frame 1"):
    acdc.load_subject(directory)


def test_label_values_outside_convention_are_listed(tmp_path):
  directory = write_subject(str(tmp_path), "patient006")
  gt = os.path.join(directory, "patient006_frame01_gt.nii.gz")
  labels = phantom_labels(ED_RADII_MM).astype(np.float32)
  labels[0, 0, 0] = 1.5
  labels[0, 1, 0] = -1
  save_nifti(gt, labels)
  with pytest.raises(InvalidInputError, match=r"label values \[-1, 1.5\] are outside"):
    acdc.load_subject(directory)
  labels = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) + 10
  save_nifti(gt, labels)
  with pytest.raises(InvalidInputError, match=r"\[10, 11, .*17\] and 12664 more are outside"):
    acdc.load_subject(directory)


def test_single_frame_and_empty_cine(tmp_path):
  directory = write_subject(str(tmp_path), "patient007", write_cine=True)
  cine = os.path.join(directory, "patient007_4d.nii.gz")
  image = np.asarray(nib.load(os.path.join(directory, "patient007_frame01.nii.gz")).dataobj)
  save_nifti(cine, image[..., None])
  with pytest.raises(InvalidInputError, match="patient007_4d.nii.gz: a single-frame series"):
    acdc.load_subject(directory, load_cine=True)
  save_nifti(cine, np.zeros((*SHAPE, 0), np.float32))
  with pytest.raises(InvalidInputError, match="patient007_4d.nii.gz: volume shape .* has an "
                                              "empty axis"):
    acdc.load_subject(directory, load_cine=True)
  # A frame stored as (X, Y, Z, 1) is the same frame.
  save_nifti(os.path.join(directory, "patient007_frame01.nii.gz"), image[..., None])
  assert acdc.load_subject(directory).ed_image.shape == SHAPE


def test_find_subjects_reports_odd_folder_names(tmp_path):
  root = os.path.join(str(tmp_path), "training")
  for name in (b"patient001", b"patient\xff02", b"patient12a", b"notes",
               "patient\u0661\u0662".encode()):
    os.makedirs(os.path.join(os.fsencode(root), name))
  refs, rejected = acdc.find_subjects(str(tmp_path))
  assert [r.subject for r in refs] == ["patient001"]
  reasons = {r.name: r.reason for r in rejected}
  assert set(reasons) == {"patient\\xff02", "patient12a", "patient\u0661\u0662"}
  assert reasons["patient\\xff02"].endswith("training/patient\\xff02: folder name is not valid "
                                            "UTF-8 text")
  assert "not a subject id" in reasons["patient12a"]
  # Every reason can be written as UTF-8.
  for reason in reasons.values():
    reason.encode("utf-8")
