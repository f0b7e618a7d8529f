"""The prepare job: a raw ACDC-layout cohort -> a prepared tensorflow-datasets dataset.

  python -m data_pipelines.prepare --dataset=acdc --input_dir=D --output_dir=O \
      [--image_size=128 --spacing_mm=1.3 --slice_rule=acdc_basal --label_convention=acdc \
       --split_seed=0 --plausibility=lv_ef=2:90,... --rehash_inputs]
      [--beam --beam_options="--runner=DirectRunner --direct_num_workers=2 ..."]

Writes into O:
- tfds/:            the dataset (array_record, splits "train"/"val"/"test"), written by the
                    `data_pipelines.tfds_builders.Acdc` builder with D as its manual_dir;
- attributes.csv:   one row per prepared subject, columns `structures.ATTRIBUTES_CSV_COLUMNS`;
- splits.json:      subject ids per split (stratified by group, seeded);
- report.json:      every entry of D that is or looks like a subject, "prepared" or "skipped"
                    with the reason, with the fingerprint of its input files (size, mtime,
                    SHA-256, `data_pipelines.fingerprints`); counts, the configuration, where
                    the tfds dataset is, how many subjects were taken from an interrupted run
                    or from the previous preparation, and what changed since then. Written
                    last: its presence marks O as complete.
While a preparation runs (or after it was interrupted) O also holds .subjects/ (the per-subject
work area), .prepare.lock and .staging-<id>/; a finished preparation leaves only the four above.

Design: this module is a thin driver around the builder. The builder runs the per-subject
preparation (`tfds_builders.run_subject`), so a tfds user with only the builder and a manual_dir
gets the same examples; the driver adds the files a researcher reads and the guarantees a
training job relies on (`run_preparation`, shared with the cine preparation of
`data_pipelines.cine`):
- validation first: every argument (seed, fractions, preprocessing, plausibility bounds, the
  input folder and its subjects, a writable output folder) is checked before anything is
  written, and a failure later leaves only what a corrected rerun can use;
- atomicity: the dataset is written under O/.staging-<id>/ and renamed into place, report.json
  last, so an interrupted run never leaves a dataset that looks complete;
- resumption: each subject's outcome is kept in the work area O/.subjects/ (one file per
  subject, `subject_cache`) as soon as it is computed; a run that is killed or interrupted
  in the per-subject loop is finished by rerunning the same command, which reuses those files
  and processes only the remaining subjects. The work area records the configuration it belongs
  to and is deleted once report.json is in place; a run of another configuration takes it over
  (its subjects are reused where their preprocessing and inputs match) instead of refusing;
- inputs followed (`reruns`): a rerun into a complete preparation of the same configuration
  fingerprints the input folder again. Unchanged, it returns the report without redoing work;
  otherwise it prepares the changed and new subjects, drops the removed ones, takes the
  unchanged ones from the existing dataset, and says what changed. A different finished
  configuration in O is refused, as is a non-empty O that is not a preparation; an O of an
  older format version of the same configuration is prepared again;
- Apache Beam (`--beam`, `beam_prepare`): the builder prepares the subjects and writes the
  splits on a Beam runner (all cores of one machine, Dataflow, Spark, Flink) through the same
  per-subject code, so the outputs are those of the default path (docs/cluster.md);
- concurrency (`locking`): every process of a multi-process job may call `prepare_dataset` on
  the same O. One takes an exclusive lock (flock on O/.prepare.lock) and prepares; the others
  wait for the lock, then find the complete report and return it. The kernel releases the lock
  when its holder dies, even by SIGKILL, so a crashed run never blocks the next one. Processes
  on different hosts share the lock where the file system supports flock across clients (local
  disks, NFS with lockd); elsewhere let one process per output directory prepare.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import os
import shutil
import time
import uuid
from typing import Callable, Optional

from absl import app
from absl import flags
import tensorflow_datasets as tfds

from cardiac_jax import io
from cardiac_jax import runtime
from cardiac_jax import structures
from data_pipelines import acdc
from data_pipelines import beam_prepare
from data_pipelines import locking
from data_pipelines import plausibility
from data_pipelines import preprocess
from data_pipelines import reruns
from data_pipelines import subject_cache
from data_pipelines import subject_splits
from data_pipelines import tfds_builders
from data_pipelines.errors import InvalidArgumentError
from data_pipelines.errors import InvalidInputError
from data_pipelines.locking import LOCK_FILE

REPORT = "report.json"
ATTRIBUTES = "attributes.csv"
SPLITS = "splits.json"
TFDS_DIR = "tfds"
WORK_DIR = ".subjects"
_WORK_CONFIG = "config.json"
_STAGING_PREFIX = ".staging-"
_OUTPUT_NAMES = (TFDS_DIR, ATTRIBUTES, SPLITS, REPORT)
_OWN_NAMES = (*_OUTPUT_NAMES, WORK_DIR, LOCK_FILE)
DATASETS = ("acdc",)
# Bumped when the prepared output changes for the same configuration. An output of an older
# version and otherwise the same configuration is prepared again in place.
# 2: per-subject input fingerprints in report.json, plausibility bounds in the configuration.
FORMAT_VERSION = 2


def _requested_config(dataset: str, input_dir: str, builder_config: tfds_builders.AcdcConfig,
                      ) -> dict:
  config = {"format_version": FORMAT_VERSION, "dataset": dataset,
            "input_dir": os.path.abspath(input_dir), **builder_config.to_dict()}
  # Through JSON and back, so it compares equal to the copy read from report.json.
  return json.loads(json.dumps(config))


def _is_complete(output_dir: str, report: dict) -> bool:
  if not isinstance(report.get("tfds_dir"), str):
    return False
  tfds_path = os.path.join(output_dir, report["tfds_dir"])
  return (os.path.isfile(os.path.join(output_dir, ATTRIBUTES))
          and os.path.isfile(os.path.join(output_dir, SPLITS))
          and os.path.isfile(os.path.join(tfds_path, "dataset_info.json")))


def _is_outdated(existing, requested: dict) -> bool:
  """Whether `existing` is the configuration of an older format version of `requested`: a
  lower format_version and equal values for every key both have (newer versions add keys)."""
  if not isinstance(existing, dict):
    return False
  version = existing.get("format_version")
  if not isinstance(version, int) or version >= requested["format_version"]:
    return False
  shared = (set(existing) & set(requested)) - {"format_version"}
  return all(existing[k] == requested[k] for k in shared)


def _clear_own_leftovers(output_dir: str, keep_outputs: bool = False) -> None:
  """Removes what an interrupted or incomplete run left behind, except the per-subject work
  area (which a rerun resumes from), the lock (held by the caller) and, with `keep_outputs`,
  a complete dataset that is being updated."""
  for name in os.listdir(output_dir):
    path = os.path.join(output_dir, name)
    if (name in _OUTPUT_NAMES and not keep_outputs) or name.startswith(_STAGING_PREFIX):
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  subject_cache.remove_temporaries(os.path.join(output_dir, WORK_DIR, "subjects"))


def _refuse_foreign(output_dir: str) -> None:
  """Raises FileExistsError if output_dir holds anything this job does not write."""
  if not os.path.isdir(output_dir):
    return
  foreign = sorted(n for n in os.listdir(output_dir)
                   if n not in _OWN_NAMES and not n.startswith(_STAGING_PREFIX))
  if foreign:
    raise FileExistsError(f"{output_dir} is not empty and is not a prepared dataset "
                          f"(it holds {foreign[:5]}); choose an empty --output_dir")


def _finished_report(output_dir: str, requested: dict) -> Optional[dict]:
  """The report of a complete preparation of `requested` in output_dir, or None if there is
  none (yet), or only one of an older format version of the same configuration (prepared
  again). Raises FileExistsError when output_dir holds another, finished configuration.

  An unfinished preparation (a work area without a complete report) never refuses a run: its
  per-subject outcomes are reused where their configuration key and inputs match.
  """
  if not os.path.isdir(output_dir):
    return None
  report = io.read_json(os.path.join(output_dir, REPORT))
  if report is None or _is_outdated(report.get("config"), requested):
    return None
  if report.get("config") != requested:
    raise FileExistsError(
        f"{output_dir} holds a dataset prepared with a different configuration:\n"
        f"  existing:  {json.dumps(report.get('config'), sort_keys=True)}\n"
        f"  requested: {json.dumps(requested, sort_keys=True)}\n"
        "Choose another --output_dir or delete this one.")
  return report if _is_complete(output_dir, report) else None


def _write_attributes_csv(path: str, outcomes) -> None:
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=structures.ATTRIBUTES_CSV_COLUMNS)
    writer.writeheader()
    for o in outcomes:
      if o.status == "prepared" and o.attributes is not None:
        writer.writerow({"subject": o.subject, "group": o.group, "ed_frame": o.ed_frame,
                         "es_frame": o.es_frame,
                         **{k: repr(float(v)) for k, v in o.attributes.items()}})


def _write_json(path: str, value) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, sort_keys=False)
    f.write("\n")


# ----------------------------------------------------------------------------- arguments

def check_directories(input_dir: str, output_dir: str) -> None:
  """Checks, before anything is written, that `input_dir` is a readable folder and that
  `output_dir` is a folder (or a path whose parent exists) this process may write into;
  raises InvalidInputError (input) or InvalidArgumentError (output) naming the path."""
  if not input_dir:
    raise InvalidArgumentError("input_dir is empty: name the raw cohort's folder")
  if not os.path.isdir(input_dir):
    what = "is not a folder" if os.path.lexists(input_dir) else "does not exist"
    raise InvalidInputError(f"{acdc.printable_path(input_dir)}: input directory {what}")
  if not output_dir:
    raise InvalidArgumentError("output_dir is empty: name the folder to prepare into")
  shown = acdc.printable_path(output_dir)
  if os.path.lexists(output_dir) and not os.path.isdir(output_dir):
    raise InvalidArgumentError(f"output_dir {shown} exists and is not a folder")
  existing = os.path.abspath(output_dir)
  while not os.path.lexists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise InvalidArgumentError(f"output_dir {shown}: {acdc.printable_path(existing)} is not a "
                               "folder")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise InvalidArgumentError(f"output_dir {shown}: cannot write into "
                               f"{acdc.printable_path(existing)} (permission denied or a "
                               "read-only file system); choose a writable --output_dir")
  if os.path.abspath(output_dir) == os.path.abspath(input_dir):
    raise InvalidArgumentError(f"output_dir {shown} is the input directory; prepare into "
                               "another folder")


def _no_subject_error(input_dir: str, rejected: list) -> InvalidInputError:
  shown = acdc.printable_path(input_dir)
  try:
    empty = not os.listdir(input_dir)
  except OSError:
    empty = False
  if empty:
    return InvalidInputError(f"{shown}: the input directory is empty (expected "
                             f"{shown}/training/patient001/... as in the ACDC release)")
  reasons = "".join(f"\n  {o.subject}: {o.reason}" for o in rejected[:10])
  return InvalidInputError(
      f"{shown}: no subject folders found (expected {shown}/training/patient001/... as in the "
      f"ACDC release){'; entries rejected:' if rejected else ''}{reasons}")


# ----------------------------------------------------------------------------- the driver

@dataclasses.dataclass
class Preparation:
  """One kind of prepared dataset, as the driver sees it (slices here, cines in `cine`).

  find(): (subjects [(id, directory)], skipped entries [SubjectOutcome]) of the input folder,
    duplicates and entries that look like subjects but cannot be among the skipped;
  make_builder(data_dir, subject_cache_dir, previous, inputs): the tfds builder;
  requested: the configuration recorded in report.json.
  """
  input_dir: str
  output_dir: str
  requested: dict
  find: Callable[[], tuple[list[tuple[str, str]], list]]
  make_builder: Callable[..., tfds.core.DatasetBuilder]
  split_seed: int
  split_fractions: tuple[float, ...]
  noun: str = "subjects"
  # Beam PipelineOptions (`beam_prepare.optional_options`): prepare on that Beam runner; None:
  # in this process (the default).
  beam_options: Optional[object] = None


def run_preparation(job: Preparation, *, verbose: bool = True, rehash: bool = False) -> dict:
  """Prepares `job` into job.output_dir (module docstring), or returns the report of a
  complete preparation whose inputs are unchanged; returns report.json's contents."""
  start = time.time()
  subjects, skipped = job.find()
  if not subjects:
    raise _no_subject_error(job.input_dir, skipped)
  output_dir = job.output_dir
  report = _finished_report(output_dir, job.requested)
  known: dict[str, dict] = {}
  if report is not None:
    changes, known = reruns.input_changes(report, subjects, skipped, known, rehash)
    if not reruns.has_changes(changes):
      if verbose:
        print(f"{output_dir}: already prepared ({report['counts']['prepared']} {job.noun}, "
              "inputs unchanged), nothing to do")
      return report
  # Checked before the lock file is created, so a foreign folder is left as it was.
  _refuse_foreign(output_dir)
  created = not os.path.isdir(output_dir)
  try:
    os.makedirs(output_dir, exist_ok=True)
    with locking.exclusive_lock(output_dir, verbose):
      # Another process may have finished, or started something else, while this one waited.
      report = _finished_report(output_dir, job.requested)
      changes = None
      if report is not None:
        changes, known = reruns.input_changes(report, subjects, skipped, known, rehash)
        if not reruns.has_changes(changes):
          if verbose:
            print(f"{output_dir}: already prepared ({report['counts']['prepared']} "
                  f"{job.noun}, inputs unchanged), nothing to do")
          return report
        if verbose:
          print(f"{output_dir}: the input changed since it was prepared: "
                f"{reruns.describe_changes(changes)}; preparing again, "
                f"{changes['unchanged']} unchanged {job.noun} taken from it", flush=True)
      _refuse_foreign(output_dir)
      previous = (reruns.previous_preparation(output_dir, report, ATTRIBUTES)
                  if report is not None else None)
      report = _prepare_locked(job, previous, known, changes, start, verbose)
  except OSError as e:
    if created:
      with contextlib.suppress(OSError):
        os.rmdir(output_dir)             # only if nothing was written into it
    where = acdc.printable_path(e.filename or output_dir)
    raise InvalidArgumentError(f"output_dir {acdc.printable_path(output_dir)}: {where}: "
                               f"{e.strerror or e}; rerun once this is fixed (what was "
                               "prepared so far is kept)") from None
  _print_summary(output_dir, report, verbose, job.noun)
  return report


