"""Reader for cohorts in the ACDC layout (Automated Cardiac Diagnosis Challenge, MICCAI 2017).

Layout (the ACDC challenge distribution):
```
<root>/training/patient001/Info.cfg                  ED, ES, Group, Height, NbFrame, Weight
<root>/training/patient001/patient001_4d.nii.gz      (X, Y, Z, T) cine stack
<root>/training/patient001/patient001_frame01.nii.gz (X, Y, Z) frame, 1-based 2-digit number
<root>/training/patient001/patient001_frame01_gt.nii.gz   its labels
<root>/testing/patient101/...
```
The ED and ES frame numbers are read from Info.cfg (ED is not always frame 1: patient090 has
ED at frame 4). Spacing comes from the NIfTI header; any image size, slice and frame count is
accepted. Label maps are remapped from the cohort's convention (a parameter: "acdc", "ukbb",
"mnms") to the canonical one of `cardiac_jax.structures`.

Every file is treated as possibly hostile (a cohort of 70,000 subjects always holds some broken
ones): every problem raises `InvalidInputError` naming the file and the problem, and no input
can make a reader allocate without bound or block; NIfTI files are decoded by `nifti`, which
checks the header before any voxel is read.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import re
import stat
from typing import Optional

import numpy as np

from cardiac_jax import structures
from data_pipelines import plausibility
from data_pipelines.errors import InvalidInputError
from data_pipelines.errors import printable_path
from data_pipelines.nifti import (NiftiHeader, NiftiVolume, check_same_grid, check_same_shape,
                                  open_regular_file, read_nifti, read_nifti_header)

PARTITIONS = ("training", "testing")
# re.ASCII: "\d" would otherwise accept any Unicode digit ("patient١٢") as a subject id.
_SUBJECT_DIR = re.compile(r"^patient\d+$", re.ASCII)
# ACDC names the abnormal-RV group "RV"; some copies of the data spell it "ARV".
_GROUP_ALIASES = {"ARV": "RV"}
_REQUIRED_INFO_KEYS = ("ED", "ES", "Group", "NbFrame", "Height", "Weight")
# A real Info.cfg is about 80 bytes; anything this large is not one, and is not read whole.
MAX_INFO_CFG_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class SubjectInfo:
  """Contents of one Info.cfg. Frame numbers are 1-based as in the file."""
  ed_frame: int
  es_frame: int
  group: str
  num_frames: int
  height_cm: float
  weight_kg: float


@dataclasses.dataclass(frozen=True)
class SubjectRef:
  """Where one subject of a cohort lives."""
  subject: str        # e.g. "patient001"
  partition: str      # "training", "testing", or "" for subject folders directly under root
  directory: str


@dataclasses.dataclass(frozen=True)
class RejectedEntry:
  """A folder of a cohort that looks like a subject but cannot be one (e.g. its name is not
  valid UTF-8). `name` is printable: undecodable bytes are shown as backslash escapes."""
  name: str
  directory: str
  reason: str


@dataclasses.dataclass
class AcdcSubject:
  """One subject's ED and ES frames with canonical labels.

  Arrays are (X, Y, Z) in NIfTI voxel order: images float32, labels uint8 canonical;
  `cine` (X, Y, Z, T) float32 when requested. `spacing_mm` is (dx, dy, dz).
  """
  subject: str
  info: SubjectInfo
  ed_image: np.ndarray
  ed_labels: np.ndarray
  es_image: np.ndarray
  es_labels: np.ndarray
  spacing_mm: tuple[float, float, float]
  cine: Optional[np.ndarray] = None



# ----------------------------------------------------------------------------- cohort listing

def entry_problem(path: str) -> Optional[str]:
  """Why the folder entry `path` cannot be a subject folder, or None when it is a directory
  (directly or through a symbolic link)."""
  try:
    mode = os.stat(path).st_mode
  except OSError as e:
    if os.path.islink(path):
      if e.errno == errno.ELOOP:
        return "is a symbolic link loop"
      try:
        target = printable_path(os.readlink(path))
      except OSError:
        target = "?"
      if e.errno == errno.ENOENT:
        return f"is a symbolic link to {target}, which does not exist"
      return f"is a symbolic link to {target}, which cannot be accessed ({e.strerror})"
    return f"cannot be accessed ({e.strerror})"
  if stat.S_ISDIR(mode):
    return None
  if stat.S_ISREG(mode):
    return "is a file, not a subject folder"
  return "is not a folder (a device, pipe or socket)"


def _holds_subject_files(path: str) -> bool:
  """Whether a folder holds an Info.cfg or NIfTI files, i.e. looks like a subject's."""
  try:
    with os.scandir(path) as entries:
      return any(e.name == "Info.cfg" or e.name.endswith((".nii", ".nii.gz"))
                 for e in entries)
  except OSError:
    return False


