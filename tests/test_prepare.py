"""Tests of preprocessing geometry, the subject split, and the prepare job end to end.

The cohort is the phantom of test_acdc_reader (48 x 44 x 6 voxels) plus hostile subjects; one
module-scoped preparation at 32 x 32 pixels serves most checks.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest

from cardiac_jax import cardiac
from cardiac_jax import structures
from data_pipelines import acdc
from data_pipelines import prepare
from data_pipelines import preprocess
from data_pipelines import subject_splits
from data_pipelines import tfds_builders
from data_pipelines.errors import InvalidInputError
from tests.test_acdc_reader import ED_RADII_MM
from tests.test_acdc_reader import ES_SCALE
from tests.test_acdc_reader import phantom_image
from tests.test_acdc_reader import phantom_labels
from tests.test_acdc_reader import save_header_nifti
from tests.test_acdc_reader import save_nifti
from tests.test_acdc_reader import SPACING
from tests.test_acdc_reader import write_subject

LV, MYO, RV = structures.LV_BLOOD_POOL, structures.LV_MYOCARDIUM, structures.RV_BLOOD_POOL
SMALL = preprocess.PreprocessConfig(image_size=32, spacing_mm=2.0)


# ----------------------------------------------------------------------------- geometry

def _two_discs(shape, spacing, lv_px, rv_px, lv_mm=9.0, rv_mm=7.0):
  rows, cols = np.mgrid[:shape[0], :shape[1]].astype(float)
  plane = np.zeros(shape, np.uint8)
  plane[np.hypot((rows - rv_px[0]) * spacing[0], (cols - rv_px[1]) * spacing[1]) < rv_mm] = RV
  plane[np.hypot((rows - lv_px[0]) * spacing[0], (cols - lv_px[1]) * spacing[1]) < lv_mm] = LV
  return plane


@pytest.mark.parametrize("angle_deg", [0.0, 70.0, 135.0, 200.0, 290.0])
def test_alignment_centres_lv_and_puts_rv_left(angle_deg):
  spacing = (1.4, 1.1)
  lv_px = (41.0, 37.0)
  # RV 25 mm from the LV along angle_deg in (row, col) physical coordinates.
  offset_mm = 25.0 * np.array([math.cos(math.radians(angle_deg)),
                               math.sin(math.radians(angle_deg))])
  rv_px = (lv_px[0] + offset_mm[0] / spacing[0], lv_px[1] + offset_mm[1] / spacing[1])
  labels = _two_discs((80, 90), spacing, lv_px, rv_px)
  images = labels.astype(np.float32) * 10
  config = preprocess.PreprocessConfig(image_size=64, spacing_mm=1.0)
  out_images, out_labels = preprocess.align_slice(images[..., None], labels[..., None],
                                                  spacing, config)
  assert out_images.shape == (64, 64, 1) and out_images.dtype == np.float32
  assert out_labels.shape == (64, 64, 1) and out_labels.dtype == np.uint8
  lv = np.array(preprocess.structure_centroid(out_labels[..., 0], LV))
  rv = np.array(preprocess.structure_centroid(out_labels[..., 0], RV))
  np.testing.assert_allclose(lv, [31.5, 31.5], atol=1.0)
  direction = math.degrees(math.atan2(*(rv - lv)[::-1]))   # atan2(col, row)
  canonical = math.degrees(math.atan2(preprocess.CANONICAL_LV_TO_RV[1],
                                      preprocess.CANONICAL_LV_TO_RV[0]))
  assert abs((direction - canonical + 180) % 360 - 180) < 5.0
  # Distances are kept: 25 mm at 1 mm pixels.
  assert np.linalg.norm(rv - lv) == pytest.approx(25.0, abs=1.0)
  # Physical size is kept: the LV disc of radius 9 mm covers pi 81 mm^2.
  assert np.sum(out_labels == LV) == pytest.approx(math.pi * 81, rel=0.05)


def test_resampling_preserves_physical_size():
  spacing = (1.5, 1.2)
  labels = _two_discs((40, 50), spacing, (20.0, 25.0), (5.0, 5.0), lv_mm=12.0, rv_mm=1.0)
  resampled = preprocess.resample_in_plane(labels[..., None], spacing, 0.75, order=0)
  assert resampled.shape == (80, 80, 1)                   # 60 mm x 60 mm at 0.75 mm
  area_before = np.sum(labels == LV) * 1.5 * 1.2
  area_after = np.sum(resampled == LV) * 0.75 ** 2
  assert area_after == pytest.approx(area_before, rel=0.03)
  image = np.linspace(0, 1, 40 * 50, dtype=np.float32).reshape(40, 50, 1)
  assert preprocess.resample_in_plane(image, spacing, 3.0, order=1).shape == (20, 20, 1)


def test_slice_rules_pick_expected_index():
  labels = phantom_labels(ED_RADII_MM)       # usable slices 1..4, base (largest) at 1
  assert list(preprocess.usable_slices(labels, 10)) == [1, 2, 3, 4]
  assert preprocess.select_slice(labels, "acdc_basal") == 1
  assert preprocess.select_slice(labels, "mid") == 3
  assert preprocess.select_slice(labels, "largest_lv") == 1
  flipped = labels[:, :, ::-1]               # apex-first stack: the base is now slice 4
  assert preprocess.select_slice(flipped, "acdc_basal") == 4
  assert preprocess.select_slice(flipped, "largest_lv") == 4
  # The > 10 pixel threshold: a base slice whose RV has exactly 10 pixels is not usable.
  thin_rv = labels.copy()
  rv_pixels = np.argwhere(thin_rv[:, :, 1] == RV)
  for x, y in rv_pixels[10:]:
    thin_rv[x, y, 1] = 0
  assert preprocess.select_slice(thin_rv, "acdc_basal") == 2
  with pytest.raises(InvalidInputError, match="no slice has more than 10 pixels"):
    preprocess.select_slice(np.zeros((8, 8, 3), np.uint8))


def test_normalisation_shares_one_scale_for_ed_and_es():
  ed_labels = phantom_labels(ED_RADII_MM)
  es_labels = phantom_labels(tuple(r * ES_SCALE for r in ED_RADII_MM))
  rng = np.random.default_rng(0)
  ed_image = (ed_labels * 60.0 + rng.uniform(0, 10, ed_labels.shape)).astype(np.float32)
  es_image = 0.5 * ed_image                  # a uniformly darker ES frame
  out = preprocess.preprocess_subject(ed_image, ed_labels, es_image, es_labels, SPACING, SMALL)
  assert out.image.shape == (32, 32, 2) and out.slice_index == 1
  assert out.image.min() >= 0.0 and out.image.max() <= 1.0
  assert out.image[..., 0].max() == pytest.approx(1.0)
  # Normalised separately, the ES frame would also reach 1.
  assert out.image[..., 1].max() < 0.8


def test_crop_check_says_why_a_structure_is_lost():
  """A structure of the selected slice missing from a channel of the crop is refused, saying
  whether it lies outside the crop or is thinner than the output pixels."""
  ed_labels = phantom_labels(ED_RADII_MM)
  es_labels = phantom_labels(tuple(r * ES_SCALE for r in ED_RADII_MM))
  images = [phantom_image(ed_labels, 0), phantom_image(es_labels, 1)]
  coarse = preprocess.PreprocessConfig(image_size=8, spacing_mm=12.0)
  with pytest.raises(InvalidInputError, match=r"the ES crop of slice 1 \(8 px of 12 mm\) loses "
                                              r"the LV myocardium of that slice: it covers 250 "
                                              r"input pixels, too few for output pixels of 12 mm"):
    preprocess.preprocess_subject(images[0], ed_labels, images[1], es_labels, SPACING, coarse)
  narrow = preprocess.PreprocessConfig(image_size=8, spacing_mm=2.0)
  with pytest.raises(InvalidInputError, match=r"the ED crop of slice 1 \(8 px of 2 mm\) loses the "
                                              r"RV blood pool of that slice: it lies outside"):
    preprocess.preprocess_subject(images[0], ed_labels, images[1], es_labels, SPACING, narrow)


def test_preprocess_config_validates():
  with pytest.raises(ValueError, match="slice_rule"):
    preprocess.PreprocessConfig(slice_rule="apex")
  with pytest.raises(ValueError, match="percentiles"):
    preprocess.PreprocessConfig(intensity_percentiles=(99.0, 1.0))


# ----------------------------------------------------------------------------- splits

def test_stratified_split_is_stratified_and_deterministic():
  groups = {f"patient{i:03d}": structures.GROUPS[i % 5] for i in range(100)}
  split = subject_splits.stratified_split(groups, (0.7, 0.1, 0.2), seed=3)
  assert [len(split[s]) for s in ("train", "val", "test")] == [70, 10, 20]
  assert sorted(sum(split.values(), [])) == sorted(groups)
  for group in structures.GROUPS:
    counts = [sum(groups[s] == group for s in split[name]) for name in ("train", "val", "test")]
    assert counts == [14, 2, 4], (group, counts)
  assert split == subject_splits.stratified_split(groups, (0.7, 0.1, 0.2), seed=3)
  assert split != subject_splits.stratified_split(groups, (0.7, 0.1, 0.2), seed=4)
  tiny = subject_splits.stratified_split({"a": "NOR", "b": "NOR", "c": "DCM"}, seed=0)
  assert all(len(v) == 1 for v in tiny.values())


# ----------------------------------------------------------------------------- prepare

VALID = {"patient001": ("NOR", 1), "patient002": ("NOR", 1), "patient003": ("DCM", 1),
         "patient004": ("DCM", 3), "patient005": ("HCM", 1), "patient006": ("MINF", 1),
         "patient007": ("RV", 1), "patient008": ("NOR", 1), "patient009": ("DCM", 1),
         "patient010": ("HCM", 1)}


def _write_hostile_cohort(root: str) -> dict[str, str]:
  """Valid subjects plus hostile ones; returns {hostile subject: expected reason pattern}."""
  for i, (subject, (group, ed)) in enumerate(VALID.items()):
    write_subject(root, subject, group=group, ed=ed, es=5, seed=i,
                  partition="training" if i < 8 else "testing")
  hostile = {}
  d = write_subject(root, "patient011", seed=11)
  path = os.path.join(d, "patient011_frame04.nii.gz")
  with open(path, "rb") as f:
    content = f.read()
  with open(path, "wb") as f:
    f.write(content[:len(content) // 3])
  hostile["patient011"] = r"patient011_frame04\.nii\.gz: cannot read NIfTI"
  d = write_subject(root, "patient012", seed=12)
  os.remove(os.path.join(d, "Info.cfg"))
  hostile["patient012"] = r"patient012/Info\.cfg: Info\.cfg is missing"
  d = write_subject(root, "patient013", seed=13)
  labels = phantom_labels(ED_RADII_MM)
  labels[labels == MYO] = 7
  save_nifti(os.path.join(d, "patient013_frame01_gt.nii.gz"), labels)
  hostile["patient013"] = r"patient013_frame01_gt\.nii\.gz: label values \[7\]"
  d = write_subject(root, "patient014", seed=14)
  save_nifti(os.path.join(d, "patient014_frame04_gt.nii.gz"), phantom_labels(ED_RADII_MM)[:, :40])
  hostile["patient014"] = r"patient014_frame04_gt\.nii\.gz: label shape .* does not match"
  d = write_subject(root, "patient015", seed=15)
  labels = phantom_labels(tuple(r * ES_SCALE for r in ED_RADII_MM))
  labels[labels == LV] = MYO
  save_nifti(os.path.join(d, "patient015_frame04_gt.nii.gz"), labels)
  hostile["patient015"] = r"patient015_frame04_gt\.nii\.gz: the ES labels have no LV blood pool"
  d = write_subject(root, "patient016", seed=16)
  image = np.asarray(nib.load(os.path.join(d, "patient016_frame01.nii.gz")).dataobj)
  image = image.astype(np.float32)
  image[5, 5, 2] = np.inf
  save_nifti(os.path.join(d, "patient016_frame01.nii.gz"), image)
  hostile["patient016"] = r"patient016_frame01\.nii\.gz: 1 voxels are NaN or infinite"
  hostile.update(_write_more_hostile_subjects(root))
  return hostile


def _info_cfg(directory: str, content: bytes) -> None:
  with open(os.path.join(directory, "Info.cfg"), "wb") as f:
    f.write(content)


def _write_more_hostile_subjects(root: str) -> dict[str, str]:
  """One subject per remaining hostile case of the reliability checklist."""
  hostile = {}
  info = b"ED: 1\nES: 4\nGroup: NOR\nHeight: 172.0\nNbFrame: 6\nWeight: 70.5\n"
  cases = {
      "patient017": (info + b"ES: 5\n", r"patient017/Info\.cfg: key 'ES' appears twice"),
      "patient018": (bytes(range(256)) * 4, r"patient018/Info\.cfg: Info\.cfg is not UTF-8"),
      "patient019": (info.replace(b"Group: NOR", b"Group: NOR\x00\x01"),
                     r"patient019/Info\.cfg: Info\.cfg holds binary data"),
      "patient020": (info.replace(b"ES: 4", b"ES: 40"),
                     r"patient020/Info\.cfg: ES frame 40 exceeds NbFrame 6"),
      "patient021": (info.replace(b"NOR", b"XYZ"), r"patient021/Info\.cfg: unknown Group 'XYZ'"),
      "patient022": (info.replace(b"Height: 172.0", b"Height: tall"),
                     r"patient022/Info\.cfg: Height is not a number"),
      "patient023": (info.replace(b"Weight: 70.5\n", b""), r"patient023/Info\.cfg: Info\.cfg lacks "
                     r"Weight"),
      "patient024": (b"ED: 1\nES: 1\nGroup: NOR\nHeight: 172\nNbFrame: 1\nWeight: 70\n",
                     r"patient024/Info\.cfg: NbFrame is 1; a cine series needs at least 2"),
  }
  for i, (subject, (content, pattern)) in enumerate(cases.items()):
    _info_cfg(write_subject(root, subject, seed=17 + i), content)
    hostile[subject] = pattern
  d = write_subject(root, "patient025", seed=25)
  with open(os.path.join(d, "patient025_frame01.nii.gz"), "wb") as f:
    f.write(b"\x5c\x01 not gzip " * 100)
  hostile["patient025"] = r"patient025_frame01\.nii\.gz: cannot read NIfTI, the file is not gzip"
  d = write_subject(root, "patient026", seed=26)
  nib.save(nib.Nifti1Image(np.ones((48, 44), np.float32), np.eye(4)),
           os.path.join(d, "patient026_frame04.nii.gz"))
  hostile["patient026"] = r"patient026_frame04\.nii\.gz: expected a 3D or 4D volume"
  d = write_subject(root, "patient027", seed=27)
  save_nifti(os.path.join(d, "patient027_frame01_gt.nii.gz"), np.zeros((48, 0, 6), np.uint8))
  hostile["patient027"] = r"patient027_frame01_gt\.nii\.gz: volume shape \(48, 0, 6\) has an empty"
  d = write_subject(root, "patient028", seed=28)
  shifted = np.diag([*SPACING, 1.0])
  shifted[0, 3] = 3.0
  save_header_nifti(os.path.join(d, "patient028_frame01_gt.nii.gz"), phantom_labels(ED_RADII_MM),
                    affine=shifted, qform_code=0)
  hostile["patient028"] = (r"patient028_frame01_gt\.nii\.gz: label affine does not match that of "
                           r"image .*patient028_frame01\.nii\.gz: .*origin shifted by 3 mm")
  d = write_subject(root, "patient029", seed=29)
  save_header_nifti(os.path.join(d, "patient029_frame04.nii.gz"),
                    np.ones((48, 44, 6), np.float32), pixdim=(1.5, np.nan, 8.0))
  hostile["patient029"] = r"patient029_frame04\.nii\.gz: header voxel spacing \(pixdim\)"
  d = write_subject(root, "patient030", seed=30)
  labels = phantom_labels(ED_RADII_MM)
  labels[labels == LV] = MYO
  save_nifti(os.path.join(d, "patient030_frame01_gt.nii.gz"), labels)
  hostile["patient030"] = r"patient030_frame01_gt\.nii\.gz: the ED labels have no LV blood pool"
  # Every structure present, but a heart of a tenth of a millilitre.
  write_subject(root, "patient031", seed=31, ed_radii_mm=(0.0, 2.0, 0.0, 0.0, 0.0, 0.0))
  hostile["patient031"] = (r"patient031: implausible measurements: LV EDV 0\.096 ml outside "
                           r"\[5, 800\] \(lv_edv_ml\)")
  # The myocardium is cut open on every slice: wall thickness is undefined.
  d = write_subject(root, "patient032", seed=32)
  labels = phantom_labels(ED_RADII_MM)
  labels[22:, 24, :][labels[22:, 24, :] == MYO] = 0
  save_nifti(os.path.join(d, "patient032_frame01_gt.nii.gz"), labels)
  hostile["patient032"] = (r"patient032_frame01_gt\.nii\.gz: cannot measure the heart: no slice "
                           r"has a closed LV myocardial ring")
  # Folders that are not subjects: a name that is not UTF-8, a malformed id.
  write_subject(os.fsdecode(os.fsencode(root)), os.fsdecode(b"patient\xff33"), seed=33)
  hostile["patient\\xff33"] = r"training/patient\\xff33: folder name is not valid UTF-8 text"
  write_subject(root, "patient34b", seed=34)
  hostile["patient34b"] = r"training/patient34b: folder name is not a subject id"
  return hostile


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("raw"))
  hostile = _write_hostile_cohort(root)
  output = str(tmp_path_factory.mktemp("prepared") / "out")
  report = prepare.prepare_dataset(root, output, SMALL, verbose=False)
  return root, output, report, hostile


def test_report_records_every_subject(prepared):
  root, output, report, hostile = prepared
  with open(os.path.join(output, prepare.REPORT)) as f:
    assert json.load(f) == report
  entries = {e["subject"]: e for e in report["subjects"]}
  assert set(entries) == set(VALID) | set(hostile)
  assert report["counts"]["found"] == len(VALID) + len(hostile)
  assert report["counts"]["prepared"] == len(VALID)
  assert report["counts"]["skipped"] == len(hostile)
  for subject, pattern in hostile.items():
    assert entries[subject]["status"] == "skipped"
    assert entries[subject]["reason"] is not None
    assert re.search(pattern, entries[subject]["reason"]), entries[subject]["reason"]
  for subject in VALID:
    assert entries[subject]["status"] == "prepared"
  assert report["config"]["preprocess"] == json.loads(json.dumps(SMALL.to_dict()))
  assert report["config"]["input_dir"] == os.path.abspath(root)


def test_attributes_csv(prepared):
  root, output, _, _ = prepared
  with open(os.path.join(output, prepare.ATTRIBUTES), newline="") as f:
    reader = csv.DictReader(f)
    assert tuple(reader.fieldnames) == structures.ATTRIBUTES_CSV_COLUMNS
    rows = list(reader)
  assert sorted(r["subject"] for r in rows) == sorted(VALID)
  attributes = prepare.prepared_attributes(output)
  expected = cardiac.subject_attributes(
      phantom_labels(ED_RADII_MM), phantom_labels(tuple(r * ES_SCALE for r in ED_RADII_MM)),
      SPACING)
  for subject, (group, ed) in VALID.items():
    row = attributes[subject]
    assert (row["group"], row["ed_frame"], row["es_frame"]) == (group, ed, 5)
    for name in structures.ATTRIBUTE_NAMES:
      assert row[name] == pytest.approx(expected[name], rel=1e-5), name


def test_splits_are_stratified_and_saved(prepared):
  _, output, report, _ = prepared
  with open(os.path.join(output, prepare.SPLITS)) as f:
    splits = json.load(f)
  members = [s for name in subject_splits.SPLITS for s in splits[name]]
  assert sorted(members) == sorted(VALID)                  # disjoint and complete
  groups = {s: g for s, (g, _) in VALID.items()}
  assert {name: splits[name] for name in subject_splits.SPLITS} == (
      subject_splits.stratified_split(groups, (0.7, 0.1, 0.2), seed=0))
  assert [len(splits[n]) for n in subject_splits.SPLITS] == [7, 1, 2]
  assert (report["counts"]["train"], report["counts"]["val"], report["counts"]["test"]) == (
      7, 1, 2)


def test_tfds_dataset_loads_with_schema(prepared):
  _, output, _, _ = prepared
  builder = prepare.open_prepared(output)
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      "train": 7, "val": 1, "test": 2}
  with open(os.path.join(output, prepare.SPLITS)) as f:
    splits = json.load(f)
  source = builder.as_data_source("train")
  example = source[0]
  assert set(example) == {"subject", "group", "image", "label", "slice_index", "attributes"}
  subject = example["subject"].decode()
  assert subject in splits["train"]
  assert structures.GROUPS[example["group"]] == VALID[subject][0]
  assert example["image"].shape == (32, 32, 2) and example["image"].dtype == np.float32
  assert 0.0 <= example["image"].min() and example["image"].max() <= 1.0
  assert example["label"].shape == (32, 32, 2) and example["label"].dtype == np.uint8
  assert set(np.unique(example["label"])) <= {0, 1, 2, 3}
  assert example["slice_index"] == 1
  assert set(example["attributes"]) == set(structures.ATTRIBUTE_NAMES)
  # The prepared slice is aligned: LV at the centre, RV to its left.
  lv = preprocess.structure_centroid(example["label"][..., 0], LV)
  rv = preprocess.structure_centroid(example["label"][..., 0], RV)
  np.testing.assert_allclose(lv, (15.5, 15.5), atol=1.0)
  assert rv[1] < lv[1] - 5 and abs(rv[0] - lv[0]) < 1.0
  assert len(prepare.load_split(output, "test")) == 2


def test_rerun_with_same_config_does_nothing(prepared, capsys):
  root, output, report, _ = prepared
  stamp = os.path.getmtime(os.path.join(output, prepare.REPORT))
  assert prepare.prepare_dataset(root, output, SMALL) == report
  assert os.path.getmtime(os.path.join(output, prepare.REPORT)) == stamp
  assert "already prepared" in capsys.readouterr().out


def test_other_config_or_foreign_directory_is_refused(prepared, tmp_path):
  root, output, _, _ = prepared
  other = preprocess.PreprocessConfig(image_size=32, spacing_mm=2.5)
  with pytest.raises(FileExistsError, match="different configuration"):
    prepare.prepare_dataset(root, output, other, verbose=False)
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="not a prepared dataset"):
    prepare.prepare_dataset(root, str(foreign), SMALL, verbose=False)


def _small_cohort(root: str) -> None:
  for i, subject in enumerate(("patient001", "patient002", "patient003")):
    write_subject(root, subject, group=("NOR", "DCM", "HCM")[i], seed=i)


def test_interrupted_run_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
  root, output = str(tmp_path / "raw"), str(tmp_path / "out")
  _small_cohort(root)

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(prepare, "_write_attributes_csv", interrupted)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare_dataset(root, output, SMALL, verbose=False)
  # Only the per-subject work area remains (no staging folder, no lock, nothing complete).
  assert os.listdir(output) == [prepare.WORK_DIR]
  with pytest.raises(InvalidInputError, match="not a complete prepared dataset"):
    prepare.open_prepared(output)
  monkeypatch.undo()
  # Leftovers of a run killed harder (staging folder, a partial tfds folder) are cleared.
  os.makedirs(os.path.join(output, ".staging-dead", "tfds"))
  os.makedirs(os.path.join(output, "tfds", "acdc"))
  report = prepare.prepare_dataset(root, output, SMALL, verbose=False)
  assert report["counts"]["prepared"] == 3
  assert sorted(os.listdir(output)) == ["attributes.csv", "report.json", "splits.json", "tfds"]
  assert len(prepare.load_split(output, "val")) == 1


def test_no_preparable_subject_fails_clearly(tmp_path):
  root = str(tmp_path / "raw")
  for subject in ("patient001", "patient002"):
    os.remove(os.path.join(write_subject(root, subject), "Info.cfg"))
  with pytest.raises(InvalidInputError, match="none of the 2 subjects could be prepared"):
    prepare.prepare_dataset(root, str(tmp_path / "out"), SMALL, verbose=False)
  assert not os.path.exists(os.path.join(tmp_path, "out", prepare.REPORT))


def test_unexpected_error_is_recorded_not_raised(tmp_path, monkeypatch):
  root = str(tmp_path / "raw")
  write_subject(root, "patient001")
  ref = acdc.list_subjects(root)[0]

  def broken(*args, **kwargs):
    return 1 / 0

  monkeypatch.setattr(tfds_builders.cardiac, "subject_attributes", broken)
  outcome = tfds_builders.run_subject(ref, SMALL)
  assert outcome.status == "skipped"
  assert "unexpected ZeroDivisionError: division by zero" in outcome.reason
  assert ref.directory in outcome.reason


def test_command_line(tmp_path):
  """The prepare command, and each user mistake ending in one line that names the problem (no
  traceback, nothing written): all run by one interpreter, calling the command's main as
  `python -m data_pipelines.prepare` would."""
  root, output = str(tmp_path / "raw"), str(tmp_path / "out")
  _small_cohort(root)
  empty = tmp_path / "empty"
  empty.mkdir()
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  good = [f"--input_dir={root}", "--image_size=32", "--spacing_mm=2.0"]
  cases = [
      ([*good, f"--output_dir={output}", "--split_seed=1"], "prepared 3 of 3 subjects"),
      ([*good, f"--output_dir={output}", "--split_seed=1"], "inputs unchanged), nothing to do"),
      ([f"--input_dir={empty}", f"--output_dir={tmp_path / 'o1'}"],
       "prepare failed: .*empty: the input directory is empty"),
      ([f"--input_dir={tmp_path / 'nowhere'}", f"--output_dir={tmp_path / 'o2'}"],
       "prepare failed: .*nowhere: input directory does not exist"),
      ([*good, f"--output_dir={tmp_path / 'o3'}", "--split_seed=-1"],
       "prepare failed: split_seed must be an integer >= 0, got -1"),
      ([*good[:1], f"--output_dir={tmp_path / 'o4'}", "--image_size=0"],
       "prepare failed: image_size must be an integer from 8 to 512, got 0"),
      ([*good[:2], f"--output_dir={tmp_path / 'o5'}", "--spacing_mm=nan"],
       "prepare failed: spacing_mm must be positive and finite, got nan"),
      ([*good, f"--output_dir={tmp_path / 'o6'}", "--plausibility=lv_ef=90:2"],
       r"prepare failed: plausibility bound lv_ef must satisfy 0 <= low < high"),
      ([*good, f"--output_dir={tmp_path / 'o7'}", "--plausibility=lv_ef"],
       r"prepare failed: --plausibility entry 'lv_ef' is not name=low:high"),
      ([*good, f"--output_dir={a_file}"], "prepare failed: output_dir .*a_file exists and is not "
                                          "a folder"),
  ]
  script = textwrap.dedent(f"""
      from absl import flags
      from data_pipelines import prepare
      prepare._define_flags()
      for argv in {[argv for argv, _ in cases]!r}:
        print("CASE", flush=True)
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["prepare", *argv])
        try:
          prepare.main(["prepare"])
          print("EXIT 0", flush=True)
        except SystemExit as e:
          print(f"EXIT {{e.code}}", flush=True)
  """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(__file__)), timeout=120,
                          check=False)
  assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
  runs = result.stdout.split("CASE\n")[1:]
  assert len(runs) == len(cases), result.stdout[-3000:]
  for (argv, pattern), run in zip(cases, runs):
    printed, _, code = run.rpartition("EXIT ")
    if pattern.startswith("prepare failed"):
      assert re.match(pattern, code.strip()), (argv, code)
    else:
      assert code.strip() == "0" and pattern in printed, (argv, run[-500:])
  for name in ("o1", "o2", "o3", "o4", "o5", "o6", "o7"):
    assert not os.path.exists(tmp_path / name), name
  assert prepare.prepared_attributes(output).keys() == {"patient001", "patient002",
                                                        "patient003"}


def test_synthetic_cohort_lv_edv_matches_ground_truth(cine_cohort, tmp_path):
  """The session's small synthetic cohort (conftest) prepared as slices: every subject passes
  the plausibility checks, and the LV EDV measured from the labels matches the generator's."""
  cohort, _ = cine_cohort
  output = str(tmp_path / "prepared")
  report = prepare.prepare_dataset(cohort, output, preprocess.PreprocessConfig(image_size=64),
                                   verbose=False)
  assert report["counts"]["prepared"] == report["counts"]["found"] >= 10, report["subjects"]
  with open(os.path.join(cohort, "parameters.csv"), newline="") as f:
    truth = {row["subject"]: row for row in csv.DictReader(f)}
  measured = prepare.prepared_attributes(output)
  for subject, row in measured.items():
    assert row["lv_edv_ml"] == pytest.approx(float(truth[subject]["lv_edv_ml"]), rel=0.15)