def _prepare_locked(job: Preparation, previous: Optional[tfds_builders.PreviousPreparation],
                    known: dict[str, dict], changes: Optional[dict], start: float,
                    verbose: bool) -> dict:
  """The preparation itself; the caller holds the lock and has checked output_dir."""
  output_dir = job.output_dir
  # A complete dataset being updated stays in place (the unchanged subjects are read from it)
  # until the new one replaces it.
  _clear_own_leftovers(output_dir, keep_outputs=previous is not None)
  work = os.path.join(output_dir, WORK_DIR)
  os.makedirs(work, exist_ok=True)
  work_config = os.path.join(work, _WORK_CONFIG)
  unfinished = io.read_json(work_config)
  if unfinished is not None and unfinished != job.requested and verbose:
    print(f"{output_dir}: an unfinished preparation of another configuration is replaced "
          "(its subjects are reused where their preprocessing and inputs match)")
  _write_json(work_config, job.requested)
  staging = os.path.join(output_dir, f"{_STAGING_PREFIX}{uuid.uuid4().hex[:12]}")
  os.makedirs(staging)
  try:
    builder = job.make_builder(os.path.join(staging, TFDS_DIR), os.path.join(work, "subjects"),
                               previous, known)
    runtime.quiet_tensorflow_datasets()  # A command's quiet mode: no tfds progress bars.
    builder.download_and_prepare(
        download_dir=os.path.join(staging, "downloads"),
        download_config=tfds.download.DownloadConfig(manual_dir=job.input_dir,
                                                     beam_options=job.beam_options))
    tfds_dir = os.path.relpath(str(builder.data_dir), staging)
    outcomes = builder.outcomes
    _write_attributes_csv(os.path.join(staging, ATTRIBUTES), outcomes)
    _write_json(os.path.join(staging, SPLITS), {
        "seed": job.split_seed, "fractions": list(job.split_fractions),
        **{split: builder.split_assignment.get(split, []) for split in subject_splits.SPLITS}})
    split_of = {s: split for split, subjects in builder.split_assignment.items()
                for s in subjects}
    num_prepared = sum(o.status == "prepared" for o in outcomes)
    seconds = time.time() - start
    computed = max(1, len(outcomes) - builder.num_reused - builder.num_unchanged)
    report = {
        "config": job.requested,
        "tfds_dir": tfds_dir,
        "counts": {"found": len(outcomes), "prepared": num_prepared,
                   "skipped": len(outcomes) - num_prepared,
                   **{split: len(builder.split_assignment.get(split, []))
                      for split in subject_splits.SPLITS}},
        "subjects": [_report_entry(o, split_of) for o in outcomes],
        "resumed_subjects": builder.num_reused,
        "unchanged_subjects": builder.num_unchanged,
        "changes": changes,
        "seconds": round(seconds, 2),
        "seconds_per_subject": round(seconds / computed, 3),
    }
    _write_json(os.path.join(staging, REPORT), report)
    # Into place, report.json last: until it exists, the preparation is incomplete. The
    # previous report goes first, so a crash in between never pairs it with new files.
    with contextlib.suppress(FileNotFoundError):
      os.remove(os.path.join(output_dir, REPORT))
    for name in (TFDS_DIR, SPLITS, ATTRIBUTES):
      target = os.path.join(output_dir, name)
      if os.path.lexists(target):
        os.replace(target, os.path.join(staging, f"previous-{name}"))
      os.replace(os.path.join(staging, name), target)
    os.replace(os.path.join(staging, REPORT), os.path.join(output_dir, REPORT))
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  # Complete: the work area has served its purpose (its arrays are in the tfds files now).
  shutil.rmtree(work, ignore_errors=True)
  return report