def find_subjects(root: str) -> tuple[list[SubjectRef], list[RejectedEntry]]:
  """Subject folders of an ACDC-layout cohort, and entries rejected as subjects.

  Looks in root/training, root/testing and in root itself (subject folders beside training/
  are subjects too); subjects are sorted by partition (training, testing, then the root) and
  name. Every
  entry that looks like a subject is either a subject or rejected with a reason, so a cohort
  job can report it: entries named like one (starting with "patient") that are not folders
  (plain files, symbolic link loops, links to missing targets, devices), folders whose name is
  not valid UTF-8 or starts with "patient" without being `patient<digits>`, and folders with
  another name that hold an Info.cfg or NIfTI files. Hidden entries and other files are not
  subjects and are ignored.
  """
  if not os.path.isdir(root):
    raise InvalidInputError(f"{printable_path(root)}: cohort directory does not exist")
  partitions = [p for p in PARTITIONS if os.path.isdir(os.path.join(root, p))]
  refs, rejected = [], []
  for partition in [*partitions, ""]:
    folder = os.path.join(root, partition)
    try:
      names = sorted(os.listdir(folder))
    except OSError as e:
      raise InvalidInputError(f"{printable_path(folder)}: cannot list ({e.strerror})") from None
    for name in names:
      if name.startswith(".") or (not partition and name in partitions):
        continue
      path = os.path.join(folder, name)
      shown, shown_path = printable_path(name), printable_path(path)
      named_like_subject = shown.lower().startswith("patient")
      problem = entry_problem(path)
      if problem is not None:
        if named_like_subject:
          rejected.append(RejectedEntry(name=shown, directory=shown_path,
                                        reason=f"{shown_path}: {problem}"))
        continue
      if shown != name:
        rejected.append(RejectedEntry(
            name=shown, directory=shown_path,
            reason=f"{shown_path}: folder name is not valid UTF-8 text"))
      elif _SUBJECT_DIR.match(name):
        refs.append(SubjectRef(subject=name, partition=partition, directory=path))
      elif named_like_subject:
        rejected.append(RejectedEntry(
            name=name, directory=path,
            reason=f"{path}: folder name is not a subject id of the form patient<digits>"))
      elif _holds_subject_files(path):
        rejected.append(RejectedEntry(
            name=name, directory=path,
            reason=f"{path}: holds subject files (Info.cfg or NIfTI) but its name is not a "
                   "subject id of the form patient<digits>"))
  return refs, rejected


def list_subjects(root: str) -> list[SubjectRef]:
  """Subject folders of an ACDC-layout cohort, sorted by partition then subject id.

  Raises InvalidInputError when there is none (see `find_subjects` for what counts).
  """
  refs, rejected = find_subjects(root)
  if not refs:
    also = f" ({len(rejected)} folders rejected, e.g. {rejected[0].reason})" if rejected else ""
    raise InvalidInputError(
        f"{printable_path(root)}: no patientXXX folders found (expected "
        f"{printable_path(root)}/training/patient001/... as in the ACDC release){also}")
  return refs


# ----------------------------------------------------------------------------- Info.cfg


