"""tensorflow-datasets builder for prepared cohorts in the ACDC layout.

`Acdc` is a `tfds.core.GeneratorBasedBuilder` whose manual_dir is the raw ACDC root (the data
requires registration, so tfds cannot download it). It writes one example per subject with the
features of `data_pipelines.features.prepared_features`, in splits "train", "val", "test".
The same builder prepares the synthetic cohort, which uses the ACDC layout.

Design: every subject goes through `prepare_subject` (read -> measure -> check plausibility
-> preprocess), which either returns a prepared example or raises `InvalidInputError`;
`run_subject` turns that into a `SubjectOutcome` ("prepared" or "skipped" with a reason naming
the file), catching any other exception too, so one bad subject never stops a cohort. The
builder prepares all subjects in `_split_generators`, before any split is written, because the
split assignment is stratified over the subjects that actually were prepared (tfds also
refuses a split with no examples).

Each subject's outcome is cached as one file in a work area (`subject_cache_dir`, by default
<download_dir>/subjects; the file and when it is reused: `data_pipelines.subject_cache`), which
`SubjectLoop` reuses when its configuration, folder and input contents match. Hence a
preparation killed in the per-subject loop resumes where it stopped, and `_generate_examples`
streams examples from the work area: only the small per-subject metadata is held in memory,
whatever the cohort size. A builder given a `PreviousPreparation` (a complete dataset of the
same configuration) takes the subjects whose inputs did not change from it. Skips caused by
unexpected exceptions (possibly transient: a network file system) are not cached, so a rerun
tries those subjects again; a MemoryError is kept as the subject's reason. After
`download_and_prepare` the builder's `outcomes`, `split_assignment`, `num_reused` and
`num_unchanged` hold what happened to every subject; `data_pipelines.prepare` is the driver
that turns them into attributes.csv, report.json and splits.json around an atomic write, and
serialises concurrent runs. Given a DownloadConfig with Beam options, the builder runs the same
per-subject function (`SubjectLoop.resolve`) and example readers on that Beam runner
(`data_pipelines.beam_prepare`), with the same outcomes and records.

Usage as a tfds dataset:
  builder = Acdc(data_dir=D, file_format="array_record")     # optional: subject_cache_dir=W
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir="/path/to/ACDC"))
  builder.as_data_source("train")[0]
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import traceback
from typing import Callable, Iterable, Optional

import numpy as np
import tensorflow_datasets as tfds

from cardiac_jax import cardiac
from cardiac_jax import structures
from data_pipelines import acdc
from data_pipelines import beam_prepare
from data_pipelines import features
from data_pipelines import fingerprints
from data_pipelines import plausibility
from data_pipelines import preprocess
from data_pipelines import subject_cache
from data_pipelines import subject_splits
from data_pipelines.errors import InvalidInputError
from data_pipelines.subject_cache import SubjectOutcome

# ----------------------------------------------------------------------------- one subject

def _check_structures_present(subject: acdc.AcdcSubject, directory: str) -> None:
  for phase, frame, labels in (("ED", subject.info.ed_frame, subject.ed_labels),
                               ("ES", subject.info.es_frame, subject.es_labels)):
    present = set(np.unique(labels).tolist())
    for value, name in preprocess.STRUCTURE_NAMES.items():
      if value not in present:
        raise InvalidInputError(
            f"{directory}/{subject.subject}_frame{frame:02d}_gt.nii.gz: the {phase} labels "
            f"have no {name} voxels")


def prepare_subject(ref: acdc.SubjectRef, config: preprocess.PreprocessConfig,
                    label_convention: str = "acdc",
                    bounds: Optional[plausibility.PlausibilityBounds] = None) -> SubjectOutcome:
  """Reads, measures, checks and preprocesses one subject into a prepared example.

  Besides the readers' checks, the subject must be physiologically plausible (`bounds`,
  default `PlausibilityBounds()`): voxel spacing, ED volumes above ES volumes, volumes, EFs and
  mass in range, no blank frame, every structure in both channels of the crop.

  Raises:
    InvalidInputError: any problem with the subject's files or contents, naming the file.
  """
  bounds = bounds or plausibility.PlausibilityBounds()
  subject = acdc.load_subject(ref, label_convention=label_convention)
  _check_structures_present(subject, ref.directory)
  ed_gt = f"{ref.directory}/{ref.subject}_frame{subject.info.ed_frame:02d}_gt.nii.gz"
  try:
    plausibility.check_spacing(subject.spacing_mm, bounds)
    attributes = cardiac.subject_attributes(subject.ed_labels, subject.es_labels,
                                            subject.spacing_mm)
  except InvalidInputError as e:
    raise InvalidInputError(f"{ed_gt}: {e}") from None
  except ValueError as e:
    raise InvalidInputError(f"{ed_gt}: cannot measure the heart: {e}") from None
  bad = [name for name, value in attributes.items() if not np.isfinite(value)]
  if bad:
    raise InvalidInputError(f"{ref.directory}: non-finite measurements {bad}")
  try:
    plausibility.check_measurements(attributes, bounds, subject.info.ed_frame,
                                    subject.info.es_frame)
  except InvalidInputError as e:
    raise InvalidInputError(f"{ref.directory}: {e}") from None
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


def failure_reason(directory: str, error: BaseException) -> tuple[str, bool]:
  """(reason, unexpected) of a subject whose preparation raised `error`.

  InvalidInputError carries its own reason. A MemoryError is a property of the subject's
  files on this machine (the readers bound what they allocate, so it is rare): its reason is
  kept like an input problem and not retried on every run. Anything else is unexpected (a
  bug, a flaky file system): recorded with its type, message and innermost frame, and marked
  so that it is not cached and a rerun tries again.
  """
  if isinstance(error, InvalidInputError):
    return str(error), False
  where = traceback.extract_tb(error.__traceback__)[-1]
  at = f"(at {where.filename}:{where.lineno})"
  if isinstance(error, MemoryError):
    return (f"{directory}: not enough memory to prepare this subject (MemoryError: {error} "
            f"{at}); change its files or free memory to try again", False)
  return f"{directory}: unexpected {type(error).__name__}: {error} {at}", True


def run_subject(ref: acdc.SubjectRef, config: preprocess.PreprocessConfig,
                label_convention: str = "acdc",
                bounds: Optional[plausibility.PlausibilityBounds] = None) -> SubjectOutcome:
  """`prepare_subject` that never raises: failures become a "skipped" outcome with a reason
  (`failure_reason`). KeyboardInterrupt still stops."""
  try:
    return prepare_subject(ref, config, label_convention, bounds)
  except Exception as e:  # pylint: disable=broad-except
    reason, unexpected = failure_reason(ref.directory, e)
  # Paths with bytes that are not UTF-8 would make the report unprintable.
  return SubjectOutcome(subject=ref.subject, directory=acdc.printable_path(ref.directory),
                        status="skipped", reason=acdc.printable_path(reason),
                        unexpected=unexpected)


# ----------------------------------------------------------------------------- the subject loop

class PreviousPreparation:
  """A complete earlier preparation of the same configuration in the output directory.

  `outcomes`: subject id -> its outcome there (metadata and input fingerprint, no arrays);
  `example(subject)` reads the subject's stored example back from that dataset, so a rerun
  after some inputs changed takes the unchanged subjects from it instead of preparing them
  again. `split_of`: subject id -> split it was stored in.
  """

  def __init__(self, tfds_dir: str, outcomes: dict[str, SubjectOutcome],
               split_of: dict[str, str]):
    self.tfds_dir = tfds_dir
    self.outcomes = outcomes
    self.split_of = split_of
    self._builder = None
    self._sources: dict[str, object] = {}
    self._index: dict[str, tuple[str, int]] = {}

  def _source(self, split: str):
    if split not in self._sources:
      # pylint: disable=g-import-not-at-top
      from tensorflow_datasets.core import decode
      from tensorflow_datasets.proto import tf_example_pb2
      if self._builder is None:
        self._builder = tfds.builder_from_directory(self.tfds_dir)
      self._sources[split] = self._builder.as_data_source(split)
      # Where each subject is: its id read from the serialised records (decoding them whole
      # would read every image).
      raw = self._builder.as_data_source(
          split, deserialize_method=decode.DeserializeMethod.RAW_BYTES)
      for i in range(len(raw)):
        example = tf_example_pb2.Example.FromString(raw[i])
        subject = example.features.feature["subject"].bytes_list.value[0].decode()
        self._index[subject] = (split, i)
    return self._sources[split]

  def example(self, subject: str) -> dict:
    """The stored example of `subject`, decoded (arrays as stored)."""
    self._source(self.split_of[subject])
    split, index = self._index[subject]
    example = dict(self._sources[split][index])
    if isinstance(example.get("subject"), bytes):
      example["subject"] = example["subject"].decode()
    return example


def unique_subjects(found: list[tuple[str, str]],
                    ) -> tuple[list[tuple[str, str]], list[SubjectOutcome]]:
  """(subjects, skipped duplicates) of [(subject id, directory)]: an id found in a second
  folder is skipped with a reason naming the first."""
  seen, unique, duplicates = {}, [], []
  for subject, directory in found:
    if subject in seen:
      duplicates.append(SubjectOutcome(
          subject=subject, directory=acdc.printable_path(directory), status="skipped",
          reason=acdc.printable_path(f"{directory}: subject id {subject} also in "
                                     f"{seen[subject]}")))
      continue
    seen[subject] = directory
    unique.append((subject, directory))
  return unique, duplicates


class SubjectLoop:
  """Runs the per-subject preparation of a builder over a cohort, reusing what it can.

  For each subject, in this order: the outcome of a previous complete preparation whose
  input fingerprint equals the current one (`previous`), a work-area outcome of the same key,
  folder and inputs (an interrupted run), or a fresh `run(subject, directory)` whose outcome
  is saved at once with `save(cache_dir, outcome, key)` (unexpected failures excepted).
  `inputs`: fingerprints already computed by the caller, by directory.
  """

  def __init__(self, cache_dir: str, key: str, run, save,
               previous: Optional[PreviousPreparation] = None,
               inputs: Optional[dict[str, dict]] = None):
    self.cache_dir, self.key, self.run, self.save = cache_dir, key, run, save
    self.previous = previous
    self.inputs = inputs or {}
    self.from_previous: set[str] = set()
    self.num_reused = 0

  def outcome(self, subject: str, directory: str) -> SubjectOutcome:
    """The outcome of one subject (`resolve`), counted in `num_reused` / `from_previous`."""
    outcome, source = self.resolve(subject, directory)
    self.record(outcome, source)
    return outcome

  def resolve(self, subject: str, directory: str) -> tuple[SubjectOutcome, str]:
    """(outcome, source) of one subject, source "previous", "resumed" or "computed"; the
    per-subject work of every path (in this process, or on a Beam worker:
    `data_pipelines.beam_prepare`). Changes nothing in the loop, so it may run anywhere."""
    prior = self.previous.outcomes.get(subject) if self.previous else None
    if prior is not None and prior.directory != acdc.printable_path(directory):
      prior = None
    inputs = self.inputs.get(directory)
    if inputs is None:
      known = (prior.inputs if prior is not None
               else subject_cache.cached_inputs(self.cache_dir, subject))
      inputs = fingerprints.subject_inputs(directory, previous=known)
    if prior is not None and fingerprints.same_content(prior.inputs, inputs):
      return dataclasses.replace(prior, inputs=inputs), "previous"
    outcome = subject_cache.load_outcome(self.cache_dir, subject, self.key, directory, inputs)
    if outcome is not None:
      return outcome, "resumed"
    outcome = self.run(subject, directory)
    outcome.inputs = inputs
    if not outcome.unexpected:
      self.save(self.cache_dir, outcome, self.key)
    # The arrays now live in the work area; keep only the metadata in memory.
    outcome.example = None
    return outcome, "computed"

  def record(self, outcome: SubjectOutcome, source: str) -> None:
    """Counts where a `resolve`d outcome came from (the example of a subject taken from the
    previous dataset is read from there)."""
    if source == "previous":
      self.from_previous.add(outcome.subject)
    elif source == "resumed":
      self.num_reused += 1

  def example(self, subject: str, load):
    """The example of `subject`: from the previous dataset, else `load(cache_dir, subject)`."""
    if subject in self.from_previous:
      return self.previous.example(subject)
    return load(self.cache_dir, subject)


# ----------------------------------------------------------------------------- builder

class SubjectBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder that prepares every subject in `_split_generators` through a `SubjectLoop`
  (`Acdc` here, the cine builder of `data_pipelines.cine`); module docstring."""

  # tfds prints "Downloading and preparing dataset Unknown size ..." and "... Subsequent calls
  # will reuse this data." with termcolor around a build, not through a logger: nothing is
  # downloaded here, and the preparation prints its own summary, so its two hooks say nothing.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  # What a subclass states about its dataset (its DatasetInfo): a description, a homepage and
  # the features of one prepared subject.
  DESCRIPTION = ""
  HOMEPAGE: Optional[str] = None

  def subject_features(self) -> tfds.features.FeaturesDict:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION,
                                 features=self.subject_features(), homepage=self.HOMEPAGE)

  def __init__(self, *, subject_cache_dir: Optional[str] = None,
               previous: Optional[PreviousPreparation] = None,
               inputs: Optional[dict[str, dict]] = None, **kwargs):
    """`subject_cache_dir`: the work area of per-subject outcomes (module docstring); by
    default <download_dir>/subjects. `previous`: an earlier complete preparation to take
    unchanged subjects from; `inputs`: input fingerprints already computed, by directory
    (`SubjectLoop`). Other arguments as for any tfds builder."""
    super().__init__(**kwargs)
    self.subject_cache_dir = subject_cache_dir
    self.previous = previous
    self.inputs = inputs
    self.outcomes: list[SubjectOutcome] = []
    self.split_assignment: dict[str, list[str]] = {}
    self.num_reused = 0
    self.num_unchanged = 0
    self._download_config = None

  def _generate_splits(self, dl_manager, download_config):
    # Kept so that `_prepare_subjects` runs on the same Beam runner as the split writing when
    # the DownloadConfig asks for Beam (`data_pipelines.beam_prepare`).
    self._download_config = download_config
    return super()._generate_splits(dl_manager, download_config)

  def _prepare_subjects(self, dl_manager: tfds.download.DownloadManager, key: str, run, save,
                        found: list[tuple[str, str]], rejected: Iterable[SubjectOutcome],
                        group_of) -> dict:
    """Prepares the `found` (subject, directory) pairs (`SubjectLoop` with `key`, `run`,
    `save`), adds the `rejected` outcomes and splits the prepared subjects stratified by
    `group_of(outcome)`; returns the split generators. InvalidInputError when none was
    prepared."""
    config = self.builder_config
    manual_dir = str(dl_manager.manual_dir)
    cache_dir = self.subject_cache_dir or os.path.join(str(dl_manager.download_dir), "subjects")
    self._loop = SubjectLoop(cache_dir, key, run, save, self.previous, self.inputs)
    subjects, duplicates = unique_subjects(found)
    if beam_prepare.is_beam(self._download_config):
      resolved = beam_prepare.resolve_subjects(self._loop.resolve, subjects,
                                               self._download_config,
                                               str(dl_manager.download_dir))
    else:
      resolved = (self._loop.resolve(s, d) for s, d in subjects)
    self.outcomes = []
    for outcome, source in resolved:
      self._loop.record(outcome, source)
      self.outcomes.append(outcome)
    self.outcomes.extend(duplicates)
    self.num_reused = self._loop.num_reused
    self.num_unchanged = len(self._loop.from_previous)
    self.outcomes.extend(rejected)
    prepared = {o.subject: o for o in self.outcomes if o.status == "prepared"}
    if not prepared:
      reasons = "\n  ".join(f"{o.subject}: {o.reason}" for o in self.outcomes[:10])
      raise InvalidInputError(
          f"{acdc.printable_path(manual_dir)}: none of the {len(self.outcomes)} subjects could "
          f"be prepared. First reasons:\n  {reasons}")
    self.split_assignment = subject_splits.stratified_split(
        {s: group_of(o) for s, o in prepared.items()}, config.split_fractions,
        config.split_seed)
    return {split: self._generate_examples(subjects)
            for split, subjects in self.split_assignment.items() if subjects}

  def _example_reader(self) -> Callable[[str], dict]:
    """subject id -> its prepared example (work area or previous dataset); picklable, since
    Beam workers call it."""
    raise NotImplementedError

  def _generate_examples(self, subjects: Iterable[str]):
    """The prepared examples of `subjects`, keyed by subject id: streamed from here, or a
    Beam PTransform that reads them on the workers when the DownloadConfig asks for Beam."""
    read = self._example_reader()
    if beam_prepare.is_beam(self._download_config):
      return beam_prepare.examples_transform(list(subjects), read)
    return ((subject, read(subject)) for subject in subjects)


