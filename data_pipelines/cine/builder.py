"""The tfds builder of prepared cines and the driver that runs it (`prepare_cine_dataset`).

Same outputs and guarantees as the slice path (`prepare.run_preparation`): resumable per subject,
reruns follow the input files by fingerprint, subject-level splits stratified by group.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import acdc
from data_pipelines import beam_prepare
from data_pipelines import prepare
from data_pipelines import subject_cache
from data_pipelines import subject_splits
from data_pipelines import tfds_builders
from data_pipelines.cine.config import (CineConfig, DATASETS, FORMAT_VERSION, IMAGE_FIELDS,
                                        NUM_SHORT_AXIS_SLICES, STORED_IMAGE_DTYPE)
from data_pipelines.cine.reading import find_cine_subjects
from data_pipelines.cine.outcomes import load_example, run_subject, save_outcome
from data_pipelines.errors import InvalidArgumentError
from data_pipelines.errors import InvalidInputError


@dataclasses.dataclass(eq=False)
class CineBuilderConfig(tfds.core.BuilderConfig):
  """A prepared cine configuration: raw layout, preprocessing and subject split."""
  dataset: str = "synthetic"
  cine: CineConfig = CineConfig()
  split_seed: int = 0
  split_fractions: tuple[float, float, float] = subject_splits.DEFAULT_SPLIT_FRACTIONS

  def to_dict(self) -> dict:
    return {"dataset": self.dataset, "cine": self.cine.to_dict(), "split_seed": self.split_seed,
            "split_fractions": list(self.split_fractions)}


def make_builder_config(dataset: str, cine_config: CineConfig, split_seed: int = 0,
                        split_fractions=subject_splits.DEFAULT_SPLIT_FRACTIONS,
                        ) -> CineBuilderConfig:
  """A CineBuilderConfig named after its values (tfds keeps one directory per name)."""
  if dataset not in DATASETS:
    raise ValueError(f"unknown cine dataset {dataset!r}; known: {DATASETS}")
  fractions = tuple(float(f) for f in split_fractions)
  if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
    raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got "
                     f"{fractions}")
  config = CineBuilderConfig(name="pending", dataset=dataset, cine=cine_config,
                             split_seed=int(split_seed), split_fractions=fractions)
  text = json.dumps({"format_version": FORMAT_VERSION, **config.to_dict()}, sort_keys=True)
  digest = hashlib.sha256(text.encode()).hexdigest()[:8]
  config.name = (f"{dataset}_t{cine_config.num_frames}_s{cine_config.image_size}_"
                 f"{cine_config.spacing_mm:g}mm_{'la' if cine_config.long_axis else 'sa'}_"
                 f"{digest}")
  config.description = text
  return config


def cine_features(config: CineConfig) -> tfds.features.FeaturesDict:
  """The FeaturesDict of one prepared cine subject."""
  t, s = config.num_frames, config.image_size

  def raw(shape, dtype):
    # Raw bytes: without an encoding tf.Example would hold float16 as a float32 list.
    return tfds.features.Tensor(shape=shape, dtype=dtype,
                                encoding=tfds.features.Encoding.BYTES)

  features = {
      "subject": tfds.features.Text(),
      "group": tfds.features.Scalar(dtype=np.int32),
      "sa_image": raw((t, s, s, NUM_SHORT_AXIS_SLICES), STORED_IMAGE_DTYPE),
      "sa_label": raw((t, s, s, NUM_SHORT_AXIS_SLICES), np.uint8),
      "sa_mid_image": raw((t, s, s, 1), STORED_IMAGE_DTYPE),
      "lv_volume_ml": tfds.features.Tensor(shape=(t,), dtype=np.float32),
      "pixel_spacing_mm": tfds.features.Scalar(dtype=np.float32),
      "slice_thickness_mm": tfds.features.Scalar(dtype=np.float32),
  }
  if config.long_axis:
    features["la_image"] = raw((t, s, s, 1), STORED_IMAGE_DTYPE)
    features["la_label"] = raw((t, s, s, 1), np.uint8)
  return tfds.features.FeaturesDict(features)


def _skipped(rejected: list[tuple[str, str, str]]) -> list[subject_cache.SubjectOutcome]:
  """The outcomes of the (name, directory, reason) folders `find_cine_subjects` rejected."""
  return [subject_cache.SubjectOutcome(subject=name, directory=directory, status="skipped",
                                       reason=reason) for name, directory, reason in rejected]


class CardiacCine(tfds_builders.SubjectBuilder):
  """Raw cine cohort (synthetic ACDC layout or converted UK Biobank) -> one cine per subject.

  manual_dir is the raw cohort root. Subjects are prepared in `_split_generators` (the split is
  stratified over the subjects actually prepared), each outcome cached in `subject_cache_dir`
  and reused when its configuration key and input fingerprint match, so an interrupted
  preparation resumes. After `download_and_prepare`: `outcomes`, `split_assignment`,
  `num_reused`.
  """

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {"1.0.0": "Short-axis (3 slices + labels) and 4-chamber cines, T frames.",
                   "1.1.0": "Image fields stored as float16, tensors as raw bytes.",
                   "1.2.0": "4-chamber labels (la_label)."}
  BUILDER_CONFIGS = []
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Pass the raw cohort root as manual_dir: a synthetic cohort written by
  `data_pipelines.synthetic.synthesize_cohort(..., long_axis_4ch=True)`, or a folder of
  converted UK Biobank subjects (<id>/sa.nii.gz, la_4ch.nii.gz, seg_sa.nii.gz).
  """

  DESCRIPTION = ("Cine MRI per subject: 3 central short-axis slices with labels, the "
                 "mid-ventricular slice and the 4-chamber view, resampled to T frames from ED, "
                 "LV volume curve.")

  def subject_features(self) -> tfds.features.FeaturesDict:
    return cine_features(self.builder_config.cine)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config: CineBuilderConfig = self.builder_config
    manual_dir = str(dl_manager.manual_dir)
    found, rejected = find_cine_subjects(manual_dir, config.dataset)
    if not found:
      raise InvalidInputError(f"{acdc.printable_path(manual_dir)}: no subject folders found "
                              f"for the {config.dataset!r} layout")
    key = hashlib.sha256(config.description.encode()).hexdigest()[:16]

    def run(subject: str, directory: str) -> subject_cache.SubjectOutcome:
      return run_subject(subject, directory, config.dataset, config.cine)

    def save(cache_dir: str, outcome, key: str) -> None:
      save_outcome(cache_dir, outcome, config.cine, key)

    return self._prepare_subjects(dl_manager, key, run, save, found, _skipped(rejected),
                                  lambda outcome: outcome.group or "unknown")

  def _example_reader(self):
    return functools.partial(_stored_example, self._loop, self.builder_config.cine)


