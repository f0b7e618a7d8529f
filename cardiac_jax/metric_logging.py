"""Run logs: one JSON object per logged step in metrics.jsonl, and TensorBoard event files.

Only process 0 writes (the writer is a no-op elsewhere). JSON lines are appended and flushed
at once, so a killed run keeps every line it logged; on resume, lines with a step beyond the
restored checkpoint are dropped so the file stays one consistent history: a partial last line
(a run killed while writing it) is dropped too, a record repeated for the same step (two runs
that once wrote the same file) is kept once, its last version, and any other line that is not a
record is a `MetricsFileError` naming the file, the line and the fix.

Besides the scalars, the TensorBoard events hold the figures the loop saves as PNG (image
summaries, the PNG bytes as written) and text (the resolved config); `write_hparams_config` and
`write_run_hparams` write the HParams-dashboard summaries of a grid of runs (experiments.sweep).
"""

from __future__ import annotations

import glob
import json
import math
import os
import struct
import time
from typing import Any, Mapping, Sequence

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


# The TensorBoard event directory inside a run's workdir.
TENSORBOARD_DIR = "tensorboard"


class MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` and TensorBoard events under
  `workdir/TENSORBOARD_DIR`."""

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled and tensorboard:
      from flax.metrics import tensorboard as flax_tb  # Imports TensorFlow; only on process 0.
      self._tb = flax_tb.SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))

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

  def write_png(self, step: int, tag: str, png: bytes) -> None:
    """Logs one PNG file's bytes as the image summary `tag` of `step` (as they are: nothing is
    decoded or re-encoded); ValueError for bytes that are not a PNG."""
    if self._tb is None:
      return
    width, height = png_size(png)
    from tensorboard.plugins.image import metadata as image_metadata  # On first use.
    summary_metadata = image_metadata.create_summary_metadata(display_name=tag, description="")
    # The image plugin's tensor: width and height as strings, then the encoded images.
    self._tb.write(tag, [str(width).encode(), str(height).encode(), png], step,
                   metadata=summary_metadata.SerializeToString())
    self._tb.flush()

  def write_text(self, step: int, tag: str, text: str) -> None:
    """Logs Markdown `text` as the text summary `tag` of `step`."""
    if self._tb is None:
      return
    self._tb.text(tag, text, step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def png_size(png: bytes) -> tuple[int, int]:
  """(width, height) from a PNG's header; ValueError when `png` is not a PNG."""
  if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
    raise ValueError("not a PNG file")
  return struct.unpack(">II", png[16:24])


def config_markdown(config_json: str) -> str:
  """A config's JSON as a Markdown code block (TensorBoard's text dashboard renders Markdown)."""
  text = json.dumps(json.loads(config_json), indent=2, sort_keys=True)
  return f"```json\n{text}\n```"


# ---------------------------------------------------------------------------- HParams
# The summaries of TensorBoard's HParams dashboard: the experiment (every hyperparameter's
# values and the metrics to compare) at the root of a grid, and each run's values in the run's
# own event directory. Written with tensorboard's event writer, without TensorFlow.
HPARAMS_SUFFIX = ".hparams"


def _write_summary_event(logdir: str, summary) -> None:
  """Writes `summary` (a Summary proto) at step 0 in a new event file of `logdir`, replacing the
  HParams event files written there before (TensorBoard reads the first it finds)."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  from tensorboard.summary.writer import event_file_writer  # pylint: disable=g-import-not-at-top
  os.makedirs(logdir, exist_ok=True)
  stale = glob.glob(os.path.join(glob.escape(logdir), f"events.out.tfevents.*{HPARAMS_SUFFIX}"))
  writer = event_file_writer.EventFileWriter(logdir, filename_suffix=HPARAMS_SUFFIX)
  try:
    writer.add_event(event_pb2.Event(wall_time=time.time(), step=0, summary=summary))
    writer.flush()
  finally:
    writer.close()
  for path in stale:  # Listed before the new file existed.
    if os.path.exists(path):
      os.remove(path)


def hparam_value(text: str) -> bool | float | str:
  """A swept value as the HParams dashboard sorts it: a number ("0.05", "100") as a float, a
  boolean ("True"/"False") as a bool, anything else (a tuple "(8,16)") as its text."""
  if text.strip() in ("True", "False"):
    return text.strip() == "True"
  try:
    value = float(text)
  except ValueError:
    return text
  return value if math.isfinite(value) else text


def write_hparams_config(logdir: str, domains: Mapping[str, Sequence[Any]],
                         metrics: Sequence[str]) -> None:
  """The experiment summary of a grid at `logdir` (the grid's root): every hyperparameter's
  values (`domains`: name -> values, as `hparam_value` gives them) and the scalar tags to
  compare (`metrics`, e.g. "val/reconstruction_loss")."""
  from tensorboard.plugins.hparams import api as hp  # pylint: disable=g-import-not-at-top
  hparams = []
  for name, values in domains.items():
    values = list(dict.fromkeys(values))
    kinds = {type(v) for v in values}
    if len(kinds) > 1:  # A discrete domain holds values of one type.
      values = list(dict.fromkeys(str(v) for v in values))
    hparams.append(hp.HParam(name, hp.Discrete(values)))
  summary = hp.hparams_config_pb(hparams=hparams,
                                 metrics=[hp.Metric(tag) for tag in metrics])
  _write_summary_event(logdir, summary)


def write_run_hparams(logdir: str, hparams: Mapping[str, Any], trial_id: str) -> None:
  """One run's hyperparameter values (`hparams`: name -> value) in its event directory `logdir`
  (beside the run's scalars), named `trial_id` in the dashboard."""
  from tensorboard.plugins.hparams import api as hp  # pylint: disable=g-import-not-at-top
  _write_summary_event(logdir, hp.hparams_pb(dict(hparams), trial_id=trial_id))


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All records of `workdir/metrics.jsonl` (a partial last line left out); MetricsFileError
  naming the file and line for a damaged one."""
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path, "rb") as f:
    records, _ = parse_records(f.read(), path)
  return [record for _, record in records]


def comparable_metrics(workdirs: Sequence[str]) -> list[str]:
  """The tags an HParams dashboard compares runs by: train/loss and the validation metrics
  (val/..., without the per-channel _ch<c> entries) logged by any of `workdirs` so far."""
  tags = {}
  for workdir in workdirs:
    try:
      records = read_metrics(workdir)
    except (OSError, MetricsFileError):
      continue
    for record in records:
      for key in record:
        if key == "train/loss" or (key.startswith("val/") and not is_channel_entry(key)):
          tags[key] = None
  return sorted(tags, key=lambda tag: (not tag.startswith("val/"), tag))


def is_channel_entry(key: str) -> bool:
  head, sep, tail = key.rpartition("_ch")
  return bool(head and sep and tail.isdigit())
