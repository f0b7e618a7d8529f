"""tensorflow-datasets builder for prepared cohorts in the ACDC layout.

`Acdc` is a `tfds.core.GeneratorBasedBuilder` whose manual_dir is the raw ACDC root (the data
requires registration, so tfds cannot download it). It writes one example per subject with the
features of `data_pipelines.features.prepared_features`, in splits "train", "val", "test".
The same builder prepares the synthetic cohort, which uses the ACDC layout.

Design: every subject goes through `prepare_subject` (read -> measure -> preprocess), which
either returns a prepared example or raises `InvalidInputError`; `run_subject` turns that into
a `SubjectOutcome` ("prepared" or "skipped" with a reason naming the file), catching any other
exception too, so one bad subject never stops a cohort. The builder prepares all subjects in
`_split_generators`, before any split is written, because the split assignment is stratified
over the subjects that actually were prepared (tfds also refuses a split with no examples).

Each subject's outcome is cached as one file in a work area (`subject_cache_dir`, by default
<download_dir>/subjects): `<subject>.npz` with the prepared arrays and, as JSON, the status,
reason, group, frames and attributes. A file is written under a temporary name and renamed, so
it is either complete or absent, and it is reused only when its `subject_cache_key` (format,
preprocessing, label convention) and its input fingerprint (name, size and mtime of every file
in the subject folder) match. Hence a preparation killed in the per-subject loop resumes where
it stopped, and `_generate_examples` streams examples from the work area: only the small
per-subject metadata is held in memory, whatever the cohort size. Skips caused by unexpected
exceptions (possibly transient: a network file system, memory) are not cached, so a rerun tries
those subjects again. After `download_and_prepare` the builder's `outcomes`,
`split_assignment` and `num_reused` hold what happened to every subject;
`data_pipelines.prepare` is the driver that turns them into attributes.csv, report.json and
splits.json around an atomic write, and serialises concurrent runs.

Usage as a tfds dataset:
  builder = Acdc(data_dir=D, file_format="array_record")     # optional: subject_cache_dir=W
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir="/path/to/ACDC"))
  builder.as_data_source("train")[0]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import traceback
import uuid
import zipfile
from typing import Iterable, Optional

import numpy as np
import tensorflow_datasets as tfds

from cardiac_jax import cardiac
from cardiac_jax import structures
from data_pipelines import acdc
from data_pipelines import features
from data_pipelines import preprocess
from data_pipelines.errors import InvalidInputError

SPLITS = ("train", "val", "test")
# Bumped when a cached subject outcome would differ for the same inputs and configuration.
SUBJECT_CACHE_VERSION = 1
_CACHE_SUFFIX = ".npz"
_CACHE_TEMP_SUFFIX = ".tmp"
DEFAULT_SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
_STRUCTURE_NAMES = {structures.RV_BLOOD_POOL: "RV blood pool",
                    structures.LV_MYOCARDIUM: "LV myocardium",
                    structures.LV_BLOOD_POOL: "LV blood pool"}


# ----------------------------------------------------------------------------- one subject

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
  # The skip came from an unexpected exception (not InvalidInputError); such outcomes are not
  # cached, so a rerun retries the subject.
  unexpected: bool = False


def _check_structures_present(subject: acdc.AcdcSubject, directory: str) -> None:
  for phase, frame, labels in (("ED", subject.info.ed_frame, subject.ed_labels),
                               ("ES", subject.info.es_frame, subject.es_labels)):
    present = set(np.unique(labels).tolist())
    for value, name in _STRUCTURE_NAMES.items():
      if value not in present:
        raise InvalidInputError(
            f"{directory}/{subject.subject}_frame{frame:02d}_gt.nii.gz: the {phase} labels "
            f"have no {name} voxels")


def prepare_subject(ref: acdc.SubjectRef, config: preprocess.PreprocessConfig,
                    label_convention: str = "acdc") -> SubjectOutcome:
  """Reads, measures and preprocesses one subject into a prepared example.

  Raises:
    InvalidInputError: any problem with the subject's files or contents, naming the file.
  """
  subject = acdc.load_subject(ref, label_convention=label_convention)
  _check_structures_present(subject, ref.directory)
  ed_gt = f"{ref.directory}/{ref.subject}_frame{subject.info.ed_frame:02d}_gt.nii.gz"
  try:
    attributes = cardiac.subject_attributes(subject.ed_labels, subject.es_labels,
                                            subject.spacing_mm)
  except ValueError as e:
    raise InvalidInputError(f"{ed_gt}: cannot measure the heart: {e}") from None
  bad = [name for name, value in attributes.items() if not np.isfinite(value)]
  if bad:
    raise InvalidInputError(f"{ref.directory}: non-finite measurements {bad}")
  try:
    prepared = preprocess.preprocess_subject(
        subject.ed_image, subject.ed_labels, subject.es_image, subject.es_labels,
        subject.spacing_mm, config)
  except InvalidInputError as e:
    raise InvalidInputError(f"{ed_gt}: cannot preprocess: {e}") from None
  example = {
      "subject": ref.subject,
      "group": subject.info.group,
      "image": prepared.image,
      "label": prepared.label,
      "slice_index": np.int32(prepared.slice_index),
      "attributes": {name: np.float32(value) for name, value in attributes.items()},
  }
  return SubjectOutcome(subject=ref.subject, directory=acdc.printable_path(ref.directory),
                        status="prepared",
                        group=subject.info.group, ed_frame=subject.info.ed_frame,
                        es_frame=subject.info.es_frame, attributes=attributes,
                        example=example)


def run_subject(ref: acdc.SubjectRef, config: preprocess.PreprocessConfig,
                label_convention: str = "acdc") -> SubjectOutcome:
  """`prepare_subject` that never raises: failures become a "skipped" outcome with a reason.

  Unexpected exceptions (bugs, resource errors) are recorded with their type, message and the
  innermost frame so the report shows where they came from. KeyboardInterrupt still stops.
  """
  try:
    return prepare_subject(ref, config, label_convention)
  except InvalidInputError as e:
    reason, unexpected = str(e), False
  except Exception as e:  # pylint: disable=broad-except
    where = traceback.extract_tb(e.__traceback__)[-1]
    reason = (f"{ref.directory}: unexpected {type(e).__name__}: {e} "
              f"(at {where.filename}:{where.lineno})")
    unexpected = True
  # Paths with bytes that are not UTF-8 would make the report unprintable.
  return SubjectOutcome(subject=ref.subject, directory=acdc.printable_path(ref.directory),
                        status="skipped", reason=acdc.printable_path(reason),
                        unexpected=unexpected)


# ----------------------------------------------------------------------------- subject cache

def subject_cache_key(config: preprocess.PreprocessConfig, label_convention: str) -> str:
  """What a cached subject outcome depends on besides its input files, as a short digest."""
  text = json.dumps({"version": SUBJECT_CACHE_VERSION, "preprocess": config.to_dict(),
                     "label_convention": label_convention}, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def input_fingerprint(directory: str) -> str:
  """Digest of the name, size and modification time of every file in a subject folder.

  A changed, added or removed file changes it, so a cached outcome is not reused for inputs
  that are no longer the ones it was computed from. "" when the folder cannot be listed.
  """
  try:
    entries = sorted((os.fsencode(e.name).hex(), e.stat().st_size, e.stat().st_mtime_ns)
                     for e in os.scandir(directory) if e.is_file())
  except OSError:
    return ""
  return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def cache_path(cache_dir: str, subject: str) -> str:
  return os.path.join(cache_dir, subject + _CACHE_SUFFIX)


def is_cache_temporary(name: str) -> bool:
  """Whether a work-area file name is a temporary left by an interrupted `save_outcome`."""
  return name.endswith(_CACHE_TEMP_SUFFIX)


def save_outcome(cache_dir: str, outcome: SubjectOutcome, key: str, fingerprint: str) -> None:
  """Writes one subject's outcome to `cache_dir/<subject>.npz` (temporary name, then rename)."""
  meta = {"subject": outcome.subject, "directory": outcome.directory, "status": outcome.status,
          "reason": outcome.reason, "group": outcome.group, "ed_frame": outcome.ed_frame,
          "es_frame": outcome.es_frame, "attributes": outcome.attributes, "key": key,
          "fingerprint": fingerprint}
  arrays = {"meta": np.array(json.dumps(meta))}
  if outcome.status == "prepared":
    example = outcome.example
    arrays.update(image=example["image"], label=example["label"],
                  slice_index=np.int32(example["slice_index"]))
  os.makedirs(cache_dir, exist_ok=True)
  final = cache_path(cache_dir, outcome.subject)
  temporary = f"{final}.{os.getpid()}-{uuid.uuid4().hex[:8]}{_CACHE_TEMP_SUFFIX}"
  try:
    with open(temporary, "wb") as f:
      np.savez(f, **arrays)
    os.replace(temporary, final)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


