"""What happened to one subject of a preparation (`SubjectOutcome`) and its copy in the work
area, which lets an interrupted preparation resume and keeps only metadata in memory.

Each outcome is one file in the work area (`subject_cache_dir` of the builders in
`data_pipelines.tfds_builders` and `data_pipelines.cine`, by default <download_dir>/subjects):
`<subject>.npz` with the prepared arrays and, as JSON, the status, reason, group, frames,
attributes and the fingerprint of the subject's input files (size, mtime and SHA-256 of every file
in its folder, `data_pipelines.fingerprints`). A file is written under a temporary name and
renamed, so it is either complete or absent, and it is reused only when its `subject_cache_key`
(format, preprocessing, label convention, plausibility bounds), its folder and its input contents
match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
import zipfile
from typing import Optional

import numpy as np

from data_pipelines import acdc
from data_pipelines import fingerprints
from data_pipelines import plausibility
from data_pipelines import preprocess
from data_pipelines.errors import InvalidInputError

# Bumped when a cached subject outcome would differ for the same inputs and configuration.
# 2: plausibility checks, input fingerprints with content hashes, MemoryError cached.
SUBJECT_CACHE_VERSION = 2
_CACHE_SUFFIX = ".npz"
_CACHE_TEMP_SUFFIX = ".tmp"


@dataclasses.dataclass
class SubjectOutcome:
  """What happened to one subject. `example` is the tfds example when prepared."""
  subject: str
  directory: str
  status: str                               # "prepared" or "skipped"
  reason: Optional[str] = None
  group: Optional[str] = None
  ed_frame: Optional[int] = None
  es_frame: Optional[int] = None
  attributes: Optional[dict[str, float]] = None
  example: Optional[dict] = dataclasses.field(default=None, repr=False)
  # The skip came from an unexpected exception (not InvalidInputError, not a lack of memory);
  # such outcomes are not cached, so a rerun retries the subject.
  unexpected: bool = False
  # The fingerprint of the subject's input files (`fingerprints.subject_inputs`) the outcome
  # was computed from; None for folder entries that are not subjects.
  inputs: Optional[dict] = dataclasses.field(default=None, repr=False)


def subject_cache_key(config: preprocess.PreprocessConfig, label_convention: str,
                      bounds: Optional[plausibility.PlausibilityBounds] = None) -> str:
  """What a cached subject outcome depends on besides its input files, as a short digest."""
  bounds = bounds or plausibility.PlausibilityBounds()
  text = json.dumps({"version": SUBJECT_CACHE_VERSION, "preprocess": config.to_dict(),
                     "label_convention": label_convention,
                     "plausibility": bounds.to_dict()}, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path(cache_dir: str, subject: str) -> str:
  return os.path.join(cache_dir, subject + _CACHE_SUFFIX)


def remove_temporaries(cache_dir: str) -> None:
  """Removes the temporaries that interrupted `write_cache_file`s left in `cache_dir` (if any)."""
  if os.path.isdir(cache_dir):
    for name in os.listdir(cache_dir):
      if name.endswith(_CACHE_TEMP_SUFFIX):
        os.remove(os.path.join(cache_dir, name))


def outcome_meta(outcome: SubjectOutcome, key: str) -> dict:
  """The JSON metadata of a cached outcome (what `load_outcome` reads back)."""
  return {"subject": outcome.subject, "directory": outcome.directory, "status": outcome.status,
          "reason": outcome.reason, "group": outcome.group, "ed_frame": outcome.ed_frame,
          "es_frame": outcome.es_frame, "attributes": outcome.attributes, "key": key,
          "inputs": outcome.inputs}


def write_cache_file(cache_dir: str, subject: str, arrays: dict) -> None:
  """Writes one work-area file (temporary name, then rename: complete or absent)."""
  os.makedirs(cache_dir, exist_ok=True)
  final = cache_path(cache_dir, subject)
  temporary = f"{final}.{os.getpid()}-{uuid.uuid4().hex[:8]}{_CACHE_TEMP_SUFFIX}"
  try:
    with open(temporary, "wb") as f:
      np.savez(f, **arrays)
    os.replace(temporary, final)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


def save_outcome(cache_dir: str, outcome: SubjectOutcome, key: str) -> None:
  """Writes one subject's outcome, with its input fingerprint, to `cache_dir/<subject>.npz`."""
  arrays = {"meta": np.array(json.dumps(outcome_meta(outcome, key)))}
  if outcome.status == "prepared":
    example = outcome.example
    arrays.update(image=example["image"], label=example["label"],
                  slice_index=np.int32(example["slice_index"]))
  write_cache_file(cache_dir, outcome.subject, arrays)


def _cached_meta(cache_dir: str, subject: str) -> Optional[dict]:
  try:
    with np.load(cache_path(cache_dir, subject), allow_pickle=False) as cached:
      meta = json.loads(str(cached["meta"]))
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
    return None
  return meta if isinstance(meta, dict) else None


def cached_inputs(cache_dir: str, subject: str) -> Optional[dict]:
  """The input fingerprint recorded with a cached outcome (None when there is none), so that
  unchanged files need not be hashed again (`fingerprints.subject_inputs(previous=...)`)."""
  meta = _cached_meta(cache_dir, subject)
  return meta.get("inputs") if meta else None


def load_outcome(cache_dir: str, subject: str, key: str, directory: str,
                 inputs: dict) -> Optional[SubjectOutcome]:
  """The cached outcome of `subject` (without its example arrays), or None when there is none,
  it is unreadable, or it was computed for another configuration, folder or input files."""
  meta = _cached_meta(cache_dir, subject)
  if (meta is None or meta.get("key") != key
      or meta.get("directory") != acdc.printable_path(directory)
      or not fingerprints.same_content(meta.get("inputs"), inputs)):
    return None
  fields = {f.name for f in dataclasses.fields(SubjectOutcome)}
  outcome = SubjectOutcome(**{k: v for k, v in meta.items() if k in fields})
  outcome.inputs = inputs
  return outcome


def load_example(cache_dir: str, subject: str) -> dict:
  """The prepared example of `subject` from the work area, as `prepare_subject` made it."""
  path = cache_path(cache_dir, subject)
  try:
    with np.load(path, allow_pickle=False) as cached:
      meta = json.loads(str(cached["meta"]))
      image, label = cached["image"], cached["label"]
      slice_index = np.int32(cached["slice_index"])
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    raise InvalidInputError(f"{path}: the work-area file of {subject} is gone or unreadable "
                            f"({type(e).__name__}: {e}); rerun the preparation") from None
  return {"subject": subject, "group": meta["group"], "image": image, "label": label,
          "slice_index": slice_index,
          "attributes": {name: np.float32(value) for name, value in meta["attributes"].items()}}
