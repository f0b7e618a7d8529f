"""The prepare job: a raw ACDC-layout cohort -> a prepared tensorflow-datasets dataset.

  python -m data_pipelines.prepare --dataset=acdc --input_dir=D --output_dir=O \
      [--image_size=128 --spacing_mm=1.3 --slice_rule=acdc_basal --label_convention=acdc \
       --split_seed=0]

Writes into O:
- tfds/:            the dataset (array_record, splits "train"/"val"/"test"), written by the
                    `data_pipelines.tfds_builders.Acdc` builder with D as its manual_dir;
- attributes.csv:   one row per prepared subject, columns `structures.ATTRIBUTES_CSV_COLUMNS`;
- splits.json:      subject ids per split (stratified by group, seeded);
- report.json:      every subject found, "prepared" or "skipped" with the reason, counts, the
                    configuration, where the tfds dataset is, and how many subjects were taken
                    from an interrupted run. Written last: its presence marks O as complete.
While a preparation runs (or after it was interrupted) O also holds .subjects/ (the per-subject
work area), .prepare.lock and .staging-<id>/; a finished preparation leaves only the four above.

Design: this module is a thin driver around the builder. The builder runs the per-subject
preparation (`tfds_builders.run_subject`), so a tfds user with only the builder and a manual_dir
gets the same examples; the driver adds the files a researcher reads and the guarantees a
training job relies on:
- atomicity: the dataset is written under O/.staging-<id>/ and renamed into place, report.json
  last, so an interrupted run never leaves a dataset that looks complete;
- resumption: each subject's outcome is kept in the work area O/.subjects/ (one file per
  subject, see `tfds_builders`) as soon as it is computed; a run that is killed or interrupted
  in the per-subject loop is finished by rerunning the same command, which reuses those files
  and processes only the remaining subjects. The work area records the configuration it belongs
  to and is deleted once report.json is in place;
- idempotence: if O already holds a complete preparation with the same configuration (and
  input directory), `prepare_dataset` returns its report without redoing work; a different
  configuration in a non-empty O (complete, or unfinished in the work area) is refused, as is a
  non-empty O that is not a preparation. Nothing already prepared is overwritten;
- concurrency: every process of a multi-process job may call `prepare_dataset` on the same O.
  One takes an exclusive lock (flock on O/.prepare.lock) and prepares; the others wait for the
  lock, then find the complete report and return it. The kernel releases the lock when its
  holder dies, even by SIGKILL, so a crashed run never blocks the next one. Processes on
  different hosts share the lock where the file system supports flock across clients (local
  disks, NFS with lockd); elsewhere let one process per output directory prepare.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from typing import Iterator, Optional

from absl import app
from absl import flags
import tensorflow_datasets as tfds

from cardiac_jax import structures
from data_pipelines import preprocess
from data_pipelines import tfds_builders
from data_pipelines.errors import InvalidInputError

REPORT = "report.json"
ATTRIBUTES = "attributes.csv"
SPLITS = "splits.json"
TFDS_DIR = "tfds"
WORK_DIR = ".subjects"
LOCK_FILE = ".prepare.lock"
_WORK_CONFIG = "config.json"
_STAGING_PREFIX = ".staging-"
_OUTPUT_NAMES = (TFDS_DIR, ATTRIBUTES, SPLITS, REPORT)
_OWN_NAMES = (*_OUTPUT_NAMES, WORK_DIR, LOCK_FILE)
DATASETS = ("acdc",)
# Bumped when the prepared output changes for the same configuration.
FORMAT_VERSION = 1


def _requested_config(dataset: str, input_dir: str, builder_config: tfds_builders.AcdcConfig,
                      ) -> dict:
  config = {"format_version": FORMAT_VERSION, "dataset": dataset,
            "input_dir": os.path.abspath(input_dir), **builder_config.to_dict()}
  # Through JSON and back, so it compares equal to the copy read from report.json.
  return json.loads(json.dumps(config))


def _read_json(path: str) -> Optional[dict]:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _is_complete(output_dir: str, report: dict) -> bool:
  if "tfds_dir" not in report:
    return False
  tfds_path = os.path.join(output_dir, report["tfds_dir"])
  return (os.path.isfile(os.path.join(output_dir, ATTRIBUTES))
          and os.path.isfile(os.path.join(output_dir, SPLITS))
          and os.path.isfile(os.path.join(tfds_path, "dataset_info.json")))


def _clear_own_leftovers(output_dir: str) -> None:
  """Removes what an interrupted or incomplete run left behind, except the per-subject work
  area (which a rerun resumes from) and the lock (held by the caller)."""
  for name in os.listdir(output_dir):
    path = os.path.join(output_dir, name)
    if name in _OUTPUT_NAMES or name.startswith(_STAGING_PREFIX):
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  subjects = os.path.join(output_dir, WORK_DIR, "subjects")
  if os.path.isdir(subjects):
    for name in os.listdir(subjects):
      if tfds_builders.is_cache_temporary(name):
        os.remove(os.path.join(subjects, name))


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
  none (yet). Raises FileExistsError when output_dir holds another configuration."""
  if not os.path.isdir(output_dir):
    return None
  report = _read_json(os.path.join(output_dir, REPORT))
  if report is not None and report.get("config") != requested:
    raise FileExistsError(
        f"{output_dir} holds a dataset prepared with a different configuration:\n"
        f"  existing:  {json.dumps(report.get('config'), sort_keys=True)}\n"
        f"  requested: {json.dumps(requested, sort_keys=True)}\n"
        "Choose another --output_dir or delete this one.")
  if report is not None and _is_complete(output_dir, report):
    return report
  work_config = _read_json(os.path.join(output_dir, WORK_DIR, _WORK_CONFIG))
  if work_config is not None and work_config != requested:
    subjects = os.path.join(output_dir, WORK_DIR, "subjects")
    done = len(os.listdir(subjects)) if os.path.isdir(subjects) else 0
    raise FileExistsError(
        f"{output_dir} holds an unfinished preparation ({done} subjects done, in "
        f"{os.path.join(output_dir, WORK_DIR)}) with a different configuration:\n"
        f"  unfinished: {json.dumps(work_config, sort_keys=True)}\n"
        f"  requested:  {json.dumps(requested, sort_keys=True)}\n"
        "Rerun with that configuration to finish it, or choose another --output_dir.")
  return None