def load_outcome(cache_dir: str, subject: str, key: str,
                 fingerprint: str) -> Optional[SubjectOutcome]:
  """The cached outcome of `subject` (without its example arrays), or None when there is none,
  it is unreadable, or it was computed for another configuration or other input files."""
  try:
    with np.load(cache_path(cache_dir, subject), allow_pickle=False) as cached:
      meta = json.loads(str(cached["meta"]))
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
    return None
  if meta.get("key") != key or meta.get("fingerprint") != fingerprint or not fingerprint:
    return None
  fields = {f.name for f in dataclasses.fields(SubjectOutcome)}
  return SubjectOutcome(**{k: v for k, v in meta.items() if k in fields})


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


# ----------------------------------------------------------------------------- splits

def stratified_split(groups: dict[str, str], fractions=DEFAULT_SPLIT_FRACTIONS,
                     seed: int = 0) -> dict[str, list[str]]:
  """Assigns subjects to "train"/"val"/"test", stratified by group, deterministic in `seed`.

  Each group's subjects are shuffled (seeded) and given evenly spaced ranks in (0, 1); all
  subjects are then ordered by rank and cut at the cumulative fractions. Every group thus
  spreads over the splits in the given proportions, and the split sizes are exact overall.
  With 3 or more subjects every split gets at least one.

  Args:
    groups: subject id -> group name.
    fractions: (train, val, test), summing to 1.
    seed: the split seed.

  Returns:
    split name -> sorted subject ids.
  """
  fractions = tuple(float(f) for f in fractions)
  if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
    raise ValueError(f"split fractions must be three non-negative numbers summing to 1, "
                     f"got {fractions}")
  rng = np.random.default_rng(seed)
  ranked = []
  for group in sorted(set(groups.values())):
    members = sorted(s for s, g in groups.items() if g == group)
    order = rng.permutation(len(members))
    # A random tie-breaker keeps groups of equal size from always landing in the same order.
    ties = rng.random(len(members))
    for rank, index in enumerate(order):
      ranked.append(((rank + 0.5) / len(members), ties[rank], members[index]))
  ranked.sort()
  total = len(ranked)
  counts = [int(round(total * f)) for f in fractions[1:]]
  if total >= 3:
    counts = [max(1, c) if f > 0 else 0 for c, f in zip(counts, fractions[1:])]
  num_val, num_test = counts
  num_train = max(0, total - num_val - num_test)
  subjects = [s for _, _, s in ranked]
  return {
      "train": sorted(subjects[:num_train]),
      "val": sorted(subjects[num_train:num_train + num_val]),
      "test": sorted(subjects[num_train + num_val:]),
  }


