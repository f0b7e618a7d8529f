"""Reading raw cine series: the synthetic ACDC layout and converted UK Biobank folders.

Every file is read by `nifti.read_nifti` (defensive decoding); every problem of a subject raises
`InvalidInputError` naming the file, which the preparation records as that subject's reason.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

from cardiac_jax import structures
from data_pipelines import acdc
from data_pipelines import nifti
from data_pipelines import plausibility
from data_pipelines import synthetic
from data_pipelines.cine.config import DATASETS, UKBB_LONG_AXIS, UKBB_SEGMENTATION, UKBB_SHORT_AXIS
from data_pipelines.errors import InvalidInputError


@dataclasses.dataclass
class CineSubject:
  """One subject's raw cine series, as read.

  cine: (X, Y, Z, T) float32 short-axis stack; labels: (X, Y, Z, T) uint8 canonical or None;
  spacing_mm: (dx, dy, dz); ed_frame / es_frame: 0-based (es None when unknown);
  long_axis: (X, Y, T') float32 4-chamber cine or None, with long_axis_spacing_mm (dx, dy),
  long_axis_ed_frame (0-based) and long_axis_labels (X, Y, T') uint8 (labels of la_label) or
  None.
  """
  subject: str
  directory: str
  group: Optional[str]
  cine: np.ndarray
  labels: Optional[np.ndarray]
  spacing_mm: tuple[float, float, float]
  ed_frame: int
  es_frame: Optional[int]
  long_axis: Optional[np.ndarray] = None
  long_axis_spacing_mm: Optional[tuple[float, float]] = None
  long_axis_ed_frame: int = 0
  long_axis_labels: Optional[np.ndarray] = None


def _check_series_shape(shape, path: str, what: str) -> None:
  shown = acdc.printable_path(path)
  if len(shape) != 4:
    raise InvalidInputError(f"{shown}: expected a (X, Y, Z, T) {what}, got shape {shape}")
  if shape[3] < 2:
    raise InvalidInputError(f"{shown}: a single-frame series {shape}; a cine needs at least 2 "
                            "frames")


def _read_cine_volume(path: str, what: str) -> nifti.NiftiVolume:
  """An image series (X, Y, Z, T) of at least 2 frames, none of them blank or constant."""
  volume = nifti.read_nifti(path)
  _check_series_shape(volume.data.shape, path, what)
  try:
    plausibility.check_frames_not_constant(volume.data, what)
  except InvalidInputError as e:
    raise InvalidInputError(f"{acdc.printable_path(path)}: {e}") from None
  return volume


def _read_long_axis(path: str) -> nifti.NiftiVolume:
  volume = _read_cine_volume(path, "4-chamber cine")
  if volume.data.shape[2] != 1:
    raise InvalidInputError(f"{acdc.printable_path(path)}: expected one 4-chamber plane "
                            f"(X, Y, 1, T), got shape {volume.data.shape}")
  return volume


def _read_label_series(path: str, reference: nifti.NiftiVolume, reference_path: str,
                       what: str, reference_what: str) -> nifti.NiftiVolume:
  """A label series on the grid and with the frame count of the cine `reference`; shapes are
  compared from the header before any voxel is decoded."""
  header = nifti.read_nifti_header(path)
  _check_series_shape(header.shape, path, what)
  nifti.check_same_shape(header.shape, path, reference.data.shape, reference_path, "label",
                         reference_what)
  if header.shape[3] != reference.data.shape[3]:
    raise InvalidInputError(f"{acdc.printable_path(path)}: {header.shape[3]} label frames "
                            f"for {reference.data.shape[3]} cine frames")
  volume = nifti.read_nifti(path)
  nifti.check_same_grid(volume, path, reference, reference_path, "label", reference_what)
  return volume


def _read_labels(path: str, reference: nifti.NiftiVolume, reference_path: str,
                 label_convention: str) -> np.ndarray:
  volume = _read_label_series(path, reference, reference_path, "label series", "cine")
  try:
    return structures.remap_labels(volume.data, label_convention)
  except ValueError as e:
    raise InvalidInputError(f"{acdc.printable_path(path)}: {e}") from None


def _read_long_axis_labels(path: str, reference: nifti.NiftiVolume,
                           reference_path: str) -> np.ndarray:
  """(X, Y, T) uint8 4-chamber labels on the grid of the 4-chamber cine `reference`."""
  volume = _read_label_series(path, reference, reference_path, "4-chamber label series",
                              "4-chamber cine")
  shown = acdc.printable_path(path)
  labels = volume.data[:, :, 0, :]
  values = np.unique(labels)
  if (not np.all(values == np.round(values)) or values.min() < 0
      or values.max() >= structures.NUM_LONG_AXIS_LABELS):
    shown_values = [int(v) if v == round(v) else float(v) for v in values[:8]]
    raise InvalidInputError(f"{shown}: label values {shown_values} outside 0.."
                            f"{structures.NUM_LONG_AXIS_LABELS - 1}")
  return labels.astype(np.uint8)


def lv_volumes_ml(labels: np.ndarray, spacing_mm) -> np.ndarray:
  """(T,) LV blood-pool volume (ml) of a (X, Y, Z, T) canonical label series."""
  return synthetic.lv_volume_curve_from_labels(labels, spacing_mm)


def read_synthetic_cine(directory: str, label_convention: str = "acdc",
                        long_axis: bool = True) -> CineSubject:
  """Reads one subject folder of the ACDC layout with labels for every frame.

  Raises InvalidInputError naming the file: Info.cfg, <s>_4d.nii.gz, <s>_4d_gt.nii.gz missing or
  broken, grids that differ, fewer frames than Info.cfg's ED/ES; a broken <s>_la_4ch.nii.gz or
  <s>_la_4ch_gt.nii.gz (its labels, optional; only read when `long_axis`).
  """
  subject = os.path.basename(os.path.normpath(directory))
  info = acdc.parse_info_cfg(os.path.join(directory, "Info.cfg"))
  cine_path = os.path.join(directory, f"{subject}_4d.nii.gz")
  cine = _read_cine_volume(cine_path, "cine")
  if cine.data.shape[3] < max(info.ed_frame, info.es_frame):
    raise InvalidInputError(f"{acdc.printable_path(cine_path)}: only {cine.data.shape[3]} "
                            f"frames, but ED/ES are {info.ed_frame}/{info.es_frame}")
  labels = _read_labels(os.path.join(directory, f"{subject}_4d_gt.nii.gz"), cine, cine_path,
                        label_convention)
  result = CineSubject(subject=subject, directory=directory, group=info.group, cine=cine.data,
                       labels=labels, spacing_mm=cine.spacing_mm, ed_frame=info.ed_frame - 1,
                       es_frame=info.es_frame - 1)
  la_path = os.path.join(directory, f"{subject}_{synthetic.LONG_AXIS_4CH}.nii.gz")
  if long_axis and os.path.lexists(la_path):
    la = _read_long_axis(la_path)
    if la.data.shape[3] != cine.data.shape[3]:
      raise InvalidInputError(f"{acdc.printable_path(la_path)}: {la.data.shape[3]} frames, the "
                              f"short-axis cine has {cine.data.shape[3]}")
    result.long_axis = la.data[:, :, 0, :]
    result.long_axis_spacing_mm = la.spacing_mm[:2]
    result.long_axis_ed_frame = info.ed_frame - 1
    la_labels = os.path.join(directory, f"{subject}_{synthetic.LONG_AXIS_4CH}_gt.nii.gz")
    if os.path.lexists(la_labels):
      result.long_axis_labels = _read_long_axis_labels(la_labels, la, la_path)
  return result


def read_ukbb_cine(directory: str, label_convention: str = "ukbb",
                   long_axis: bool = True) -> CineSubject:
  """Reads one converted UK Biobank subject folder (sa.nii.gz, la_4ch.nii.gz, seg_sa.nii.gz).

  ED is the frame of largest LV volume when seg_sa.nii.gz is present (ES the smallest), else
  frame 0 (the series are triggered on the R wave). The group is unknown.

  Raises InvalidInputError naming the file: sa.nii.gz missing or not a cine; seg_sa.nii.gz on
  another grid, with another frame count or label values outside `label_convention`, or
  without LV voxels; la_4ch.nii.gz broken (only read when `long_axis`).
  """
  subject = acdc.printable_path(os.path.basename(os.path.normpath(directory)))
  sa_path = os.path.join(directory, UKBB_SHORT_AXIS)
  cine = _read_cine_volume(sa_path, "short-axis cine")
  labels, ed, es = None, 0, None
  seg_path = os.path.join(directory, UKBB_SEGMENTATION)
  if os.path.lexists(seg_path):
    labels = _read_labels(seg_path, cine, sa_path, label_convention)
    volumes = lv_volumes_ml(labels, cine.spacing_mm)
    if not volumes.max() > 0:
      raise InvalidInputError(f"{acdc.printable_path(seg_path)}: no LV blood-pool voxels in any "
                              "frame")
    ed, es = int(np.argmax(volumes)), int(np.argmin(volumes))
  result = CineSubject(subject=subject, directory=directory, group=None, cine=cine.data,
                       labels=labels, spacing_mm=cine.spacing_mm, ed_frame=ed, es_frame=es)
  la_path = os.path.join(directory, UKBB_LONG_AXIS)
  if long_axis and os.path.lexists(la_path):
    la = _read_long_axis(la_path)
    result.long_axis = la.data[:, :, 0, :]
    result.long_axis_spacing_mm = la.spacing_mm[:2]
    # The same trigger: ED is the first frame of the 4-chamber series as well.
    result.long_axis_ed_frame = 0
  return result


def find_cine_subjects(root: str, dataset: str) -> tuple[list[tuple[str, str]],
                                                        list[tuple[str, str, str]]]:
  """([(subject, directory)], [(name, directory, reason)]) of a raw cohort of `dataset`.

  Synthetic (ACDC layout): `acdc.find_subjects`. UK Biobank: every folder at the root is a
  subject; symbolic links that lead nowhere (loops, missing targets) and NIfTI files at the
  root are rejected with the reason, other files ignored.
  """
  if dataset == "synthetic":
    refs, rejected = acdc.find_subjects(root)
    return ([(r.subject, r.directory) for r in refs],
            [(r.name, r.directory, r.reason) for r in rejected])
  if dataset != "ukbb":
    raise ValueError(f"unknown cine dataset {dataset!r}; known: {DATASETS}")
  if not os.path.isdir(root):
    raise InvalidInputError(f"{acdc.printable_path(root)}: cohort directory does not exist")
  found, rejected = [], []
  try:
    names = sorted(os.listdir(root))
  except OSError as e:
    raise InvalidInputError(f"{acdc.printable_path(root)}: cannot list ({e.strerror})") from None
  for name in names:
    path = os.path.join(root, name)
    if name.startswith("."):
      continue
    shown, shown_path = acdc.printable_path(name), acdc.printable_path(path)
    if not os.path.isdir(path):
      # Every folder is a subject here: a link that leads nowhere, or a NIfTI file lying at the
      # root, is an entry that should have been one. Other files (lists, notes) are not.
      broken = os.path.islink(path) and not os.path.exists(path)
      if broken or name.endswith((".nii", ".nii.gz")):
        problem = acdc.entry_problem(path)
        if problem is None or not broken:
          problem = "is a NIfTI file at the cohort root; each subject is a folder"
        rejected.append((shown, shown_path, f"{shown_path}: {problem}"))
      continue
    if shown != name:
      rejected.append((shown, shown_path, f"{shown_path}: folder name is not valid UTF-8 text"))
    else:
      found.append((name, path))
  return found, rejected


def read_cine_subject(directory: str, dataset: str, long_axis: bool = True) -> CineSubject:
  """The reader of `dataset` ("synthetic" or "ukbb") applied to one subject folder."""
  if dataset == "synthetic":
    return read_synthetic_cine(directory, long_axis=long_axis)
  if dataset == "ukbb":
    return read_ukbb_cine(directory, long_axis=long_axis)
  raise ValueError(f"unknown cine dataset {dataset!r}; known: {DATASETS}")