@contextlib.contextmanager
def _exclusive_lock(output_dir: str, verbose: bool) -> Iterator[None]:
  """Holds an exclusive flock on output_dir/LOCK_FILE, waiting for another holder to finish.

  The holder unlinks the file before releasing it, so a waiter may end up locking an unlinked
  file: it checks that the path still names the file it locked, and starts over if not.
  """
  path = os.path.join(output_dir, LOCK_FILE)
  told = False
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        if verbose and not told:
          print(f"{output_dir}: another process is preparing it; waiting", flush=True)
          told = True
        fcntl.flock(fd, fcntl.LOCK_EX)
      try:
        locked = os.fstat(fd)
        current = os.stat(path)
        same = (locked.st_dev, locked.st_ino) == (current.st_dev, current.st_ino)
      except FileNotFoundError:
        same = False
    except BaseException:
      os.close(fd)
      raise
    if same:
      break
    os.close(fd)
  try:
    # For a person wondering who holds the lock.
    os.ftruncate(fd, 0)
    os.write(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
    yield
  finally:
    with contextlib.suppress(OSError):
      os.unlink(path)
    os.close(fd)


def _write_attributes_csv(path: str, outcomes) -> None:
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=structures.ATTRIBUTES_CSV_COLUMNS)
    writer.writeheader()
    for o in outcomes:
      if o.status == "prepared":
        writer.writerow({"subject": o.subject, "group": o.group, "ed_frame": o.ed_frame,
                         "es_frame": o.es_frame,
                         **{k: repr(float(v)) for k, v in o.attributes.items()}})


