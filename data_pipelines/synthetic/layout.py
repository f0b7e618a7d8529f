"""Writing and reading a cohort in the ACDC layout.

Per subject: Info.cfg, the 4D cine and its labels of every frame, the ED and ES frames with
their labels, and on request the 4-chamber view; per cohort: parameters.csv (every generating
parameter) and acquisition_ranges.json. Every file is written atomically (staging, rename).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import uuid
from typing import Optional, Sequence

import nibabel as nib
import numpy as np

from data_pipelines.synthetic.long_axis import LONG_AXIS_4CH
from data_pipelines.synthetic.parameters import AcquisitionRanges, SubjectParameters

PARAMETERS_CSV = "parameters.csv"
ACQUISITION_RANGES_JSON = "acquisition_ranges.json"
PARTITION = "training"
STAGING_DIR = ".staging"


def _subject_files(params: SubjectParameters) -> list[str]:
  s = params.subject
  frames = sorted({params.ed_frame, params.es_frame})
  names = ["Info.cfg", f"{s}_4d.nii.gz", f"{s}_4d_gt.nii.gz"]
  for frame in frames:
    names += [f"{s}_frame{frame:02d}.nii.gz", f"{s}_frame{frame:02d}_gt.nii.gz"]
  return names


def _nifti(data: np.ndarray, affine: np.ndarray, params: SubjectParameters,
           spacing_mm: Optional[tuple[float, float, float]] = None) -> nib.Nifti1Image:
  """A NIfTI image with the subject's voxel spacing (or `spacing_mm`) and frame duration."""
  image = nib.Nifti1Image(data, affine)
  header = image.header
  header.set_data_dtype(data.dtype)
  spacing_mm = params.voxel_spacing_mm if spacing_mm is None else tuple(spacing_mm)
  zooms = spacing_mm + ((params.frame_duration_ms,) if data.ndim == 4 else ())
  header.set_zooms(zooms)
  header.set_xyzt_units("mm", "msec")
  image.set_qform(affine, code=1)
  image.set_sform(affine, code=1)
  return image


def stored_intensities(image: np.ndarray) -> np.ndarray:
  """The int16 voxels of a float image as stored: rounded, clipped to [0, int16 max], in
  Fortran order, the NIfTI order, so the writer copies contiguous slabs instead of transposing
  the volume slice by slice (same values and bytes)."""
  rounded = np.rint(image)
  np.maximum(rounded, 0, out=rounded)
  np.minimum(rounded, np.iinfo(np.int16).max, out=rounded)
  return np.asfortranarray(rounded.astype(np.int16))


def info_cfg_text(params: SubjectParameters) -> str:
  """Contents of the subject's Info.cfg, ACDC key names."""
  return (f"ED: {params.ed_frame}\nES: {params.es_frame}\nGroup: {params.group}\n"
          f"Height: {params.height_cm:.1f}\nNbFrame: {params.nb_frame}\n"
          f"Weight: {params.weight_kg:.1f}\n")


def write_acdc_subject(root: str, params: SubjectParameters, image: np.ndarray,
                       labels: np.ndarray, affine: np.ndarray) -> str:
  """Writes one subject into root/training/<subject>/ and returns that directory.

  The subject is written into a staging directory first and renamed into place, so an
  interrupted run never leaves a half-written subject. Images are stored as int16 (rounded,
  clipped), labels as uint8.
  """
  expected = (params.nx, params.ny, params.nz, params.nb_frame)
  if image.shape != expected or labels.shape != expected:
    raise ValueError(f"{params.subject}: image {image.shape} / labels {labels.shape} do not "
                     f"match the parameters' (X, Y, Z, T) = {expected}")
  final = os.path.join(root, PARTITION, params.subject)
  staging = os.path.join(root, STAGING_DIR, f"{params.subject}-{uuid.uuid4().hex[:8]}")
  os.makedirs(staging)
  try:
    stored = stored_intensities(image)
    labels = np.asfortranarray(labels.astype(np.uint8))
    s = params.subject
    nib.save(_nifti(stored, affine, params), os.path.join(staging, f"{s}_4d.nii.gz"))
    nib.save(_nifti(labels, affine, params), os.path.join(staging, f"{s}_4d_gt.nii.gz"))
    for frame in sorted({params.ed_frame, params.es_frame}):
      t = frame - 1
      nib.save(_nifti(stored[..., t], affine, params),
               os.path.join(staging, f"{s}_frame{frame:02d}.nii.gz"))
      nib.save(_nifti(labels[..., t], affine, params),
               os.path.join(staging, f"{s}_frame{frame:02d}_gt.nii.gz"))
    with open(os.path.join(staging, "Info.cfg"), "w", encoding="utf-8") as f:
      f.write(info_cfg_text(params))
    os.makedirs(os.path.dirname(final), exist_ok=True)
    if os.path.exists(final):
      shutil.rmtree(final)
    os.rename(staging, final)
  finally:
    if os.path.exists(staging):
      shutil.rmtree(staging, ignore_errors=True)
  return final


