"""Reader for cohorts in the ACDC layout (Automated Cardiac Diagnosis Challenge, MICCAI 2017).

Layout (see /specs/data_formats.md):
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
"mnms") to the canonical one of `cardiac_jax.structures`. Every problem with a file raises
`InvalidInputError` naming the file.
"""

from __future__ import annotations

import dataclasses
import os
import re
import zlib
from typing import Optional

import nibabel as nib
import numpy as np

from cardiac_jax import structures
from data_pipelines.errors import InvalidInputError

PARTITIONS = ("training", "testing")
_SUBJECT_DIR = re.compile(r"^patient\d+$")
# ACDC names the abnormal-RV group "RV"; some copies of the data spell it "ARV".
_GROUP_ALIASES = {"ARV": "RV"}
_REQUIRED_INFO_KEYS = ("ED", "ES", "Group", "NbFrame", "Height", "Weight")


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


def list_subjects(root: str) -> list[SubjectRef]:
  """Subject folders of an ACDC-layout cohort, sorted by partition then subject id.

  Looks in root/training and root/testing; a root with patientXXX folders directly inside it
  is accepted too.
  """
  if not os.path.isdir(root):
    raise InvalidInputError(f"{root}: cohort directory does not exist")
  partitions = [p for p in PARTITIONS if os.path.isdir(os.path.join(root, p))] or [""]
  refs = []
  for partition in partitions:
    folder = os.path.join(root, partition)
    for name in sorted(os.listdir(folder)):
      path = os.path.join(folder, name)
      if _SUBJECT_DIR.match(name) and os.path.isdir(path):
        refs.append(SubjectRef(subject=name, partition=partition, directory=path))
  if not refs:
    raise InvalidInputError(
        f"{root}: no patientXXX folders found (expected {root}/training/patient001/... as in "
        "the ACDC release)")
  return refs