def parse_info_cfg(path: str) -> SubjectInfo:
  """Parses an ACDC Info.cfg (`key: value` lines) and checks it is consistent.

  Rejected, with the file and the problem named: a missing, oversized, binary or non-UTF-8
  file; lines that are not `key: value`; a key given twice; a missing key; ED, ES, NbFrame not
  positive integers; Height, Weight not positive finite numbers; an unknown Group; ED or ES
  beyond NbFrame; ED equal to ES (a single-phase series); NbFrame below 2. Unknown keys are
  ignored.
  """
  shown = printable_path(path)
  with open_regular_file(path, "Info.cfg") as f:
    try:
      raw = f.read(MAX_INFO_CFG_BYTES + 1)
    except OSError as e:
      raise InvalidInputError(f"{shown}: cannot read Info.cfg ({e.strerror})") from None
  if len(raw) > MAX_INFO_CFG_BYTES:
    raise InvalidInputError(f"{shown}: Info.cfg is larger than {MAX_INFO_CFG_BYTES} bytes; "
                            "not an ACDC Info.cfg")
  try:
    # utf-8-sig: a byte-order mark written by some editors is not part of the first key.
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise InvalidInputError(f"{shown}: Info.cfg is not UTF-8 text (byte "
                            f"{raw[e.start]:#04x} at offset {e.start})") from None
  control = [c for c in text if ord(c) < 32 and c not in "\t\r\n"]
  if control:
    raise InvalidInputError(f"{shown}: Info.cfg holds binary data (control character "
                            f"{ord(control[0]):#04x})")
  values, first_line = {}, {}
  for line_number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    key, sep, value = line.partition(":")
    if not sep:
      raise InvalidInputError(f"{shown}: line {line_number} is not 'key: value': {line!r}")
    key = key.strip()
    if key in values:
      raise InvalidInputError(f"{shown}: key {key!r} appears twice (lines "
                              f"{first_line[key]} and {line_number})")
    values[key] = value.strip()
    first_line[key] = line_number
  missing = [k for k in _REQUIRED_INFO_KEYS if k not in values]
  if missing:
    raise InvalidInputError(f"{shown}: Info.cfg lacks {', '.join(missing)}")

  def number(key: str, kind: type):
    try:
      value = float(values[key])
    except ValueError:
      raise InvalidInputError(f"{shown}: {key} is not a number: {values[key]!r}") from None
    if not math.isfinite(value) or value <= 0:
      raise InvalidInputError(f"{shown}: {key} must be positive and finite, got "
                              f"{values[key]!r}")
    if kind is int:
      if value != int(value):
        raise InvalidInputError(f"{shown}: {key} is not an integer: {values[key]!r}")
      return int(value)
    return value

  info = SubjectInfo(
      ed_frame=number("ED", int), es_frame=number("ES", int),
      group=_GROUP_ALIASES.get(values["Group"], values["Group"]),
      num_frames=number("NbFrame", int), height_cm=number("Height", float),
      weight_kg=number("Weight", float))
  if info.group not in structures.GROUPS:
    raise InvalidInputError(f"{shown}: unknown Group {values['Group']!r}; expected one of "
                            f"{list(structures.GROUPS)}")
  for key, frame in (("ED", info.ed_frame), ("ES", info.es_frame)):
    if frame > info.num_frames:
      raise InvalidInputError(f"{shown}: {key} frame {frame} exceeds NbFrame {info.num_frames}")
  if info.num_frames < 2:
    raise InvalidInputError(f"{shown}: NbFrame is {info.num_frames}; a cine series needs at "
                            "least 2 frames")
  if info.ed_frame == info.es_frame:
    raise InvalidInputError(f"{shown}: ED and ES are the same frame ({info.ed_frame}); "
                            "volumes and ejection fraction need two phases")
  return info


# ----------------------------------------------------------------------------- subject files


def _nifti_path(directory: str, stem: str) -> str:
  """The .nii.gz (or uncompressed .nii) file for `stem`; raises naming the expected file."""
  for extension in (".nii.gz", ".nii"):
    path = os.path.join(directory, stem + extension)
    if os.path.lexists(path):
      return path
  raise InvalidInputError(
      f"{printable_path(os.path.join(directory, stem + '.nii.gz'))}: file is missing")



def _frame_paths(directory: str, subject: str, frame: int) -> tuple[str, str]:
  """(image path, label path) of one annotated frame; raises naming a missing file."""
  stem = f"{subject}_frame{frame:02d}"
  return _nifti_path(directory, stem), _nifti_path(directory, stem + "_gt")


def _check_frame_header(header: NiftiHeader, path: str) -> None:
  if len(header.shape) == 4 and header.shape[3] != 1:
    raise InvalidInputError(f"{printable_path(path)}: expected a (X, Y, Z) frame, got shape "
                            f"{header.shape}")