def subject_is_complete(root: str, params: SubjectParameters) -> bool:
  """Whether root/training/<subject>/ holds every file of `params` with a matching Info.cfg."""
  directory = os.path.join(root, PARTITION, params.subject)
  if not all(os.path.isfile(os.path.join(directory, name)) for name in _subject_files(params)):
    return False
  with open(os.path.join(directory, "Info.cfg"), encoding="utf-8") as f:
    return f.read() == info_cfg_text(params)


def long_axis_files(params: SubjectParameters) -> list[str]:
  """Names of the 4-chamber cine and its labels in the subject's folder."""
  s = params.subject
  return [f"{s}_{LONG_AXIS_4CH}.nii.gz", f"{s}_{LONG_AXIS_4CH}_gt.nii.gz"]


def long_axis_is_complete(root: str, params: SubjectParameters) -> bool:
  """Whether root/training/<subject>/ holds both 4-chamber files."""
  directory = os.path.join(root, PARTITION, params.subject)
  return all(os.path.isfile(os.path.join(directory, name)) for name in long_axis_files(params))


def write_long_axis_subject(root: str, params: SubjectParameters, image: np.ndarray,
                            labels: np.ndarray, affine: np.ndarray) -> list[str]:
  """Writes the 4-chamber cine (int16) and labels (uint8) next to the short-axis files.

  Each file is written under a temporary name in the subject folder and renamed into place,
  labels first, so the cine's presence means both are complete. Returns the two paths.
  """
  if image.ndim != 4 or image.shape[2] != 1 or image.shape[3] != params.nb_frame or (
      labels.shape != image.shape):
    raise ValueError(f"{params.subject}: 4-chamber image {image.shape} / labels {labels.shape} "
                     f"must be (X, Y, 1, {params.nb_frame})")
  directory = os.path.join(root, PARTITION, params.subject)
  os.makedirs(directory, exist_ok=True)
  spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
  stored = stored_intensities(image)
  image_name, labels_name = long_axis_files(params)
  paths = []
  labels = np.asfortranarray(labels.astype(np.uint8))
  for name, data in ((labels_name, labels), (image_name, stored)):
    final = os.path.join(directory, name)
    temporary = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:8]}.nii.gz")
    try:
      nib.save(_nifti(data, affine, params, spacing), temporary)
      os.replace(temporary, final)
    finally:
      if os.path.exists(temporary):
        os.remove(temporary)
    paths.append(final)
  return paths[::-1]


def write_parameters_csv(path: str, subjects: Sequence[SubjectParameters]) -> None:
  """Writes parameters.csv (one row per subject, every generating parameter) atomically."""
  names = [f.name for f in dataclasses.fields(SubjectParameters)]
  partial = f"{path}.partial-{uuid.uuid4().hex[:8]}"
  with open(partial, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=names)
    writer.writeheader()
    for params in subjects:
      writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                       for k, v in dataclasses.asdict(params).items()})
  os.replace(partial, path)


def write_acquisition_ranges(root: str, ranges: AcquisitionRanges) -> None:
  """Writes root/acquisition_ranges.json (the ranges a cohort was drawn from) atomically."""
  path = os.path.join(root, ACQUISITION_RANGES_JSON)
  partial = f"{path}.partial-{uuid.uuid4().hex[:8]}"
  with open(partial, "w", encoding="utf-8") as f:
    json.dump(dataclasses.asdict(ranges), f, indent=2)
  os.replace(partial, path)


def read_acquisition_ranges(root: str) -> Optional[AcquisitionRanges]:
  """The ranges recorded in root/acquisition_ranges.json; None when the cohort has no record.

  Raises ValueError naming the file when it is not a valid record."""
  path = os.path.join(root, ACQUISITION_RANGES_JSON)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      values = json.load(f)
    return AcquisitionRanges(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in values.items()})
  except (ValueError, TypeError, AttributeError) as e:
    raise ValueError(f"{path}: not a valid record of acquisition ranges ({e})") from None


def _parameters_from_row(row: dict[str, str]) -> SubjectParameters:
  """Parses one parameters.csv row back into SubjectParameters."""
  values = {}
  for field in dataclasses.fields(SubjectParameters):
    text = row[field.name]
    values[field.name] = {"int": int, "float": float}.get(field.type, str)(text)
  return SubjectParameters(**values)


def read_parameters_csv(path: str) -> list[SubjectParameters]:
  """Reads parameters.csv back into SubjectParameters (floats at 6 significant digits)."""
  with open(path, encoding="utf-8") as f:
    return [_parameters_from_row(row) for row in csv.DictReader(f)]