def _report_entry(outcome: subject_cache.SubjectOutcome, split_of: dict[str, str]) -> dict:
  entry = {"subject": outcome.subject, "directory": outcome.directory, "status": outcome.status}
  if outcome.status == "prepared":
    entry.update(split=split_of[outcome.subject], group=outcome.group)
  else:
    entry["reason"] = outcome.reason
    if outcome.unexpected:
      entry["unexpected"] = True
  if outcome.inputs is not None:
    entry["inputs"] = outcome.inputs
  return entry


def _print_summary(output_dir: str, report: dict, verbose: bool, noun: str = "subjects",
                   ) -> None:
  if not verbose:
    return
  counts = report["counts"]
  resumed = (f", {report['resumed_subjects']} taken from an interrupted run"
             if report.get("resumed_subjects") else "")
  unchanged = (f", {report['unchanged_subjects']} unchanged from the previous preparation"
               if report.get("unchanged_subjects") else "")
  print(f"prepared {counts['prepared']} of {counts['found']} {noun} "
        f"({counts['skipped']} skipped; train/val/test {counts['train']}/{counts['val']}/"
        f"{counts['test']}{resumed}{unchanged}) into {output_dir} in {report['seconds']:.1f} s")
  for entry in report["subjects"]:
    if entry["status"] == "skipped":
      print(f"  skipped {entry['subject']}: {entry['reason']}")