@dataclasses.dataclass(eq=False)
class AcdcConfig(tfds.core.BuilderConfig):
  """A prepared-dataset configuration: preprocessing, label convention, split and the
  plausibility bounds subjects must meet."""
  preprocess: preprocess.PreprocessConfig = preprocess.PreprocessConfig()
  label_convention: str = "acdc"
  split_seed: int = 0
  split_fractions: tuple[float, float, float] = subject_splits.DEFAULT_SPLIT_FRACTIONS
  bounds: plausibility.PlausibilityBounds = plausibility.PlausibilityBounds()

  def to_dict(self) -> dict:
    return {"preprocess": self.preprocess.to_dict(), "label_convention": self.label_convention,
            "split_seed": self.split_seed, "split_fractions": list(self.split_fractions),
            "plausibility": self.bounds.to_dict()}


def make_config(preprocess_config: preprocess.PreprocessConfig = preprocess.PreprocessConfig(),
                label_convention: str = "acdc", split_seed: int = 0,
                split_fractions=subject_splits.DEFAULT_SPLIT_FRACTIONS,
                bounds: Optional[plausibility.PlausibilityBounds] = None) -> AcdcConfig:
  """An AcdcConfig named after its values (tfds keeps one directory per config name).

  Raises ValueError for an unknown label convention or split arguments that
  `subject_splits.check_split_arguments` refuses.
  """
  if label_convention not in structures.LABEL_CONVENTIONS:
    raise ValueError(f"unknown label convention {label_convention!r}; known: "
                     f"{sorted(structures.LABEL_CONVENTIONS)}")
  split_seed, split_fractions = subject_splits.check_split_arguments(split_seed, split_fractions)
  if bounds is not None and not isinstance(bounds, plausibility.PlausibilityBounds):
    raise ValueError(f"bounds must be PlausibilityBounds, got {type(bounds).__name__} "
                     f"{bounds!r}")
  config = AcdcConfig(name="pending", preprocess=preprocess_config,
                      label_convention=label_convention, split_seed=split_seed,
                      split_fractions=split_fractions,
                      bounds=bounds or plausibility.PlausibilityBounds())
  text = json.dumps(config.to_dict(), sort_keys=True)
  digest = hashlib.sha256(text.encode()).hexdigest()[:8]
  config.name = (f"s{preprocess_config.image_size}_{preprocess_config.spacing_mm:g}mm_"
                 f"{preprocess_config.slice_rule}_{label_convention}_{digest}")
  config.description = text
  return config