# ----------------------------------------------------------------------------- builder

@dataclasses.dataclass(eq=False)
class AcdcConfig(tfds.core.BuilderConfig):
  """A prepared-dataset configuration: preprocessing, label convention and split."""
  preprocess: preprocess.PreprocessConfig = preprocess.PreprocessConfig()
  label_convention: str = "acdc"
  split_seed: int = 0
  split_fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS

  def to_dict(self) -> dict:
    return {"preprocess": self.preprocess.to_dict(), "label_convention": self.label_convention,
            "split_seed": self.split_seed, "split_fractions": list(self.split_fractions)}


def make_config(preprocess_config: preprocess.PreprocessConfig = preprocess.PreprocessConfig(),
                label_convention: str = "acdc", split_seed: int = 0,
                split_fractions=DEFAULT_SPLIT_FRACTIONS) -> AcdcConfig:
  """An AcdcConfig named after its values (tfds keeps one directory per config name)."""
  if label_convention not in structures.LABEL_CONVENTIONS:
    raise ValueError(f"unknown label convention {label_convention!r}; known: "
                     f"{sorted(structures.LABEL_CONVENTIONS)}")
  config = AcdcConfig(name="pending", preprocess=preprocess_config,
                      label_convention=label_convention, split_seed=int(split_seed),
                      split_fractions=tuple(float(f) for f in split_fractions))
  text = json.dumps(config.to_dict(), sort_keys=True)
  digest = hashlib.sha256(text.encode()).hexdigest()[:8]
  config.name = (f"s{preprocess_config.image_size}_{preprocess_config.spacing_mm:g}mm_"
                 f"{preprocess_config.slice_rule}_{label_convention}_{digest}")
  config.description = text
  return config