def parse_info_cfg(path: str) -> SubjectInfo:
  """Parses an ACDC Info.cfg (`key: value` lines) and checks it is consistent."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except FileNotFoundError:
    raise InvalidInputError(f"{path}: Info.cfg is missing") from None
  except (OSError, UnicodeDecodeError) as e:
    raise InvalidInputError(f"{path}: cannot read Info.cfg ({e})") from None
  values = {}
  for line_number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    key, sep, value = line.partition(":")
    if not sep:
      raise InvalidInputError(f"{path}: line {line_number} is not 'key: value': {line!r}")
    values[key.strip()] = value.strip()
  missing = [k for k in _REQUIRED_INFO_KEYS if k not in values]
  if missing:
    raise InvalidInputError(f"{path}: Info.cfg lacks {', '.join(missing)}")

  def number(key, kind):
    try:
      parsed = kind(float(values[key])) if kind is int else kind(values[key])
    except ValueError:
      raise InvalidInputError(f"{path}: {key} is not a number: {values[key]!r}") from None
    if kind is int and float(values[key]) != parsed:
      raise InvalidInputError(f"{path}: {key} is not an integer: {values[key]!r}")
    if not np.isfinite(parsed) or parsed <= 0:
      raise InvalidInputError(f"{path}: {key} must be positive, got {values[key]!r}")
    return parsed

  info = SubjectInfo(
      ed_frame=number("ED", int), es_frame=number("ES", int),
      group=_GROUP_ALIASES.get(values["Group"], values["Group"]),
      num_frames=number("NbFrame", int), height_cm=number("Height", float),
      weight_kg=number("Weight", float))
  if info.group not in structures.GROUPS:
    raise InvalidInputError(f"{path}: unknown Group {values['Group']!r}; expected one of "
                            f"{list(structures.GROUPS)}")
  for key, frame in (("ED", info.ed_frame), ("ES", info.es_frame)):
    if frame > info.num_frames:
      raise InvalidInputError(f"{path}: {key} frame {frame} exceeds NbFrame {info.num_frames}")
  return info


def _nifti_path(directory: str, stem: str) -> str:
  """The .nii.gz (or uncompressed .nii) file for `stem`; raises naming the expected file."""
  for extension in (".nii.gz", ".nii"):
    path = os.path.join(directory, stem + extension)
    if os.path.isfile(path):
      return path
  raise InvalidInputError(f"{os.path.join(directory, stem + '.nii.gz')}: file is missing")


def load_nifti(path: str) -> tuple[np.ndarray, tuple[float, ...]]:
  """Loads a NIfTI volume as float32 with its voxel spacing (mm, spatial axes only).

  Truncated or corrupt files (bad gzip stream, short data block, bad header) raise
  InvalidInputError naming the file.
  """
  try:
    image = nib.load(path)
    data = np.asarray(image.dataobj, dtype=np.float32)
    zooms = tuple(float(z) for z in image.header.get_zooms()[:min(3, data.ndim)])
  except FileNotFoundError:
    raise InvalidInputError(f"{path}: file is missing") from None
  except (OSError, EOFError, zlib.error, ValueError, nib.filebasedimages.ImageFileError) as e:
    raise InvalidInputError(
        f"{path}: cannot read NIfTI, the file is truncated or corrupt "
        f"({type(e).__name__}: {e})") from None
  if data.ndim < 3:
    raise InvalidInputError(f"{path}: expected a 3D or 4D volume, got shape {data.shape}")
  if len(zooms) < 3 or not all(np.isfinite(z) and z > 0 for z in zooms):
    raise InvalidInputError(f"{path}: header voxel spacing {zooms} is not positive")
  return data, zooms


def _load_frame(directory: str, subject: str, frame: int, label_convention: str,
                ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
  """Image (float32), canonical labels (uint8) and spacing of one annotated frame."""
  stem = f"{subject}_frame{frame:02d}"
  image_path = _nifti_path(directory, stem)
  labels_path = _nifti_path(directory, stem + "_gt")
  image, spacing = load_nifti(image_path)
  labels, label_spacing = load_nifti(labels_path)
  if image.ndim != 3:
    raise InvalidInputError(f"{image_path}: expected a (X, Y, Z) frame, got shape {image.shape}")
  if image.shape != labels.shape:
    raise InvalidInputError(f"{labels_path}: label shape {labels.shape} does not match image "
                            f"{image_path} shape {image.shape}")
  if not np.allclose(spacing, label_spacing, rtol=1e-3):
    raise InvalidInputError(f"{labels_path}: spacing {label_spacing} does not match image "
                            f"spacing {spacing}")
  if not np.all(np.isfinite(image)):
    raise InvalidInputError(f"{image_path}: {int(np.sum(~np.isfinite(image)))} voxels are NaN "
                            "or infinite")
  if not np.all(np.isfinite(labels)):
    raise InvalidInputError(f"{labels_path}: label map holds NaN or infinite values")
  try:
    canonical = structures.remap_labels(labels, label_convention)
  except ValueError as e:
    raise InvalidInputError(f"{labels_path}: {e}") from None
  return image, canonical, spacing


def load_subject(ref: SubjectRef | str, label_convention: str = "acdc",
                 load_cine: bool = False) -> AcdcSubject:
  """Loads the ED and ES frames (and optionally the 4D cine) of one subject folder."""
  directory = ref.directory if isinstance(ref, SubjectRef) else str(ref)
  subject = os.path.basename(os.path.normpath(directory))
  info = parse_info_cfg(os.path.join(directory, "Info.cfg"))
  ed_image, ed_labels, spacing = _load_frame(directory, subject, info.ed_frame, label_convention)
  es_image, es_labels, es_spacing = _load_frame(directory, subject, info.es_frame,
                                                label_convention)
  if ed_image.shape != es_image.shape or not np.allclose(spacing, es_spacing, rtol=1e-3):
    raise InvalidInputError(
        f"{directory}: ED frame {info.ed_frame} {ed_image.shape} @ {spacing} mm and ES frame "
        f"{info.es_frame} {es_image.shape} @ {es_spacing} mm differ in geometry")
  cine = None
  if load_cine:
    cine_path = _nifti_path(directory, f"{subject}_4d")
    cine, _ = load_nifti(cine_path)
    if cine.ndim != 4 or cine.shape[:3] != ed_image.shape:
      raise InvalidInputError(f"{cine_path}: cine shape {cine.shape} does not match the "
                              f"frames' (X, Y, Z) = {ed_image.shape}")
    if cine.shape[3] < max(info.ed_frame, info.es_frame):
      raise InvalidInputError(f"{cine_path}: only {cine.shape[3]} frames, but ED/ES are "
                              f"{info.ed_frame}/{info.es_frame}")
    if not np.all(np.isfinite(cine)):
      raise InvalidInputError(f"{cine_path}: cine holds NaN or infinite voxels")
  return AcdcSubject(subject=subject, info=info, ed_image=ed_image, ed_labels=ed_labels,
                     es_image=es_image, es_labels=es_labels,
                     spacing_mm=tuple(spacing[:3]), cine=cine)