class Acdc(SubjectBuilder):
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

  DESCRIPTION = ("Short-axis cine MRI (ACDC layout): one slice per subject at ED and ES, "
                 "resampled, LV-centred, rotated to a canonical LV->RV axis, normalised; "
                 "with canonical labels and whole-heart measurements.")
  HOMEPAGE = "https://www.creatis.insa-lyon.fr/Challenge/acdc/"

  def subject_features(self) -> tfds.features.FeaturesDict:
    return features.prepared_features(self.builder_config.preprocess.image_size)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config: AcdcConfig = self.builder_config
    manual_dir = str(dl_manager.manual_dir)
    refs, rejected = acdc.find_subjects(manual_dir)
    if not refs:
      acdc.list_subjects(manual_dir)     # raises, explaining what was expected
    by_directory = {r.directory: r for r in refs}

    def run(subject: str, directory: str) -> SubjectOutcome:
      del subject  # The reference of the folder knows it.
      return run_subject(by_directory[directory], config.preprocess, config.label_convention,
                         config.bounds)

    key = subject_cache.subject_cache_key(config.preprocess, config.label_convention,
                                          config.bounds)
    return self._prepare_subjects(
        dl_manager, key, run, subject_cache.save_outcome, [(r.subject, r.directory) for r in refs],
        [SubjectOutcome(subject=r.name, directory=r.directory, status="skipped",
                        reason=r.reason) for r in rejected],
        lambda outcome: outcome.group)

  def _example_reader(self) -> Callable[[str], dict]:
    return functools.partial(self._loop.example, load=subject_cache.load_example)