def prepare_dataset(input_dir: str, output_dir: str,
                    preprocess_config: Optional[preprocess.PreprocessConfig] = None, *,
                    dataset: str = "acdc", label_convention: str = "acdc", split_seed: int = 0,
                    split_fractions=subject_splits.DEFAULT_SPLIT_FRACTIONS,
                    bounds: Optional[plausibility.PlausibilityBounds] = None,
                    rehash: bool = False, verbose: bool = True, beam: bool = False,
                    beam_options: str = "") -> dict:
  """Prepares the cohort in `input_dir` into `output_dir` (see the module docstring).

  Every argument is checked before anything is written. A rerun into a complete preparation
  of the same configuration compares the input files with the fingerprints in its report:
  nothing changed, it returns that report; otherwise it prepares the changed and added
  subjects, drops the removed ones, takes the unchanged ones from the existing dataset, and
  says so (printed, and `changes` in the report).

  Args:
    input_dir: ACDC-layout root (with training/ and/or testing/, or patientXXX folders).
    output_dir: where the prepared dataset goes; created if missing.
    preprocess_config: preprocessing choices; defaults to `PreprocessConfig()`.
    dataset: the input layout; only "acdc" (which the synthetic cohort shares).
    label_convention: label convention of the *_gt files ("acdc", "ukbb", "mnms").
    split_seed: seed of the stratified subject split, an integer >= 0.
    split_fractions: (train, val, test) fractions.
    bounds: plausibility bounds of the subjects; defaults to `PlausibilityBounds()`.
    rehash: hash every input file again instead of trusting an unchanged size and mtime.
    verbose: print a one-line summary.
    beam: prepare the subjects and write the splits with Apache Beam
      (`data_pipelines.beam_prepare`; the same outputs as without it).
    beam_options: Beam pipeline options as on a command line, e.g. "--runner=DirectRunner
      --direct_num_workers=2 --direct_running_mode=multi_processing" (docs/cluster.md).

  Returns:
    The report (the contents of report.json).

  Raises:
    InvalidInputError: the input directory is missing, holds no subject, or no subject could
      be prepared.
    InvalidArgumentError (a ValueError): an argument cannot be used, or output_dir cannot be
      written.
    FileExistsError: output_dir holds a different finished preparation or unrelated files.
  """
  if dataset not in DATASETS:
    raise InvalidArgumentError(f"unknown dataset {dataset!r}; known: {DATASETS}")
  preprocess_config = preprocess_config or preprocess.PreprocessConfig()
  try:
    builder_config = tfds_builders.make_config(preprocess_config, label_convention, split_seed,
                                               split_fractions, bounds)
  except ValueError as e:
    raise InvalidArgumentError(str(e)) from None
  options = beam_prepare.optional_options(beam, beam_options)
  check_directories(input_dir, output_dir)
  requested = _requested_config(dataset, input_dir, builder_config)

  def find():
    refs, rejected = acdc.find_subjects(input_dir)
    subjects, duplicates = tfds_builders.unique_subjects([(r.subject, r.directory)
                                                          for r in refs])
    return subjects, duplicates + [
        subject_cache.SubjectOutcome(subject=r.name, directory=r.directory, status="skipped",
                                     reason=r.reason) for r in rejected]

  def make_builder(data_dir, subject_cache_dir, previous, inputs):
    # tfds refuses a config object named like a predefined one: pass the predefined by name
    # (names carry a digest of the content, so equal names mean equal configs).
    predefined = {c.name for c in tfds_builders.Acdc.BUILDER_CONFIGS}
    return tfds_builders.Acdc(
        config=(builder_config.name if builder_config.name in predefined else builder_config),
        data_dir=data_dir, file_format="array_record", subject_cache_dir=subject_cache_dir,
        previous=previous, inputs=inputs)

  job = Preparation(input_dir=input_dir, output_dir=output_dir, requested=requested, find=find,
                    make_builder=make_builder, split_seed=builder_config.split_seed,
                    split_fractions=builder_config.split_fractions, beam_options=options)
  return run_preparation(job, verbose=verbose, rehash=rehash)