class Acdc(tfds.core.GeneratorBasedBuilder):
  """ACDC-layout cohort -> one prepared 2-channel (ED, ES) slice per subject."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "ED/ES slice, LV-centred and rotated, attributes per subject."}
  BUILDER_CONFIGS = [make_config()]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Register at https://www.creatis.insa-lyon.fr/Challenge/acdc/ and download the ACDC data set,
  then pass its root folder (the one holding `training/` and `testing/`, each with
  `patientXXX/` subject folders) as manual_dir, e.g.
  `tfds.download.DownloadConfig(manual_dir="/data/ACDC/database")`. A synthetic cohort written
  by `python -m data_pipelines.synthesize` has the same layout and works the same way.
  """

  def __init__(self, *, subject_cache_dir: Optional[str] = None, **kwargs):
    """`subject_cache_dir`: the work area of per-subject outcomes (module docstring); by
    default <download_dir>/subjects. Other arguments as for any tfds builder."""
    super().__init__(**kwargs)
    self.subject_cache_dir = subject_cache_dir
    self.outcomes: list[SubjectOutcome] = []
    self.split_assignment: dict[str, list[str]] = {}
    self.num_reused = 0

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Short-axis cine MRI (ACDC layout): one slice per subject at ED and ES, "
                     "resampled, LV-centred, rotated to a canonical LV->RV axis, normalised; "
                     "with canonical labels and whole-heart measurements."),
        features=features.prepared_features(self.builder_config.preprocess.image_size),
        homepage="https://www.creatis.insa-lyon.fr/Challenge/acdc/",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config: AcdcConfig = self.builder_config
    manual_dir = str(dl_manager.manual_dir)
    refs, rejected = acdc.find_subjects(manual_dir)
    if not refs:
      acdc.list_subjects(manual_dir)     # raises, explaining what was expected
    cache_dir = self.subject_cache_dir or os.path.join(str(dl_manager.download_dir), "subjects")
    self._cache_dir = cache_dir
    key = subject_cache_key(config.preprocess, config.label_convention)
    self.outcomes, self.num_reused = [], 0
    seen = {}
    for ref in refs:
      if ref.subject in seen:
        self.outcomes.append(SubjectOutcome(
            subject=ref.subject, directory=acdc.printable_path(ref.directory),
            status="skipped", reason=acdc.printable_path(
                f"{ref.directory}: subject id {ref.subject} also in {seen[ref.subject]}")))
        continue
      seen[ref.subject] = ref.directory
      fingerprint = input_fingerprint(ref.directory)
      outcome = load_outcome(cache_dir, ref.subject, key, fingerprint)
      if outcome is not None:
        self.num_reused += 1
      else:
        outcome = run_subject(ref, config.preprocess, config.label_convention)
        if not outcome.unexpected:
          save_outcome(cache_dir, outcome, key, fingerprint)
        # The arrays now live in the work area; keep only the metadata in memory.
        outcome.example = None
      self.outcomes.append(outcome)
    self.outcomes.extend(
        SubjectOutcome(subject=r.name, directory=r.directory, status="skipped", reason=r.reason)
        for r in rejected)
    prepared = {o.subject: o for o in self.outcomes if o.status == "prepared"}
    if not prepared:
      reasons = "\n  ".join(f"{o.subject}: {o.reason}" for o in self.outcomes[:10])
      raise InvalidInputError(
          f"{acdc.printable_path(manual_dir)}: none of the {len(self.outcomes)} subjects could "
          f"be prepared. First reasons:\n  {reasons}")
    self.split_assignment = stratified_split(
        {s: o.group for s, o in prepared.items()}, config.split_fractions, config.split_seed)
    return {split: self._generate_examples(subjects)
            for split, subjects in self.split_assignment.items() if subjects}

  def _generate_examples(self, subjects: Iterable[str]):
    """Streams the prepared examples of `subjects` from the work area, keyed by subject id."""
    for subject in subjects:
      yield subject, load_example(self._cache_dir, subject)