def _stored_example(loop: tfds_builders.SubjectLoop, cine_config: CineConfig,
                    subject: str) -> dict:
  """The example of `subject` as stored: the image fields as `STORED_IMAGE_DTYPE`."""
  example = loop.example(subject, lambda cache_dir, s: load_example(cache_dir, s, cine_config))
  for name in IMAGE_FIELDS:
    if name in example:
      example[name] = example[name].astype(STORED_IMAGE_DTYPE)
  return example


# ----------------------------------------------------------------------------- prepare driver

def _requested_config(input_dir: str, builder_config: CineBuilderConfig) -> dict:
  config = {"format_version": FORMAT_VERSION, "format": "cine",
            "input_dir": os.path.abspath(input_dir), **builder_config.to_dict()}
  return json.loads(json.dumps(config))


def prepare_cine_dataset(input_dir: str, output_dir: str, config: Optional[CineConfig] = None,
                         *, dataset: str = "synthetic", split_seed: int = 0,
                         split_fractions=subject_splits.DEFAULT_SPLIT_FRACTIONS,
                         rehash: bool = False, verbose: bool = False, beam: bool = False,
                         beam_options: str = "") -> dict:
  """Prepares the raw cine cohort in `input_dir` into `output_dir`; returns report.json.

  Same outputs and guarantees as `prepare.prepare_dataset` (`prepare.run_preparation`:
  arguments checked before any write, atomic, resumable per subject, one preparing process per
  output directory under a lock, reruns follow the input files by fingerprint): O/tfds,
  O/attributes.csv (labelled subjects), O/splits.json, O/report.json (every subject "prepared"
  with its split, or "skipped" with the reason, and its input fingerprint;
  `resumed_subjects` counts the outcomes taken from an interrupted run, `unchanged_subjects`
  those taken from the previous preparation; `seconds_per_subject` the preparation time of
  the others). `beam`, `beam_options`: prepare with Apache Beam, as in `prepare.prepare_dataset`.

  Raises:
    InvalidInputError: input_dir missing, or no subject could be prepared.
    InvalidArgumentError (a ValueError): an argument cannot be used, or output_dir cannot be
      written.
    FileExistsError: output_dir holds another finished preparation or unrelated files.
  """
  try:
    split_seed, split_fractions = subject_splits.check_split_arguments(split_seed,
                                                                      split_fractions)
    builder_config = make_builder_config(dataset, config or CineConfig(), split_seed,
                                         split_fractions)
  except InvalidInputError:
    raise
  except ValueError as e:
    raise InvalidArgumentError(str(e)) from None
  options = beam_prepare.optional_options(beam, beam_options)
  prepare.check_directories(input_dir, output_dir)

  def find():
    found, rejected = find_cine_subjects(input_dir, dataset)
    subjects, duplicates = tfds_builders.unique_subjects(found)
    return subjects, duplicates + _skipped(rejected)

  def make_builder(data_dir, subject_cache_dir, previous, inputs):
    return CardiacCine(config=builder_config, data_dir=data_dir, file_format="array_record",
                       subject_cache_dir=subject_cache_dir, previous=previous, inputs=inputs)

  job = prepare.Preparation(
      input_dir=input_dir, output_dir=output_dir,
      requested=_requested_config(input_dir, builder_config), find=find,
      make_builder=make_builder, split_seed=split_seed, split_fractions=split_fractions,
      noun="cine subjects", beam_options=options)
  return prepare.run_preparation(job, verbose=verbose, rehash=rehash)