# ----------------------------------------------------------------------------- consumers

def read_report(output_dir: str) -> dict:
  """report.json of a complete prepared dataset; InvalidInputError when it is not one."""
  report = io.read_json(os.path.join(output_dir, REPORT))
  if report is None or not _is_complete(output_dir, report):
    raise InvalidInputError(f"{output_dir}: not a complete prepared dataset (no valid "
                            f"{REPORT}); run `python -m data_pipelines.prepare` first")
  return report


def is_prepared(output_dir: str) -> bool:
  """Whether `output_dir` holds a complete prepared dataset (`read_report` accepts it)."""
  try:
    read_report(output_dir)
  except (InvalidInputError, OSError, ValueError):
    return False
  return True


def open_prepared(output_dir: str) -> tfds.core.DatasetBuilder:
  """The tfds builder of a prepared dataset (read-only; no builder class needed)."""
  tfds_dir = read_report(output_dir)["tfds_dir"]
  return tfds.builder_from_directory(os.path.join(output_dir, tfds_dir))


def load_split(output_dir: str, split: str):
  """Random-access data source of one split: `load_split(O, "train")[i]` is an example dict."""
  builder = open_prepared(output_dir)
  if split not in builder.info.splits:
    raise InvalidInputError(f"{output_dir}: split {split!r} is absent (has "
                            f"{sorted(builder.info.splits)}); too few subjects were prepared")
  return builder.as_data_source(split)


