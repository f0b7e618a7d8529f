"""Property-based tests: the ACDC readers on random hostile input (hypothesis).

Random bytes, random NIfTI files (shapes with empty axes, many voxel types, singular or NaN
affines, zero/negative/NaN spacing, fuzzed header bytes, truncation, gzip or not) and random
Info.cfg text go to `nifti.load_nifti`, `acdc.parse_info_cfg` and, assembled into subject
folders, to `acdc.load_subject` and `tfds_builders.prepare_subject`. Every failure must be an
`InvalidInputError` naming the file (never another exception type, never a hang: each call runs
under an alarm), and every accepted input must give sane output (finite spacing > 0, shapes and
dtypes as documented, the voxel values that were written). Well-formed but hostile subject
folders (headers in other spatial units, ED and ES exchanged, blank frames, implausible
segmentations, huge label headers) must be refused or give the reference's measurements, and
random cohort roots must have every entry that looks like a subject found or rejected. The
number of inputs tried is printed by the last test, for the README's reliability section.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tempfile

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import nibabel as nib
import numpy as np
import pytest

from cardiac_jax import structures
from data_pipelines import acdc
from data_pipelines import nifti as nii
from data_pipelines import preprocess
from data_pipelines import tfds_builders
from tests.test_acdc_reader import ED_RADII_MM
from tests.test_acdc_reader import ES_SCALE
from tests.test_acdc_reader import phantom_image
from tests.test_acdc_reader import phantom_labels
from tests.hostile_files import PROPERTY_SETTINGS
from tests.hostile_files import REJECTED
from tests.hostile_files import TRIED
from tests.hostile_files import _call
from tests.hostile_files import _no_hang
from tests.hostile_files import draw_file
from tests.hostile_files import nifti_files
from tests.hostile_files import write_folder

SMALL = preprocess.PreprocessConfig(image_size=16, spacing_mm=3.0)


def _write(directory: str, name: str, content: bytes, gzipped: bool) -> str:
  path = os.path.join(directory, name + (".nii.gz" if gzipped else ".nii"))
  with open(path, "wb") as f:
    f.write(gzip.compress(content, compresslevel=1) if gzipped else content)
  return path


def _check_volume(data, spacing, path):
  assert isinstance(data, np.ndarray) and data.dtype == np.float32, path
  assert data.ndim in (3, 4) and min(data.shape) > 0, (path, data.shape)
  assert np.all(np.isfinite(data)), path
  assert len(spacing) == 3 and all(np.isfinite(s) and s > 0 for s in spacing), (path, spacing)


@PROPERTY_SETTINGS
@given(nifti=nifti_files(), gzipped=st.booleans())
def test_load_nifti_random_headers_and_arrays(nifti, gzipped):
  content, array, pristine = nifti
  with tempfile.TemporaryDirectory() as directory:
    path = _write(directory, "volume", content, gzipped)
    result = _call("load_nifti: random NIfTI headers/arrays", nii.load_nifti, path, path=path)
  if result is None:
    return
  data, spacing = result
  _check_volume(data, spacing, path)
  if pristine:
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(content[:348]))
    slope, inter = header.get_slope_inter()
    expected = array.astype(np.float32)
    if slope is not None:
      expected = expected * np.float32(slope) + np.float32(inter)
    np.testing.assert_array_equal(data.reshape(-1), expected.reshape(-1))
    assert data.shape[:3] == array.shape[:3]
    np.testing.assert_allclose(spacing, [float(str(p)) for p in header["pixdim"][1:4]])


@PROPERTY_SETTINGS
@given(content=st.binary(max_size=2048), gzipped=st.booleans(),
       compress=st.booleans())
def test_load_nifti_random_bytes(content, gzipped, compress):
  with tempfile.TemporaryDirectory() as directory:
    path = os.path.join(directory, "volume.nii.gz" if gzipped else "volume.nii")
    with open(path, "wb") as f:
      f.write(gzip.compress(content) if compress else content)
    result = _call("load_nifti: random bytes", nii.load_nifti, path, path=path)
  if result is not None:
    _check_volume(*result, path)


# ----------------------------------------------------------------------------- Info.cfg

INFO_KEYS = ("ED", "ES", "Group", "NbFrame", "Height", "Weight")
NUMBER_TEXT = st.one_of(st.integers(-3, 40).map(str), st.floats(allow_nan=True).map(str),
                        st.sampled_from(["1e400", "nan", "-inf", "0x10", "1_0", " 7 ", "",
                                         "12.0", "3.5"]),
                        st.text(max_size=6))
VALUE_TEXT = {"Group": st.one_of(st.sampled_from([*structures.GROUPS, "ARV", "nor", ""]),
                                 st.text(max_size=5))}


@st.composite
def info_cfg_texts(draw):
  """Random Info.cfg bytes: key/value lines with hostile values, shuffled, duplicated or
  missing keys, odd separators, or plain random bytes."""
  mode = draw(st.integers(0, 5))
  if mode == 0:
    return draw(st.binary(max_size=300))
  if mode >= 3:
    # A valid file with (mostly) one hostile edit: a value replaced, a line dropped or doubled.
    lines = _info_text(draw(valid_info()), draw(st.permutations(INFO_KEYS))).decode().split("\n")
    edit = draw(st.sampled_from(["none", "value", "drop", "double", "bytes"]))
    index = draw(st.integers(0, len(INFO_KEYS) - 1))
    key = lines[index].split(":")[0]
    if edit == "value":
      lines[index] = f"{key}: {draw(VALUE_TEXT.get(key, NUMBER_TEXT))}"
    elif edit == "drop":
      del lines[index]
    elif edit == "double":
      lines.append(lines[index])
    encoded = "\n".join(lines).encode("utf-8", "surrogatepass")
    if edit == "bytes":
      position = draw(st.integers(0, len(encoded)))
      encoded = encoded[:position] + draw(st.binary(min_size=1, max_size=4)) + encoded[position:]
    return encoded
  lines = []
  for key in draw(st.lists(st.sampled_from(INFO_KEYS + ("Extra", "ED ", "")), max_size=9)):
    value = draw(VALUE_TEXT.get(key, NUMBER_TEXT))
    lines.append(f"{key}{draw(st.sampled_from([':', ': ', ' : ', '=', '']))}{value}")
  text = draw(st.sampled_from(["\n", "\r\n"])).join(lines)
  encoded = text.encode("utf-8", "surrogatepass")
  if draw(st.booleans()):
    encoded = draw(st.sampled_from([b"\xef\xbb\xbf", b"", b"\xff", b"\x00"])) + encoded
  return encoded


@st.composite
def valid_info(draw):
  num_frames = draw(st.integers(2, 35))
  ed, es = draw(st.lists(st.integers(1, num_frames), min_size=2, max_size=2, unique=True))
  return acdc.SubjectInfo(ed_frame=ed, es_frame=es, group=draw(st.sampled_from(
      structures.GROUPS)), num_frames=num_frames, height_cm=draw(st.floats(100, 220)),
                          weight_kg=draw(st.floats(30, 200)))


def _info_text(info: acdc.SubjectInfo, order) -> bytes:
  values = {"ED": info.ed_frame, "ES": info.es_frame, "Group": info.group,
            "NbFrame": info.num_frames, "Height": repr(info.height_cm),
            "Weight": repr(info.weight_kg)}
  return "".join(f"{k}: {values[k]}\n" for k in order).encode()


def _check_info(info, path):
  assert info.group in structures.GROUPS, path
  assert 1 <= info.ed_frame <= info.num_frames and 1 <= info.es_frame <= info.num_frames
  assert info.ed_frame != info.es_frame and info.num_frames >= 2
  assert np.isfinite(info.height_cm) and info.height_cm > 0
  assert np.isfinite(info.weight_kg) and info.weight_kg > 0


@PROPERTY_SETTINGS
@given(content=info_cfg_texts())
def test_parse_info_cfg_random_text(content):
  with tempfile.TemporaryDirectory() as directory:
    path = os.path.join(directory, "Info.cfg")
    with open(path, "wb") as f:
      f.write(content)
    info = _call("parse_info_cfg: random text", acdc.parse_info_cfg, path, path=path)
  if info is not None:
    _check_info(info, path)


@settings(PROPERTY_SETTINGS, max_examples=60)
@given(info=valid_info(), order=st.permutations(INFO_KEYS))
def test_parse_info_cfg_accepts_every_valid_file(info, order):
  with tempfile.TemporaryDirectory() as directory:
    path = os.path.join(directory, "Info.cfg")
    with open(path, "wb") as f:
      f.write(_info_text(info, order))
    TRIED["parse_info_cfg: valid files (must be accepted)"] += 1
    assert acdc.parse_info_cfg(path) == info


# ----------------------------------------------------------------------------- subject folders

PHANTOM_LABELS = {"ed": phantom_labels(ED_RADII_MM),
                  "es": phantom_labels(tuple(r * ES_SCALE for r in ED_RADII_MM))}


def _phantom_nifti(kind: str, gt: bool) -> bytes:
  labels = PHANTOM_LABELS[kind]
  data = labels if gt else phantom_image(labels, 0)
  image = nib.Nifti1Image(data, np.diag([1.5, 1.6, 8.0, 1.0]))
  return image.to_bytes()


PHANTOM_FILES = {(kind, gt): _phantom_nifti(kind, gt) for kind in ("ed", "es")
                 for gt in (False, True)}


@st.composite
def subject_folders(draw):
  """{file name: bytes or None (absent)} of a subject folder: each file valid, replaced by a
  random NIfTI or random bytes, or missing; Info.cfg valid or random."""
  files = {}
  # Hostile choices sit at the high end: hypothesis favours small values while shrinking.
  if draw(st.integers(0, 2)) == 2:
    files["Info.cfg"] = draw(info_cfg_texts())
  else:
    files["Info.cfg"] = b"ED: 1\nES: 4\nGroup: DCM\nHeight: 170\nNbFrame: 6\nWeight: 70\n"
  for frame, kind in ((1, "ed"), (4, "es")):
    for gt in (False, True):
      name = f"patient001_frame{frame:02d}{'_gt' if gt else ''}.nii.gz"
      files[name] = draw_file(draw, PHANTOM_FILES[(kind, gt)])
  return files


@PROPERTY_SETTINGS
@given(files=subject_folders(), odd_parent=st.booleans())
def test_load_and_prepare_subject_on_random_folders(files, odd_parent):
  root = tempfile.mkdtemp()
  try:
    # A parent folder whose name is not UTF-8 must not break messages or reports.
    parent = os.path.join(root, os.fsdecode(b"caf\xe9") if odd_parent else "cohort")
    directory = os.path.join(parent, "patient001")
    write_folder(directory, files)
    subject = _call("load_subject: random subject folders", acdc.load_subject, directory,
                    path=directory)
    if subject is not None:
      shape = subject.ed_image.shape
      assert len(shape) == 3 and min(shape) > 0
      for array in (subject.ed_image, subject.es_image):
        assert array.shape == shape and array.dtype == np.float32
        assert np.all(np.isfinite(array))
      for labels in (subject.ed_labels, subject.es_labels):
        assert labels.shape == shape and labels.dtype == np.uint8
        assert set(np.unique(labels).tolist()) <= {0, 1, 2, 3}
      assert all(np.isfinite(s) and s > 0 for s in subject.spacing_mm)
      _check_info(subject.info, directory)
    ref = acdc.SubjectRef(subject="patient001", partition="", directory=directory)
    outcome = _call("prepare_subject: random subject folders", tfds_builders.prepare_subject,
                    ref, SMALL, path=directory)
    if outcome is not None:
      assert subject is not None
      example = outcome.example
      assert example["image"].shape == (16, 16, 2) and example["label"].shape == (16, 16, 2)
      assert 0.0 <= example["image"].min() and example["image"].max() <= 1.0
      assert all(np.isfinite(v) for v in outcome.attributes.values())
    # The cohort-level wrapper never raises and its reason is printable as UTF-8.
    run = tfds_builders.run_subject(ref, SMALL)
    assert run.status == ("prepared" if outcome is not None else "skipped")
    assert not run.unexpected, run.reason
    (run.reason or "").encode("utf-8")
  finally:
    shutil.rmtree(root)


# ----------------------------------------------------------------------------- hostile subjects
# A valid phantom subject with one to three hostile edits that leave every file well-formed: the
# spatial unit of the headers (metres and microns must give the same heart, unknown units and
# undefined codes must not), ED and ES exchanged, blank or constant frames, implausible
# segmentations, a label header declaring a huge volume. Headers in SAME_UNITS (and a moved
# origin) keep the subject correct: it must then be prepared with the reference's measurements
# and crop; any other edit must make it a clean refusal.

# Spatial units that describe the phantom correctly, and ones that do not.
SAME_UNITS = {"mm": (2, 1.0), "unknown unit, mm numbers": (0, 1.0), "meter": (1, 1e-3),
              "micron": (3, 1e3)}
WRONG_UNITS = {"unknown unit, metre numbers": (0, 1e-3),
               "unknown unit, micron numbers": (0, 1e3), "undefined unit code": (None, 1.0)}
CONTENT_EDITS = ("ED and ES exchanged", "blank ED image", "constant ES image",
                 "ES LV of a few voxels", "no contraction", "huge label header")
# Reference of the untouched phantom subject, computed once.
_REFERENCE = {}


def _with_unit(content: bytes, code: int, per_mm: float, origin_mm=(0.0, 0.0, 0.0)) -> bytes:
  """The NIfTI `content` with its header in another spatial unit (xyzt_units `code`, numbers
  times `per_mm`) and its origin moved by `origin_mm`: the same voxels, in other numbers."""
  header = nib.Nifti1Header.from_fileobj(io.BytesIO(content[:348]), check=False)
  affine = header.get_best_affine()
  affine[:3, 3] += origin_mm
  affine[:3] *= per_mm
  spacing = [float(p) * per_mm for p in header["pixdim"][1:4]]
  header.set_sform(affine, code=1)
  header.set_qform(affine, code=1)
  header["pixdim"][1:4] = spacing
  header["xyzt_units"] = code
  return header.binaryblock + content[348:]


def _labels_file(labels: np.ndarray) -> bytes:
  return nib.Nifti1Image(labels, np.diag([1.5, 1.6, 8.0, 1.0])).to_bytes()


@st.composite
def hostile_subjects(draw):
  """(files {name: bytes}, Info.cfg text, edits applied) of a phantom subject."""
  files = {f"patient001_frame{frame:02d}{'_gt' if gt else ''}.nii": PHANTOM_FILES[(kind, gt)]
           for frame, kind in ((1, "ed"), (4, "es")) for gt in (False, True)}
  info = "ED: 1\nES: 4\nGroup: DCM\nHeight: 170\nNbFrame: 6\nWeight: 70\n"
  if draw(st.integers(0, 3)) == 3:
    # The same heart in other numbers: must be accepted (drawn less often than the hostile
    # cases, which hypothesis's preference for small values favours).
    edits, unit = [], draw(st.sampled_from(sorted(SAME_UNITS)))
  else:
    edits = draw(st.lists(st.sampled_from(CONTENT_EDITS), max_size=2, unique=True))
    unit = draw(st.sampled_from([None, *sorted(WRONG_UNITS)]))
    if unit is None and not edits:
      edits = [draw(st.sampled_from(CONTENT_EDITS))]
    elif draw(st.booleans()) and edits:
      unit = draw(st.sampled_from(sorted(SAME_UNITS)))
  origin = tuple(draw(st.integers(-800, 800)) / 4.0 for _ in range(3))
  for edit in edits:
    if edit == "ED and ES exchanged":
      info = info.replace("ED: 1", "ED: 4").replace("ES: 4", "ES: 1")
    elif edit in ("blank ED image", "constant ES image"):
      name = "patient001_frame01.nii" if edit.startswith("blank") else "patient001_frame04.nii"
      value = 0.0 if edit.startswith("blank") else draw(st.sampled_from([1.0, -3.5, 1e4]))
      image = nib.Nifti1Image(np.full(PHANTOM_LABELS["ed"].shape, value, np.float32),
                              np.diag([1.5, 1.6, 8.0, 1.0]))
      files[name] = image.to_bytes()
    elif edit == "ES LV of a few voxels":
      labels = PHANTOM_LABELS["es"].copy()
      cavity = np.argwhere(labels == structures.LV_BLOOD_POOL)
      labels[labels == structures.LV_BLOOD_POOL] = structures.LV_MYOCARDIUM
      for index in cavity[:draw(st.integers(0, 3))]:
        labels[tuple(index)] = structures.LV_BLOOD_POOL
      files["patient001_frame04_gt.nii"] = _labels_file(labels)
    elif edit == "no contraction":
      files["patient001_frame04_gt.nii"] = _labels_file(PHANTOM_LABELS["ed"])
    elif edit == "huge label header":
      header = nib.Nifti1Header.from_fileobj(
          io.BytesIO(files["patient001_frame01_gt.nii"][:348]), check=False)
      header.set_data_dtype(np.float64)
      header.set_data_shape(draw(st.sampled_from([(2048, 2048, 128), (480, 440, 60),
                                                  (48, 44, 6000)])))
      files["patient001_frame01_gt.nii"] = header.binaryblock + bytes(4 + 4096)
  if unit is not None:
    code, per_mm = {**SAME_UNITS, **WRONG_UNITS}[unit]
    code = draw(st.integers(4, 7)) if code is None else code
    files = {name: _with_unit(content, code, per_mm, origin) for name, content in files.items()}
  return files, info, (*edits, *([unit] if unit else []))


def _reference_outcome(directory_parent: str):
  if not _REFERENCE:
    directory = os.path.join(directory_parent, "reference", "patient001")
    os.makedirs(directory)
    with open(os.path.join(directory, "Info.cfg"), "w") as f:
      f.write("ED: 1\nES: 4\nGroup: DCM\nHeight: 170\nNbFrame: 6\nWeight: 70\n")
    for frame, kind in ((1, "ed"), (4, "es")):
      for gt in (False, True):
        with open(os.path.join(directory, f"patient001_frame{frame:02d}"
                                          f"{'_gt' if gt else ''}.nii"), "wb") as f:
          f.write(PHANTOM_FILES[(kind, gt)])
    ref = acdc.SubjectRef(subject="patient001", partition="", directory=directory)
    _REFERENCE["outcome"] = tfds_builders.prepare_subject(ref, SMALL)
  return _REFERENCE["outcome"]


@settings(PROPERTY_SETTINGS, max_examples=150)
@given(subject=hostile_subjects())
def test_hostile_subject_folders_are_refused_or_measured_correctly(subject):
  files, info, edits = subject
  root = tempfile.mkdtemp()
  try:
    reference = _reference_outcome(root)
    directory = os.path.join(root, "cohort", "patient001")
    os.makedirs(directory)
    with open(os.path.join(directory, "Info.cfg"), "w") as f:
      f.write(info)
    for name, content in files.items():
      with open(os.path.join(directory, name), "wb") as f:
        f.write(content)
    ref = acdc.SubjectRef(subject="patient001", partition="", directory=directory)
    outcome = _call("prepare_subject: hostile subject folders", tfds_builders.prepare_subject,
                    ref, SMALL, path=directory)
    if set(edits) <= set(SAME_UNITS):
      # Well-formed and the same heart: prepared, with the reference's numbers and crop.
      assert outcome is not None, edits
      assert outcome.attributes == pytest.approx(reference.attributes, rel=1e-6), edits
      np.testing.assert_allclose(outcome.example["image"], reference.example["image"],
                                 atol=1e-6)
      np.testing.assert_array_equal(outcome.example["label"], reference.example["label"])
    else:
      assert outcome is None, (edits, outcome.attributes)
  finally:
    shutil.rmtree(root)


# ----------------------------------------------------------------------------- cohort folders
# Random cohort roots: subject folders in training/, testing/ or at the root, and entries that
# look like subjects but cannot be (plain files, symbolic link loops, links to missing targets,
# malformed names, subject files under another name). Every entry that looks like a subject
# must come back exactly once, as a subject or as a rejected entry with a reason naming it;
# nothing else may.

ENTRY_KINDS = ("subject", "file named like a subject", "link loop", "dangling link",
               "link to a subject", "malformed name", "subject files, other name",
               "unrelated file", "hidden entry", "empty folder")


@st.composite
def cohort_layouts(draw):
  """[(folder "", "training" or "testing", entry name, kind)] with unique names per folder."""
  entries = draw(st.lists(st.tuples(st.sampled_from(["", "training", "testing"]),
                                    st.integers(1, 40), st.sampled_from(ENTRY_KINDS)),
                          min_size=1, max_size=12))
  seen, layout = set(), []
  for folder, number, kind in entries:
    name = {"malformed name": f"patient{number}b", "subject files, other name": f"case{number}",
            "unrelated file": f"notes{number}.txt", "hidden entry": f".patient{number:03d}",
            "empty folder": f"misc{number}"}.get(kind, f"patient{number:03d}")
    if (folder, name) not in seen and name not in ("training", "testing"):
      seen.add((folder, name))
      layout.append((folder, name, kind))
  return layout


@settings(PROPERTY_SETTINGS, max_examples=150)
@given(layout=cohort_layouts())
def test_every_cohort_entry_that_looks_like_a_subject_is_found_or_rejected(layout):
  root = tempfile.mkdtemp()
  try:
    expected_subjects, expected_rejected = set(), set()
    subject_folders = []
    for folder, name, kind in layout:
      parent = os.path.join(root, folder)
      os.makedirs(parent, exist_ok=True)
      path = os.path.join(parent, name)
      if kind in ("subject", "subject files, other name"):
        os.makedirs(path)
        open(os.path.join(path, "Info.cfg"), "w").close()
        subject_folders.append(path)
      elif kind == "empty folder":
        os.makedirs(path)
      elif kind == "link loop":
        os.symlink(name, path)
      elif kind == "dangling link":
        os.symlink(os.path.join(root, "nowhere", name), path)
      elif kind == "link to a subject":
        target = os.path.join(root, "targets", name)
        os.makedirs(target, exist_ok=True)
        os.symlink(target, path)
      else:
        with open(path, "w") as f:
          f.write("x")
      accepted = kind in ("subject", "link to a subject")
      looks = accepted or kind in ("file named like a subject", "link loop", "dangling link",
                                   "malformed name", "subject files, other name")
      if accepted:
        expected_subjects.add((folder, name))
      elif looks:
        expected_rejected.add(path)
    TRIED["find_subjects: random cohort folders"] += 1
    with _no_hang():
      refs, rejected = acdc.find_subjects(root)
    assert {(r.partition, r.subject) for r in refs} == expected_subjects
    assert sorted(r.directory for r in rejected) == sorted(expected_rejected)
    for entry in rejected:
      assert entry.reason.startswith(f"{entry.directory}: "), entry
    REJECTED["find_subjects: random cohort folders"] += bool(rejected)
  finally:
    shutil.rmtree(root)


def test_zz_print_number_of_hostile_inputs(capsys):
  """Prints how many random inputs the properties above tried (README reliability section)."""
  lines = [f"  {name}: {TRIED[name]} tried, {REJECTED[name]} rejected cleanly"
           for name in sorted(TRIED)]
  with capsys.disabled():
    print(f"\nproperty tests: {sum(TRIED.values())} random inputs in all\n" + "\n".join(lines))
  # Both sides of the readers were exercised: some inputs rejected, some accepted. Only the
  # properties that ran in this process count (a test distributor may split the module).
  if TRIED.get("load_nifti: random NIfTI headers/arrays"):
    assert REJECTED["load_nifti: random NIfTI headers/arrays"] > 0
  for name in ("load_subject: random subject folders",
               "prepare_subject: hostile subject folders"):
    if TRIED.get(name):
      assert TRIED[name] > REJECTED[name] > 0, name
