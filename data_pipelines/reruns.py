"""A rerun of a preparation into a complete one: what it can reuse and what changed.

The previous preparation is a source of unchanged subjects (their outcomes, splits and
attributes); the inputs are fingerprinted again (`fingerprints`) and compared subject by subject
with the ones report.json recorded, so that only changed and new subjects are prepared again.
"""

from __future__ import annotations

import csv
import os

from cardiac_jax import structures
from data_pipelines import acdc
from data_pipelines import fingerprints
from data_pipelines import subject_cache
from data_pipelines import tfds_builders


def previous_preparation(output_dir: str, report: dict,
                         attributes_file: str) -> tfds_builders.PreviousPreparation:
  """The complete preparation in output_dir (its report.json, its attributes_file) as a source
  of unchanged subjects."""
  rows = {}
  with open(os.path.join(output_dir, attributes_file), newline="", encoding="utf-8") as f:
    for row in csv.DictReader(f):
      rows[row["subject"]] = row
  outcomes, split_of = {}, {}
  for entry in report.get("subjects", []):
    if not isinstance(entry.get("inputs"), dict):
      continue                           # not a subject folder: judged again every run
    outcome = subject_cache.SubjectOutcome(
        subject=entry["subject"], directory=entry["directory"], status=entry["status"],
        reason=entry.get("reason"), group=entry.get("group"), inputs=entry["inputs"],
        unexpected=bool(entry.get("unexpected", False)))
    row = rows.get(entry["subject"])
    if entry["status"] == "prepared":
      split_of[entry["subject"]] = entry["split"]
      if row is not None:
        outcome.ed_frame, outcome.es_frame = int(row["ed_frame"]), int(row["es_frame"])
        outcome.attributes = {name: float(row[name]) for name in structures.ATTRIBUTE_NAMES}
    outcomes[entry["subject"]] = outcome
  return tfds_builders.PreviousPreparation(os.path.join(output_dir, report["tfds_dir"]),
                                           outcomes, split_of)


def input_changes(report: dict, subjects, skipped, known: dict[str, dict],
                  rehash: bool) -> tuple[dict, dict[str, dict]]:
  """What differs between the inputs a report was prepared from and the input folder now.

  Returns ({"unchanged": n, "changed": {subject: what}, "added": [...], "removed": [...],
  "other_entries": bool}, {directory: current fingerprint}). `known`: fingerprints computed
  earlier in this run, by directory (their hashes are reused for unchanged files).
  """
  recorded = {e["subject"]: e for e in report.get("subjects", [])
              if isinstance(e.get("inputs"), dict)}
  changes = {"unchanged": 0, "changed": {}, "added": [], "removed": [], "other_entries": False}
  inputs = {}
  for subject, directory in subjects:
    entry = recorded.pop(subject, None)
    same_folder = entry is not None and entry["directory"] == acdc.printable_path(directory)
    previous = known.get(directory) or (entry["inputs"] if same_folder else None)
    inputs[directory] = fingerprints.subject_inputs(directory, previous, rehash=rehash)
    if entry is None:
      changes["added"].append(subject)
    elif not same_folder:
      changes["changed"][subject] = f"moved from {entry['directory']}"
    elif not fingerprints.same_content(entry["inputs"], inputs[directory]):
      changes["changed"][subject] = fingerprints.describe_difference(entry["inputs"],
                                                                     inputs[directory])
    else:
      changes["unchanged"] += 1
  changes["removed"] = sorted(recorded)
  before = sorted((e["subject"], e.get("reason") or "") for e in report.get("subjects", [])
                  if not isinstance(e.get("inputs"), dict))
  now = sorted((o.subject, o.reason or "") for o in skipped)
  changes["other_entries"] = before != now
  return changes, inputs


def has_changes(changes: dict) -> bool:
  """Whether `input_changes` found anything that differs."""
  return bool(changes["changed"] or changes["added"] or changes["removed"]
              or changes["other_entries"])


def describe_changes(changes: dict) -> str:
  """One line of what `input_changes` found (at most five subjects of each kind named)."""
  parts = []
  if changes["changed"]:
    shown = "; ".join(f"{s}: {what}" for s, what in list(changes["changed"].items())[:5])
    more = ", ..." if len(changes["changed"]) > 5 else ""
    parts.append(f"{len(changes['changed'])} changed ({shown}{more})")
  for key in ("removed", "added"):
    if changes[key]:
      more = ", ..." if len(changes[key]) > 5 else ""
      parts.append(f"{len(changes[key])} {key} ({', '.join(changes[key][:5])}{more})")
  if changes["other_entries"]:
    parts.append("the folder entries that are not subjects differ")
  return ", ".join(parts)