def _load_frame(image_path: str, labels_path: str, label_convention: str,
                ) -> tuple[NiftiVolume, np.ndarray]:
  """Image volume and canonical labels (uint8, (X, Y, Z)) of one annotated frame."""
  image = read_nifti(image_path)
  labels = read_nifti(labels_path)
  if image.data.ndim == 4:
    image = dataclasses.replace(image, data=image.data[..., 0])
  check_same_grid(labels, labels_path, image, image_path, "label", "image")
  try:
    canonical = structures.remap_labels(labels.data[..., 0] if labels.data.ndim == 4
                                        else labels.data, label_convention)
  except ValueError as e:
    raise InvalidInputError(f"{printable_path(labels_path)}: {e}") from None
  return image, canonical


def load_subject(ref: SubjectRef | str, label_convention: str = "acdc",
                 load_cine: bool = False) -> AcdcSubject:
  """Loads the ED and ES frames (and optionally the 4D cine) of one subject folder.

  The frames and labels must share one voxel grid (`check_same_grid`, shapes compared from
  the headers before any voxel is decoded); the cine, when loaded, too, with at least 2 frames
  and at least max(ED, ES). No image frame may be blank or constant.
  """
  directory = ref.directory if isinstance(ref, SubjectRef) else str(ref)
  subject = os.path.basename(os.path.normpath(directory))
  info = parse_info_cfg(os.path.join(directory, "Info.cfg"))
  ed_path, ed_labels_path = _frame_paths(directory, subject, info.ed_frame)
  es_path, es_labels_path = _frame_paths(directory, subject, info.es_frame)
  # Every header is read and the shapes compared before any voxel is decoded: a label file
  # that declares another (possibly huge) volume is refused without inflating it.
  ed_header = read_nifti_header(ed_path)
  for path, what, reference, reference_what in (
      (ed_labels_path, "label", ed_path, "image"),
      (es_path, f"ES frame {info.es_frame}", ed_path, f"ED frame {info.ed_frame}"),
      (es_labels_path, "label", es_path, "image")):
    header = read_nifti_header(path)
    _check_frame_header(header, path)
    check_same_shape(header.shape, path, ed_header.shape, reference, what, reference_what)
  _check_frame_header(ed_header, ed_path)
  cine_path = _nifti_path(directory, f"{subject}_4d") if load_cine else None
  if cine_path is not None:
    check_same_shape(read_nifti_header(cine_path).shape, cine_path, ed_header.shape, ed_path,
                     "cine", "ED frame")
  ed, ed_labels = _load_frame(ed_path, ed_labels_path, label_convention)
  es, es_labels = _load_frame(es_path, es_labels_path, label_convention)
  check_same_grid(es, es_path, ed, ed_path, f"ES frame {info.es_frame}",
                  f"ED frame {info.ed_frame}")
  for volume, path, phase, frame in ((ed, ed_path, "ED", info.ed_frame),
                                     (es, es_path, "ES", info.es_frame)):
    try:
      plausibility.check_not_constant(volume.data, f"{phase} image (frame {frame})")
    except InvalidInputError as e:
      raise InvalidInputError(f"{printable_path(path)}: {e}") from None
  cine = None
  if cine_path is not None:
    cine_volume = read_nifti(cine_path)
    cine = cine_volume.data
    shown = printable_path(cine_path)
    if cine.ndim != 4:
      raise InvalidInputError(f"{shown}: expected a (X, Y, Z, T) cine, got shape {cine.shape}")
    check_same_grid(cine_volume, cine_path, ed, ed_path, "cine", "ED frame")
    if cine.shape[3] < 2:
      raise InvalidInputError(f"{shown}: a single-frame series ({cine.shape}); a cine needs at "
                              "least 2 frames")
    if cine.shape[3] < max(info.ed_frame, info.es_frame):
      raise InvalidInputError(f"{shown}: only {cine.shape[3]} frames, but ED/ES are "
                              f"{info.ed_frame}/{info.es_frame}")
    try:
      plausibility.check_frames_not_constant(cine, "cine")
    except InvalidInputError as e:
      raise InvalidInputError(f"{shown}: {e}") from None
  return AcdcSubject(subject=subject, info=info, ed_image=ed.data, ed_labels=ed_labels,
                     es_image=es.data, es_labels=es_labels,
                     spacing_mm=tuple(ed.spacing_mm), cine=cine)
