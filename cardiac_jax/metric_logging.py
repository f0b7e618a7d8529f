"""Run logs: one JSON object per logged step in metrics.jsonl, and TensorBoard event files.

Only process 0 writes (the writer is a no-op elsewhere). JSON lines are appended and flushed
at once, so a killed run keeps every line it logged; on resume, lines with a step beyond the
restored checkpoint are dropped so the file stays one consistent history: a partial last line
(a run killed while writing it) is dropped too, a record repeated for the same step (two runs
that once wrote the same file) is kept once, its last version, and any other line that is not a
record is a `MetricsFileError` naming the file, the line and the fix.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np


def _to_python(value: Any) -> Any:
  value = np.asarray(value)
  if value.ndim == 0:
    v = value.item()
    if isinstance(v, float) and not math.isfinite(v):
      return str(v)  # JSON has no NaN/Inf; keep them visible as strings.
    return v
  return value.tolist()


class MetricsFileError(ValueError):
  """A metrics.jsonl line that is not a JSON record with an integer step."""


def _record_of(line: bytes) -> dict[str, Any] | str:
  """The record on one line, or why it is not one."""
  try:
    record = json.loads(line.decode("utf-8"))
  except UnicodeDecodeError:
    return "not UTF-8 text"
  except ValueError as e:
    return f"not JSON ({e})"
  if not isinstance(record, dict):
    return f"not a JSON object (a {type(record).__name__})"
  step = record.get("step")
  if isinstance(step, bool) or not isinstance(step, int) or step < 0:
    return f"no integer step >= 0 (step: {step!r})"
  return record


def parse_records(data: bytes, path: str) -> tuple[list[tuple[bytes, dict[str, Any]]], bool]:
  """([(line, record), ...], whether a partial last line was dropped) of a metrics.jsonl's
  bytes. A last line that is not a record and has no newline is the partial write of a killed
  run; any other line that is not a record raises MetricsFileError naming `path` and the line."""
  lines = data.split(b"\n")
  last = len(lines) - 1  # The text after the final newline ("" for a complete file).
  records, partial = [], False
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    record = _record_of(line)
    if isinstance(record, str):
      if number - 1 == last:
        partial = True
        continue
      raise MetricsFileError(
          f"{path} line {number} is damaged: {record}. Delete that line (the other records "
          "are kept), or the whole file to keep no history, and rerun.")
    records.append((line, record))
  return records, partial


def _kind(record: dict[str, Any]) -> tuple[str, ...]:
  """What a record logs ("train", "val", ...): the prefixes of its metric names."""
  return tuple(sorted({k.split("/", 1)[0] for k in record if k != "step"}))


class MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` and TensorBoard events under `workdir`."""

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled and tensorboard:
      from flax.metrics import tensorboard as flax_tb  # Imports TensorFlow; only on process 0.
      self._tb = flax_tb.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def truncate_after(self, step: int) -> None:
    """Keeps the records up to `step` (the restored checkpoint), once each (see the module
    docstring); MetricsFileError for a damaged line."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path, "rb") as f:
      data = f.read()
    records, partial = parse_records(data, self.path)
    if partial:
      print(f"Dropping the partial last line of {self.path} (a run stopped while writing it).",
            flush=True)
    kept = [(line, r) for line, r in records if r["step"] <= step]
    last = {(r["step"], _kind(r)): i for i, (_, r) in enumerate(kept)}
    unique = [item for i, item in enumerate(kept) if last[(item[1]["step"], _kind(item[1]))] == i]
    if len(unique) < len(kept):
      print(f"Keeping one record per step in {self.path}: {len(kept) - len(unique)} repeated "
            "records dropped.", flush=True)
    unique.sort(key=lambda item: item[1]["step"])  # Stable: a step's records keep their order.
    text = b"".join(line + b"\n" for line, _ in unique)
    if text != data:
      tmp = self.path + ".tmp"
      with open(tmp, "wb") as f:
        f.write(text)
      os.replace(tmp, self.path)

  def has_record(self, step: int, prefix: str) -> bool:
    """Whether the file holds a record of `step` with a metric name starting with `prefix`."""
    if not self.enabled or not os.path.exists(self.path):
      return False
    with open(self.path, "rb") as f:
      records, _ = parse_records(f.read(), self.path)
    return any(r["step"] == step and any(k.startswith(prefix) for k in r)
               for _, r in records)

  def write(self, step: int, scalars: Mapping[str, Any], prefix: str = "") -> None:
    if not self.enabled:
      return
    record = {"step": int(step)}
    record.update({f"{prefix}{k}": _to_python(v) for k, v in sorted(scalars.items())})
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.scalar(k, v, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All records of `workdir/metrics.jsonl` (a partial last line left out); MetricsFileError
  naming the file and line for a damaged one."""
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path, "rb") as f:
    records, _ = parse_records(f.read(), path)
  return [record for _, record in records]
