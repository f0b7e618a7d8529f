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
                    configuration, and where the tfds dataset is. Written last: its presence
                    marks O as complete.

Design: this module is a thin driver around the builder. The builder runs the per-subject
preparation (`tfds_builders.run_subject`), so a tfds user with only the builder and a manual_dir
gets the same examples; the driver adds the files a researcher reads and the guarantees a
training job relies on:
- atomicity: everything is written under O/.staging-<id>/ and renamed into place, report.json
  last, so an interrupted run never leaves a dataset that looks complete;
- idempotence: if O already holds a complete preparation with the same configuration (and
  input directory), `prepare_dataset` returns its report without redoing work; a different
  configuration in a non-empty O is refused, as is a non-empty O that is not a preparation.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
import uuid
from typing import Optional

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
_STAGING_PREFIX = ".staging-"
_OUTPUT_NAMES = (TFDS_DIR, ATTRIBUTES, SPLITS, REPORT)
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
  """Removes what an interrupted or incomplete run of this job left behind."""
  for name in os.listdir(output_dir):
    path = os.path.join(output_dir, name)
    if name in _OUTPUT_NAMES or name.startswith(_STAGING_PREFIX):
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


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

  if os.path.isdir(output_dir) and os.listdir(output_dir):
    report = _read_json(os.path.join(output_dir, REPORT))
    if report is not None and report.get("config") != requested:
      raise FileExistsError(
          f"{output_dir} holds a dataset prepared with a different configuration:\n"
          f"  existing:  {json.dumps(report.get('config'), sort_keys=True)}\n"
          f"  requested: {json.dumps(requested, sort_keys=True)}\n"
          "Choose another --output_dir or delete this one.")
    if report is not None and _is_complete(output_dir, report):
      if verbose:
        print(f"{output_dir}: already prepared ({report['counts']['prepared']} subjects), "
              "nothing to do")
      return report
    foreign = [n for n in os.listdir(output_dir)
               if n not in _OUTPUT_NAMES and not n.startswith(_STAGING_PREFIX)]
    if foreign:
      raise FileExistsError(f"{output_dir} is not empty and is not a prepared dataset "
                            f"(it holds {sorted(foreign)[:5]}); choose an empty --output_dir")
    _clear_own_leftovers(output_dir)
  os.makedirs(output_dir, exist_ok=True)

  staging = os.path.join(output_dir, f"{_STAGING_PREFIX}{uuid.uuid4().hex[:12]}")
  os.makedirs(staging)
  try:
    builder = tfds_builders.Acdc(config=builder_config,
                                 data_dir=os.path.join(staging, TFDS_DIR),
                                 file_format="array_record")
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
        "seconds": round(time.time() - start, 2),
    }
    # Rename into place, report.json last: until it exists, the preparation is incomplete.
    for name in (TFDS_DIR, SPLITS, ATTRIBUTES):
      os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    _write_json(os.path.join(staging, REPORT), report)
    os.replace(os.path.join(staging, REPORT), os.path.join(output_dir, REPORT))
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  if verbose:
    counts = report["counts"]
    print(f"prepared {counts['prepared']} of {counts['found']} subjects "
          f"({counts['skipped']} skipped; train/val/test {counts['train']}/{counts['val']}/"
          f"{counts['test']}) into {output_dir} in {report['seconds']:.1f} s")
    for entry in report["subjects"]:
      if entry["status"] == "skipped":
        print(f"  skipped {entry['subject']}: {entry['reason']}")
  return report


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
