"""Run logs: one JSON object per logged step in metrics.jsonl, and TensorBoard event files.

Only process 0 writes (the writer is a no-op elsewhere). JSON lines are appended and flushed
at once, so a killed run keeps every line it logged; on resume, lines with a step beyond the
restored checkpoint are dropped so the file stays one consistent history.
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
    """Drops logged lines with step > `step` (lines from beyond the restored checkpoint)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(kept)
      os.replace(tmp, self.path)

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
  """All records of `workdir/metrics.jsonl`."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