def _write_json(path: str, value) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, sort_keys=False)
    f.write("\n")


def prepare_dataset(input_dir: str, output_dir: str,
                    preprocess_config: Optional[preprocess.PreprocessConfig] = None, *,
                    dataset: str = "acdc", label_convention: str = "acdc", split_seed: int = 0,
                    split_fractions=tfds_builders.DEFAULT_SPLIT_FRACTIONS,
                    verbose: bool = True) -> dict:
  """Prepares the cohort in `input_dir` into `output_dir` (see the module docstring).

  Args:
    input_dir: ACDC-layout root (with training/ and/or testing/, or patientXXX folders).
    output_dir: where the prepared dataset goes; created if missing.
    preprocess_config: preprocessing choices; defaults to `PreprocessConfig()`.
    dataset: the input layout; only "acdc" (which the synthetic cohort shares).
    label_convention: label convention of the *_gt files ("acdc", "ukbb", "mnms").
    split_seed: seed of the stratified subject split.
    split_fractions: (train, val, test) fractions.
    verbose: print a one-line summary.

  Returns:
    The report (the contents of report.json).

  Raises:
    InvalidInputError: the input directory is missing or no subject could be prepared.
    FileExistsError: output_dir holds a different preparation or unrelated files.
  """
  start = time.time()
  if dataset not in DATASETS:
    raise ValueError(f"unknown dataset {dataset!r}; known: {DATASETS}")
  if not os.path.isdir(input_dir):
    raise InvalidInputError(f"{input_dir}: input directory does not exist")
  preprocess_config = preprocess_config or preprocess.PreprocessConfig()
  builder_config = tfds_builders.make_config(preprocess_config, label_convention, split_seed,
                                             split_fractions)
  requested = _requested_config(dataset, input_dir, builder_config)

  report = _finished_report(output_dir, requested)
  if report is None:
    # Checked before the lock file is created, so a foreign folder is left as it was.
    _refuse_foreign(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    with _exclusive_lock(output_dir, verbose):
      # Another process may have finished, or started something else, while this one waited.
      report = _finished_report(output_dir, requested)
      if report is None:
        _refuse_foreign(output_dir)
        report = _prepare_locked(input_dir, output_dir, builder_config, requested, split_seed,
                                 start)
        _print_summary(output_dir, report, verbose)
        return report
  if verbose:
    print(f"{output_dir}: already prepared ({report['counts']['prepared']} subjects), "
          "nothing to do")
  return report


def _prepare_locked(input_dir: str, output_dir: str,
                    builder_config: tfds_builders.AcdcConfig, requested: dict, split_seed: int,
                    start: float) -> dict:
  """The preparation itself; the caller holds the lock and has checked output_dir."""
  _clear_own_leftovers(output_dir)
  work = os.path.join(output_dir, WORK_DIR)
  os.makedirs(work, exist_ok=True)
  _write_json(os.path.join(work, _WORK_CONFIG), requested)
  staging = os.path.join(output_dir, f"{_STAGING_PREFIX}{uuid.uuid4().hex[:12]}")
  os.makedirs(staging)
  try:
    # tfds refuses a config object named like a predefined one: pass the predefined by name
    # (names carry a digest of the content, so equal names mean equal configs).
    predefined = {c.name for c in tfds_builders.Acdc.BUILDER_CONFIGS}
    builder = tfds_builders.Acdc(config=(builder_config.name
                                         if builder_config.name in predefined
                                         else builder_config),
                                 data_dir=os.path.join(staging, TFDS_DIR),
                                 file_format="array_record",
                                 subject_cache_dir=os.path.join(work, "subjects"))
    builder.download_and_prepare(
        download_dir=os.path.join(staging, "downloads"),
        download_config=tfds.download.DownloadConfig(manual_dir=input_dir))
    tfds_dir = os.path.relpath(str(builder.data_dir), staging)
    outcomes = builder.outcomes
    _write_attributes_csv(os.path.join(staging, ATTRIBUTES), outcomes)
    _write_json(os.path.join(staging, SPLITS), {
        "seed": split_seed, "fractions": list(builder_config.split_fractions),
        **{split: builder.split_assignment.get(split, []) for split in tfds_builders.SPLITS}})
    split_of = {s: split for split, subjects in builder.split_assignment.items()
                for s in subjects}
    num_prepared = sum(o.status == "prepared" for o in outcomes)
    report = {
        "config": requested,
        "tfds_dir": tfds_dir,
        "counts": {"found": len(outcomes), "prepared": num_prepared,
                   "skipped": len(outcomes) - num_prepared,
                   **{split: len(builder.split_assignment.get(split, []))
                      for split in tfds_builders.SPLITS}},
        "subjects": [{"subject": o.subject, "directory": o.directory, "status": o.status,
                      **({"split": split_of[o.subject], "group": o.group}
                         if o.status == "prepared" else {"reason": o.reason})}
                     for o in outcomes],
        "resumed_subjects": builder.num_reused,
        "seconds": round(time.time() - start, 2),
    }
    # Rename into place, report.json last: until it exists, the preparation is incomplete.
    for name in (TFDS_DIR, SPLITS, ATTRIBUTES):
      os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    _write_json(os.path.join(staging, REPORT), report)
    os.replace(os.path.join(staging, REPORT), os.path.join(output_dir, REPORT))
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  # Complete: the work area has served its purpose (its arrays are in the tfds files now).
  shutil.rmtree(work, ignore_errors=True)
  return report


def _print_summary(output_dir: str, report: dict, verbose: bool) -> None:
  if not verbose:
    return
  counts = report["counts"]
  resumed = (f", {report['resumed_subjects']} taken from an interrupted run"
             if report.get("resumed_subjects") else "")
  print(f"prepared {counts['prepared']} of {counts['found']} subjects "
        f"({counts['skipped']} skipped; train/val/test {counts['train']}/{counts['val']}/"
        f"{counts['test']}{resumed}) into {output_dir} in {report['seconds']:.1f} s")
  for entry in report["subjects"]:
    if entry["status"] == "skipped":
      print(f"  skipped {entry['subject']}: {entry['reason']}")


# ----------------------------------------------------------------------------- consumers

def _report(output_dir: str) -> dict:
  report = _read_json(os.path.join(output_dir, REPORT))
  if report is None or not _is_complete(output_dir, report):
    raise InvalidInputError(f"{output_dir}: not a complete prepared dataset (no valid "
                            f"{REPORT}); run `python -m data_pipelines.prepare` first")
  return report


def open_prepared(output_dir: str) -> tfds.core.DatasetBuilder:
  """The tfds builder of a prepared dataset (read-only; no builder class needed)."""
  return tfds.builder_from_directory(os.path.join(output_dir, _report(output_dir)["tfds_dir"]))


def load_split(output_dir: str, split: str):
  """Random-access data source of one split: `load_split(O, "train")[i]` is an example dict."""
  builder = open_prepared(output_dir)
  if split not in builder.info.splits:
    raise InvalidInputError(f"{output_dir}: split {split!r} is absent (has "
                            f"{sorted(builder.info.splits)}); too few subjects were prepared")
  return builder.as_data_source(split)


def prepared_attributes(output_dir: str) -> dict[str, dict]:
  """attributes.csv as {subject: row}, numeric columns as float, frames as int."""
  _report(output_dir)
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
  flags.DEFINE_integer("split_seed", 0, "Seed of the subject split.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  tfds.disable_progress_bar()
  try:
    prepare_dataset(
        f.input_dir, f.output_dir,
        preprocess.PreprocessConfig(image_size=f.image_size, spacing_mm=f.spacing_mm,
                                    slice_rule=f.slice_rule),
        dataset=f.dataset, label_convention=f.label_convention, split_seed=f.split_seed)
  except (InvalidInputError, FileExistsError) as e:
    raise SystemExit(f"prepare failed: {e}") from None


if __name__ == "__main__":
  _define_flags()
  app.run(main)
