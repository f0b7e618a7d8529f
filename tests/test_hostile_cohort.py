"""Hostile cohorts: the data-side examples of the reliability checklist, each on a tiny phantom.

Wrong measurements that used to be accepted (spatial units ignored, ED and ES exchanged, blank
frames, implausible segmentations, structures cut off by the crop), reruns after the input
changed, folder entries that vanished from the report, arguments that failed late or left an
output that refused the corrected rerun, and a label file that was inflated before its shape was
compared. The phantom subjects are those of test_acdc_reader (48 x 44 x 6 voxels).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import tracemalloc

import ml_collections
import nibabel as nib
import numpy as np
import pytest

from cardiac_jax import structures
from data_pipelines import acdc
from data_pipelines import cine
from data_pipelines import nifti
from data_pipelines import plausibility
from data_pipelines import prepare
from data_pipelines import preprocess
from data_pipelines import subject_splits
from data_pipelines import tfds_builders
from data_pipelines.errors import InvalidArgumentError
from data_pipelines.errors import InvalidInputError
from tests.test_acdc_reader import ED_RADII_MM
from tests.test_acdc_reader import ES_SCALE
from tests.test_acdc_reader import phantom_image
from tests.test_acdc_reader import phantom_labels
from tests.test_acdc_reader import save_header_nifti
from tests.test_acdc_reader import save_nifti
from tests.test_acdc_reader import SPACING
from tests.test_acdc_reader import write_subject
from tests.test_cine_readers_property import PHANTOMS as UKBB_PHANTOMS

SMALL = preprocess.PreprocessConfig(image_size=32, spacing_mm=2.0)
LV, MYO, RV = structures.LV_BLOOD_POOL, structures.LV_MYOCARDIUM, structures.RV_BLOOD_POOL
# NIfTI xyzt_units spatial codes and the size of a millimetre in them.
UNITS = {"meter": (1, 1e-3), "micron": (3, 1e3)}


def rewrite_in_unit(directory: str, code: int, per_mm: float) -> None:
  """Rewrites every NIfTI of a subject folder with its spacing and affine in another spatial
  unit (xyzt_units code), the same geometry in other numbers."""
  for name in os.listdir(directory):
    if not name.endswith(".nii.gz"):
      continue
    path = os.path.join(directory, name)
    image = nib.load(path)
    data = np.asarray(image.dataobj)
    affine = image.affine.copy()
    affine[:3] *= per_mm
    spacing = [s * per_mm for s in SPACING]
    save_header_nifti(path, data, affine=affine, pixdim=spacing, xyzt_units=code)


def _ref(directory: str) -> acdc.SubjectRef:
  return acdc.SubjectRef(subject=os.path.basename(directory), partition="",
                         directory=directory)


# ----------------------------------------------------------------------------- units

def test_spatial_units_of_the_header_are_converted_to_mm(tmp_path):
  reference = tfds_builders.prepare_subject(
      _ref(write_subject(str(tmp_path / "mm"), "patient001", partition="")), SMALL)
  for unit, (code, per_mm) in UNITS.items():
    directory = write_subject(str(tmp_path / unit), "patient001", partition="")
    rewrite_in_unit(directory, code, per_mm)
    volume = nifti.read_nifti(os.path.join(directory, "patient001_frame01.nii.gz"))
    assert volume.spacing_mm == pytest.approx(SPACING, rel=1e-6), unit
    np.testing.assert_allclose(np.diag(volume.affine)[:3], SPACING, rtol=1e-6)
    outcome = tfds_builders.prepare_subject(_ref(directory), SMALL)
    # The same heart in other units: the same volumes (LV EDV 14.5 ml, not 1.5e-8 ml) and crop.
    assert outcome.attributes == pytest.approx(reference.attributes, rel=1e-6), unit
    np.testing.assert_allclose(outcome.example["image"], reference.example["image"], atol=1e-6)
    assert outcome.example["image"].max() > 0.5
  # A spatial unit code NIfTI does not define is refused, naming the file and the code.
  directory = write_subject(str(tmp_path / "bad"), "patient001", partition="")
  rewrite_in_unit(directory, 5, 1.0)
  with pytest.raises(InvalidInputError, match=r"frame01\.nii\.gz: header xyzt_units has spatial "
                                              r"unit code 5"):
    acdc.load_subject(directory)
  # Metres written without a unit ("unknown" is read as mm) give voxels no MRI has.
  directory = write_subject(str(tmp_path / "unknown"), "patient001", partition="")
  rewrite_in_unit(directory, 0, 1e-3)
  with pytest.raises(InvalidInputError, match=r"voxel spacing \(0\.0015, 0\.0016, 0\.008\) mm "
                                              r"is outside the plausible \[0\.1, 30\] mm"):
    tfds_builders.prepare_subject(_ref(directory), SMALL)


# ----------------------------------------------------------------------------- plausibility

def _exchange_ed_es(directory: str) -> None:
  path = os.path.join(directory, "Info.cfg")
  with open(path) as f:
    text = f.read()
  with open(path, "w") as f:
    f.write(text.replace("ED: 1", "ED: X").replace("ES: 4", "ED: 4").replace("ED: X", "ES: 1"))


def _one_voxel_es_lv(directory: str, subject: str) -> None:
  labels = phantom_labels(tuple(r * ES_SCALE for r in ED_RADII_MM))
  cavity = np.argwhere(labels == LV)
  labels[labels == LV] = MYO
  labels[tuple(cavity[len(cavity) // 2])] = LV
  save_nifti(os.path.join(directory, f"{subject}_frame04_gt.nii.gz"), labels)


def _far_rv(directory: str, subject: str) -> None:
  """Moves the RV 45 mm from the LV: a 32 px crop of 2 mm (64 mm) cannot hold it."""
  for frame, scale in ((1, 1.0), (4, ES_SCALE)):
    labels = phantom_labels(tuple(r * scale for r in ED_RADII_MM), rv_offset_mm=(2.0, -45.0),
                            shape=(48, 70, 6), lv_centre_px=(22.0, 40.0))
    save_nifti(os.path.join(directory, f"{subject}_frame{frame:02d}_gt.nii.gz"), labels)
    save_nifti(os.path.join(directory, f"{subject}_frame{frame:02d}.nii.gz"),
               phantom_image(labels, frame))


IMPLAUSIBLE = {
    "patient002": (_exchange_ed_es,
                   r"ED and ES look exchanged: the LV and RV are larger at ES \(frame 1\) "
                   r"\(LV 14\.52 ml, RV .* than at ED \(frame 4\) \(LV 7\.066 ml, .*EF of "
                   r"-105 %; check ED and ES in Info\.cfg"),
    "patient003": (lambda d: save_nifti(os.path.join(d, "patient003_frame01.nii.gz"),
                                        np.zeros((48, 44, 6), np.float32)),
                   r"patient003_frame01\.nii\.gz: the ED image \(frame 1\) is blank \(every "
                   r"voxel is 0\)"),
    "patient004": (lambda d: save_nifti(os.path.join(d, "patient004_frame04.nii.gz"),
                                        np.full((48, 44, 6), 7.0, np.float32)),
                   r"patient004_frame04\.nii\.gz: the ES image \(frame 4\) is constant "
                   r"\(every voxel is 7\)"),
    "patient005": (lambda d: _one_voxel_es_lv(d, "patient005"),
                   r"patient005: implausible measurements: LV ESV 0\.0192 ml outside \[1, 700\] "
                   r"\(lv_esv_ml\); LV EF 99\.87 % outside \[2, 90\] \(lv_ef\)"),
    "patient006": (lambda d: _far_rv(d, "patient006"),
                   r"the ED crop of slice 1 \(32 px of 2 mm\) loses the RV blood pool of "
                   r"that slice: it lies outside the crop"),
    "patient007": (lambda d: rewrite_in_unit(d, 0, 1e-3),
                   r"voxel spacing \(0\.0015, 0\.0016, 0\.008\) mm is outside"),
    "patient008": (lambda d: rewrite_in_unit(d, 1, 1e-3), None),      # metres: prepared
    "patient009": (lambda d: rewrite_in_unit(d, 3, 1e3), None),       # microns: prepared
}


def test_implausible_subjects_are_refused_with_the_reason(tmp_path):
  root = str(tmp_path / "raw")
  write_subject(root, "patient001", group="NOR", seed=1)
  for i, (subject, (damage, _)) in enumerate(IMPLAUSIBLE.items()):
    damage(write_subject(root, subject, group="DCM", seed=i + 2))
  report = prepare.prepare_dataset(root, str(tmp_path / "out"), SMALL, verbose=False)
  entries = {e["subject"]: e for e in report["subjects"]}
  for subject, (_, pattern) in IMPLAUSIBLE.items():
    if pattern is None:
      assert entries[subject]["status"] == "prepared", entries[subject]
    else:
      assert entries[subject]["status"] == "skipped", subject
      assert re.search(pattern, entries[subject]["reason"]), entries[subject]["reason"]
  attributes = prepare.prepared_attributes(str(tmp_path / "out"))
  assert sorted(attributes) == ["patient001", "patient008", "patient009"]
  for subject in ("patient008", "patient009"):
    for name in structures.ATTRIBUTE_NAMES:
      assert attributes[subject][name] == pytest.approx(attributes["patient001"][name],
                                                        rel=1e-6), (subject, name)
  assert attributes["patient001"]["lv_edv_ml"] == pytest.approx(14.52, abs=0.01)


def test_plausibility_bounds_are_configurable_and_checked():
  bounds = plausibility.parse_bounds(["lv_ef=1:99.9", "lv_esv_ml=0:700"])
  assert bounds.lv_ef == (1.0, 99.9) and bounds.rv_ef == plausibility.PlausibilityBounds().rv_ef
  assert plausibility.PlausibilityBounds.from_dict(bounds.to_dict()) == bounds
  attributes = {"lv_edv_ml": 15.0, "lv_esv_ml": 0.02, "rv_edv_ml": 9.0, "rv_esv_ml": 4.0,
                "lv_ef": 99.87, "rv_ef": 55.0, "myo_mass_g": 22.0}
  plausibility.check_measurements(attributes, bounds)
  with pytest.raises(InvalidInputError, match=r"LV EF 99\.87 % outside \[2, 90\]"):
    plausibility.check_measurements(attributes, plausibility.PlausibilityBounds())
  for bad, message in ((["lv_ef=90:2"], "0 <= low < high"), (["lv_ef=2:120"], "<= 100"),
                       (["lv_ef"], "not name=low:high"), (["heart=1:2"], "unknown bound"),
                       (["lv_ef=a:b"], "must be numbers")):
    with pytest.raises(ValueError, match=message):
      plausibility.parse_bounds(bad)


# ----------------------------------------------------------------------------- reruns

def _cohort(root: str, subjects=("patient001", "patient002", "patient003", "patient004",
                                 "patient005")) -> None:
  for i, subject in enumerate(subjects):
    write_subject(root, subject, group=structures.GROUPS[i % 5], seed=i)


def _dataset(output: str) -> dict:
  return {e["subject"]: e for split in subject_splits.SPLITS
          for e in prepare.load_split(output, split)}


def test_rerun_prepares_what_changed_drops_what_disappeared_and_adds_what_appeared(
    tmp_path, capsys):
  root, output = str(tmp_path / "raw"), str(tmp_path / "out")
  _cohort(root)
  prepare.prepare_dataset(root, output, SMALL, verbose=False)
  shutil.rmtree(os.path.join(root, "training", "patient002"))
  write_subject(root, "patient003", group="HCM", seed=33)           # other images, same names
  touched = os.path.join(root, "training", "patient004", "Info.cfg")
  os.utime(touched, ns=(1, 1))                                      # same bytes, other time
  write_subject(root, "patient006", group="NOR", seed=6)
  report = prepare.prepare_dataset(root, output, SMALL, verbose=True)
  out = capsys.readouterr().out
  assert ("the input changed since it was prepared: 1 changed (patient003: Info.cfg changed, "
          "patient003_frame01.nii.gz changed, patient003_frame04.nii.gz changed), 1 removed "
          "(patient002), 1 added (patient006); preparing again, 3 unchanged subjects taken "
          "from it") in out, out
  assert report["changes"] == {
      "unchanged": 3, "changed": {"patient003": "Info.cfg changed, patient003_frame01.nii.gz "
                                                "changed, patient003_frame04.nii.gz changed"},
      "added": ["patient006"], "removed": ["patient002"], "other_entries": False}
  assert report["unchanged_subjects"] == 3
  assert sorted(prepare.prepared_attributes(output)) == [
      "patient001", "patient003", "patient004", "patient005", "patient006"]
  assert prepare.prepared_attributes(output)["patient003"]["group"] == "HCM"
  # The same dataset, byte for byte, as a fresh preparation of the cohort as it is now.
  fresh = str(tmp_path / "fresh")
  expected = prepare.prepare_dataset(root, fresh, SMALL, verbose=False)
  for name in (prepare.ATTRIBUTES, prepare.SPLITS):
    with open(os.path.join(output, name), "rb") as f, open(os.path.join(fresh, name), "rb") as g:
      assert f.read() == g.read(), name
  assert report["subjects"] == expected["subjects"]
  ours, theirs = _dataset(output), _dataset(fresh)
  assert ours.keys() == theirs.keys()
  for subject, example in ours.items():
    for key in ("image", "label", "slice_index", "group"):
      np.testing.assert_array_equal(example[key], theirs[subject][key])
  assert sorted(os.listdir(output)) == ["attributes.csv", "report.json", "splits.json", "tfds"]
  # Unchanged now: nothing to do; a changed file of a skipped subject counts as well.
  assert prepare.prepare_dataset(root, output, SMALL, verbose=True) == report
  assert "inputs unchanged), nothing to do" in capsys.readouterr().out


def test_training_data_cache_follows_the_cohort(tmp_path, monkeypatch):
  """The prepared cache a training run reads (`experiments.common.prepared_dir`) is prepared
  again when subjects of its cohort are deleted or changed, not served as it was."""
  from experiments import common
  root = str(tmp_path / "raw")
  _cohort(root, ("patient001", "patient002", "patient003", "patient004"))
  config = ml_collections.ConfigDict({"data": {
      "dataset": "acdc", "source_dir": root, "prepared_dir": "", "cache_dir": str(tmp_path),
      "prepare": {"image_size": 32, "spacing_mm": 2.0, "slice_rule": "acdc_basal",
                  "label_convention": "acdc", "split_seed": 0}}})
  directory = common.prepared_dir(config)
  assert len(prepare.prepared_attributes(directory)) == 4
  shutil.rmtree(os.path.join(root, "training", "patient001"))
  assert common.prepared_dir(config) == directory
  assert sorted(prepare.prepared_attributes(directory)) == ["patient002", "patient003",
                                                            "patient004"]


def test_cine_preparation_follows_its_inputs(tmp_path):
  root, output = str(tmp_path / "ukbb"), str(tmp_path / "out")
  for name in ("1000001", "1000002", "1000003"):
    os.makedirs(os.path.join(root, name))
    for file_name, content in UKBB_PHANTOMS.items():
      with open(os.path.join(root, name, file_name), "wb") as f:
        f.write(gzip.compress(content, mtime=0))
  os.symlink(os.path.join(root, "missing"), os.path.join(root, "1000004"))
  config = cine.CineConfig(num_frames=4, image_size=16, spacing_mm=4.0, long_axis=False)
  first = cine.prepare_cine_dataset(root, output, config, dataset="ukbb",
                                    split_fractions=(0.34, 0.33, 0.33))
  entries = {e["subject"]: e for e in first["subjects"]}
  assert entries["1000004"]["status"] == "skipped"
  assert "1000004: is a symbolic link to" in entries["1000004"]["reason"]
  assert first["counts"]["prepared"] == 3
  shutil.rmtree(os.path.join(root, "1000003"))
  sa = os.path.join(root, "1000002", cine.UKBB_SHORT_AXIS)
  image = nib.load(sa)
  nib.save(nib.Nifti1Image(np.asarray(image.dataobj) * 2, image.affine), sa)
  second = cine.prepare_cine_dataset(root, output, config, dataset="ukbb",
                                     split_fractions=(0.34, 0.33, 0.33))
  assert second["changes"]["removed"] == ["1000003"]
  assert list(second["changes"]["changed"]) == ["1000002"]
  assert second["unchanged_subjects"] == 1 and second["counts"]["prepared"] == 2
  assert cine.prepare_cine_dataset(root, output, config, dataset="ukbb",
                                   split_fractions=(0.34, 0.33, 0.33)) == second


# ----------------------------------------------------------------------------- folder entries

def test_every_entry_that_looks_like_a_subject_is_prepared_or_reported(tmp_path):
  root = str(tmp_path / "raw")
  write_subject(root, "patient001", group="NOR", seed=1)
  write_subject(root, "patient002", group="DCM", seed=2)
  write_subject(root, "patient050", group="HCM", seed=3, partition="")    # beside training/
  training = os.path.join(root, "training")
  os.symlink("patient060", os.path.join(training, "patient060"))           # a loop
  os.symlink(os.path.join(root, "gone"), os.path.join(training, "patient061"))
  with open(os.path.join(training, "patient062"), "w") as f:
    f.write("not a folder")
  shutil.copytree(os.path.join(training, "patient001"), os.path.join(training, "subject07"))
  # A link to another subject's folder: read, and its files (patient002_*) are not its own.
  os.symlink(os.path.join(training, "patient002"), os.path.join(training, "patient070"))
  for ignored in (".DS_Store", "README.txt"):
    with open(os.path.join(training, ignored), "w") as f:
      f.write("x")
  report = prepare.prepare_dataset(root, str(tmp_path / "out"), SMALL, verbose=False)
  entries = {e["subject"]: e for e in report["subjects"]}
  assert sorted(entries) == ["patient001", "patient002", "patient050", "patient060",
                             "patient061", "patient062", "patient070", "subject07"]
  for subject in ("patient001", "patient002", "patient050"):
    assert entries[subject]["status"] == "prepared", entries[subject]
  assert entries["patient050"]["directory"] == os.path.join(root, "patient050")
  expected = {"patient060": "training/patient060: is a symbolic link loop",
              "patient061": "training/patient061: is a symbolic link to .*gone, which does "
                            "not exist",
              "patient062": "training/patient062: is a file, not a subject folder",
              "patient070": r"patient070_frame01\.nii\.gz: file is missing",
              "subject07": "training/subject07: holds subject files .* but its name is not a "
                           "subject id"}
  for subject, pattern in expected.items():
    assert entries[subject]["status"] == "skipped"
    assert re.search(pattern, entries[subject]["reason"]), entries[subject]["reason"]


# ----------------------------------------------------------------------------- arguments

class _Counting:
  def __init__(self):
    self.calls = 0
    self.real = tfds_builders.run_subject

  def __call__(self, *args, **kwargs):
    self.calls += 1
    return self.real(*args, **kwargs)


def test_prepare_arguments_are_checked_before_any_write(tmp_path, monkeypatch):
  root, output = str(tmp_path / "raw"), str(tmp_path / "out")
  _cohort(root, ("patient001", "patient002", "patient003"))
  counting = _Counting()
  monkeypatch.setattr(tfds_builders, "run_subject", counting)
  empty = str(tmp_path / "empty")
  os.makedirs(empty)
  cases = [
      (dict(input_dir=empty), InvalidInputError, r"empty: the input directory is empty"),
      (dict(split_seed=-1), ValueError, r"split_seed must be an integer >= 0, got -1"),
      (dict(split_fractions=(0.5, 0.5, 0.5)), ValueError, "summing to 1"),
      (dict(bounds="lv_ef=2:90"), ValueError, "bounds must be PlausibilityBounds"),
      (dict(output_dir=os.path.join(root, "training", "patient001", "Info.cfg")),
       InvalidArgumentError, r"Info\.cfg exists and is not a folder"),
      (dict(output_dir=root), InvalidArgumentError, "is the input directory"),
  ]
  for overrides, error, message in cases:
    arguments = {"input_dir": root, "output_dir": output, **overrides}
    with pytest.raises(error, match=message):
      prepare.prepare_dataset(arguments.pop("input_dir"), arguments.pop("output_dir"), SMALL,
                              verbose=False, **arguments)
    assert not os.path.exists(output) and counting.calls == 0, overrides
  # A read-only place to write: refused before anything is written.
  real_access = os.access
  monkeypatch.setattr(prepare.os, "access",
                      lambda path, mode: False if path == str(tmp_path) else
                      real_access(path, mode))
  with pytest.raises(InvalidArgumentError, match=r"cannot write into .* \(permission denied or "
                                                 r"a read-only file system\)"):
    prepare.prepare_dataset(root, output, SMALL, verbose=False)
  monkeypatch.setattr(prepare.os, "access", real_access)
  assert not os.path.exists(output) and counting.calls == 0
  # The corrected rerun prepares.
  assert prepare.prepare_dataset(root, output, SMALL, verbose=False)["counts"]["prepared"] == 3


def test_a_failed_preparation_never_refuses_the_corrected_rerun(tmp_path, monkeypatch):
  root, output = str(tmp_path / "raw"), str(tmp_path / "out")
  _cohort(root, ("patient001", "patient002", "patient003"))
  # A write that fails (a read-only file system met once writing starts): a clear error, and
  # the output folder this run created is gone again.
  real_makedirs = os.makedirs

  def read_only(path, *args, **kwargs):
    if os.path.abspath(path).startswith(output):
      raise PermissionError(13, "Permission denied", path)
    return real_makedirs(path, *args, **kwargs)

  monkeypatch.setattr(prepare.os, "makedirs", read_only)
  with pytest.raises(InvalidArgumentError, match=r"out: Permission denied; rerun once this is "
                                                 r"fixed"):
    prepare.prepare_dataset(root, output, SMALL, verbose=False)
  monkeypatch.setattr(prepare.os, "makedirs", real_makedirs)
  assert not os.path.exists(output)
  # No subject preparable from a wrong input folder: the work area it leaves does not refuse
  # the run on the right folder (another configuration).
  wrong = str(tmp_path / "wrong")
  for subject in ("patient001", "patient002"):
    os.remove(os.path.join(write_subject(wrong, subject), "Info.cfg"))
  with pytest.raises(InvalidInputError, match="none of the 2 subjects could be prepared"):
    prepare.prepare_dataset(wrong, output, SMALL, verbose=False)
  assert os.listdir(output) == [prepare.WORK_DIR]
  assert prepare.prepare_dataset(root, output, SMALL, verbose=False)["counts"]["prepared"] == 3
  # An output of an older format version of the same configuration is prepared again.
  path = os.path.join(output, prepare.REPORT)
  with open(path) as f:
    report = json.load(f)
  report["config"]["format_version"] = 1
  report["config"].pop("plausibility")
  with open(path, "w") as f:
    json.dump(report, f)
  again = prepare.prepare_dataset(root, output, SMALL, verbose=False)
  assert again["config"]["format_version"] == prepare.FORMAT_VERSION
  assert again["counts"]["prepared"] == 3


# ----------------------------------------------------------------------------- memory

def test_label_declaring_a_huge_volume_is_refused_from_its_header(tmp_path):
  """A small label file declaring 256 x 256 x 64 float64 (32 MiB; the issue's 2048 x 2048 x 128
  scaled down) beside a 48 x 44 x 6 image: refused from the headers, without inflating it."""
  directory = write_subject(str(tmp_path), "patient001", partition="")
  path = os.path.join(directory, "patient001_frame01_gt.nii.gz")
  huge = nib.Nifti1Image(np.zeros((256, 256, 64)), np.diag([*SPACING, 1.0]))
  with gzip.open(path, "wb", compresslevel=1) as f:
    f.write(huge.to_bytes())
  assert os.path.getsize(path) < 200_000
  tracemalloc.start()
  try:
    with pytest.raises(InvalidInputError, match=r"frame01_gt\.nii\.gz: label shape \(256, 256, "
                                                r"64\) does not match image"):
      acdc.load_subject(directory)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < 4_000_000, peak

