"""One subject's outcome: prepared (with its example and measurements) or skipped with the
reason, and its copy in the work area that lets an interrupted preparation resume.
"""

from __future__ import annotations

import json
import zipfile
from typing import Any, Optional

import numpy as np

from cardiac_jax import cardiac
from cardiac_jax import structures
from data_pipelines import acdc
from data_pipelines import plausibility
from data_pipelines import preprocess
from data_pipelines import subject_cache
from data_pipelines import tfds_builders
from data_pipelines.cine.config import CineConfig, SCALAR_FIELDS
from data_pipelines.cine.reading import CineSubject, read_cine_subject
from data_pipelines.cine.preprocessing import preprocess_cine
from data_pipelines.errors import InvalidInputError


def _subject_attributes(subject: CineSubject,
                        bounds: plausibility.PlausibilityBounds) -> Optional[dict[str, float]]:
  """Whole-heart measurements at ED and ES (`cardiac.subject_attributes`), None without
  labels; InvalidInputError when they cannot be measured or are implausible (`bounds`)."""
  if subject.labels is None or subject.es_frame is None:
    return None
  try:
    attributes = cardiac.subject_attributes(subject.labels[..., subject.ed_frame],
                                            subject.labels[..., subject.es_frame],
                                            subject.spacing_mm)
  except ValueError as e:
    raise InvalidInputError(f"cannot measure the heart: {e}") from None
  bad = [name for name, value in attributes.items() if not np.isfinite(value)]
  if bad:
    raise InvalidInputError(f"non-finite measurements {bad}")
  plausibility.check_measurements(attributes, bounds, subject.ed_frame + 1,
                                  subject.es_frame + 1)
  return attributes


def _check_short_axis_crop(example: dict[str, Any], subject: CineSubject) -> None:
  """Every heart structure in the middle short-axis slice at ED (the slices are chosen where
  all three appear) is in its crop, not lost (labelled subjects)."""
  if subject.labels is None:
    return
  present = np.bincount(example["sa_label"][0, :, :, 1].ravel(), minlength=structures.NUM_LABELS)
  missing = [name for value, name in preprocess.STRUCTURE_NAMES.items() if present[value] == 0]
  if missing:
    raise InvalidInputError(f"the ED crop of the middle short-axis slice holds no "
                            f"{' and no '.join(missing)}: outside the crop or thinner than its "
                            "pixels")


def prepare_subject(directory: str, dataset: str,
                    config: CineConfig) -> subject_cache.SubjectOutcome:
  """Reads and preprocesses one subject; InvalidInputError names the folder or file."""
  subject = read_cine_subject(directory, dataset, long_axis=config.long_axis)
  shown = acdc.printable_path(directory)
  try:
    plausibility.check_spacing(subject.spacing_mm, config.bounds)
    if subject.long_axis_spacing_mm is not None:
      plausibility.check_spacing(subject.long_axis_spacing_mm, config.bounds)
    attributes = _subject_attributes(subject, config.bounds)
    example = preprocess_cine(subject, config)
    _check_short_axis_crop(example, subject)
  except InvalidInputError as e:
    raise InvalidInputError(f"{shown}: {e}") from None
  return subject_cache.SubjectOutcome(
      subject=subject.subject, directory=shown, status="prepared",
      group=subject.group, ed_frame=subject.ed_frame + 1,
      es_frame=None if subject.es_frame is None else subject.es_frame + 1,
      attributes=attributes, example=example)


def run_subject(subject: str, directory: str, dataset: str,
                config: CineConfig) -> subject_cache.SubjectOutcome:
  """`prepare_subject` that never raises: a failure is a "skipped" outcome with the reason
  (`tfds_builders.failure_reason`: unexpected exceptions are not cached, a rerun tries
  again). KeyboardInterrupt still stops."""
  try:
    return prepare_subject(directory, dataset, config)
  except Exception as e:  # pylint: disable=broad-except
    reason, unexpected = tfds_builders.failure_reason(directory, e)
  return subject_cache.SubjectOutcome(
      subject=subject, directory=acdc.printable_path(directory), status="skipped",
      reason=acdc.printable_path(reason), unexpected=unexpected)


# ----------------------------------------------------------------------------- work area

def _array_fields(config: CineConfig) -> tuple[str, ...]:
  names = ("sa_image", "sa_label", "sa_mid_image", "lv_volume_ml")
  return names + (("la_image", "la_label") if config.long_axis else ())


def save_outcome(cache_dir: str, outcome: subject_cache.SubjectOutcome, config: CineConfig,
                 key: str) -> None:
  """Writes one outcome to cache_dir/<subject>.npz (temporary name, then rename); its metadata
  is what `subject_cache.load_outcome` reads back."""
  arrays = {"meta": np.array(json.dumps(subject_cache.outcome_meta(outcome, key)))}
  if outcome.status == "prepared":
    example = outcome.example
    arrays.update({name: example[name] for name in _array_fields(config)})
    arrays.update(group_index=np.int32(example["group"]),
                  **{name: np.float32(example[name]) for name in SCALAR_FIELDS})
  subject_cache.write_cache_file(cache_dir, outcome.subject, arrays)


def load_example(cache_dir: str, subject: str, config: CineConfig) -> dict[str, Any]:
  """The prepared example of `subject` from the work area."""
  path = subject_cache.cache_path(cache_dir, subject)
  try:
    with np.load(path, allow_pickle=False) as cached:
      example = {name: cached[name] for name in _array_fields(config)}
      example["group"] = np.int32(cached["group_index"])
      example.update({name: np.float32(cached[name]) for name in SCALAR_FIELDS})
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    raise InvalidInputError(f"{path}: the work-area file of {subject} is gone or unreadable "
                            f"({type(e).__name__}: {e}); rerun the preparation") from None
  example["subject"] = subject
  return example