def prepared_attributes(output_dir: str) -> dict[str, dict]:
  """attributes.csv as {subject: row}, numeric columns as float, frames as int."""
  read_report(output_dir)
  rows = {}
  with open(os.path.join(output_dir, ATTRIBUTES), newline="", encoding="utf-8") as f:
    for row in csv.DictReader(f):
      parsed = dict(row)
      parsed["ed_frame"] = int(row["ed_frame"])
      parsed["es_frame"] = int(row["es_frame"])
      parsed.update({name: float(row[name]) for name in structures.ATTRIBUTE_NAMES})
      rows[row["subject"]] = parsed
  return rows


# ----------------------------------------------------------------------------- command line

def _define_flags():
  """Command-line flags, defined only when run as a program (importers keep their own)."""
  flags.DEFINE_enum("dataset", "acdc", list(DATASETS), "Input layout.")
  flags.DEFINE_string("input_dir", None, "Raw cohort root.", required=True)
  flags.DEFINE_string("output_dir", None, "Prepared dataset folder.", required=True)
  flags.DEFINE_integer("image_size", 128, "Output crop size in pixels.")
  flags.DEFINE_float("spacing_mm", 1.3, "Output in-plane spacing in mm.")
  flags.DEFINE_enum("slice_rule", "acdc_basal", list(preprocess.SLICE_RULES),
                    "Which short-axis slice to keep.")
  flags.DEFINE_enum("label_convention", "acdc", sorted(structures.LABEL_CONVENTIONS),
                    "Label convention of the *_gt files.")
  flags.DEFINE_integer("split_seed", 0, "Seed of the subject split (>= 0).")
  flags.DEFINE_list("plausibility", [],
                    "Plausibility bounds to change, as name=low:high (e.g. lv_ef=2:90,"
                    "lv_edv_ml=5:800); names: those of data_pipelines.plausibility."
                    "PlausibilityBounds.")
  flags.DEFINE_boolean("rehash_inputs", False,
                       "Hash every input file again on a rerun instead of trusting files "
                       "whose size and modification time are unchanged.")
  flags.DEFINE_boolean("beam", False,
                       "Prepare the subjects and write the splits with Apache Beam "
                       f"(`{beam_prepare.INSTALL_HINT}`); same outputs as without it.")
  flags.DEFINE_string("beam_options", "",
                      "Beam pipeline options with --beam, e.g. \"--runner=DirectRunner "
                      "--direct_num_workers=2 --direct_running_mode=multi_processing\" "
                      "(Dataflow, Flink, Spark: docs/cluster.md).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  tfds.disable_progress_bar()
  if f.beam:
    # Beam logs every worker's start and stop, and relays the workers' own records, at INFO.
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
  try:
    preprocess_config = preprocess.PreprocessConfig(image_size=f.image_size,
                                                    spacing_mm=f.spacing_mm,
                                                    slice_rule=f.slice_rule)
    prepare_dataset(
        f.input_dir, f.output_dir, preprocess_config, dataset=f.dataset,
        label_convention=f.label_convention, split_seed=f.split_seed,
        bounds=plausibility.parse_bounds(f.plausibility), rehash=f.rehash_inputs,
        beam=f.beam, beam_options=f.beam_options)
  except (ValueError, FileExistsError) as e:
    raise SystemExit(f"prepare failed: {e}") from None
  except OSError as e:
    raise SystemExit(f"prepare failed: {acdc.printable_path(e.filename or '')}: "
                     f"{e.strerror or e}") from None


if __name__ == "__main__":
  _define_flags()
  app.run(main)
