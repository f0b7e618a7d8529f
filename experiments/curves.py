"""Training curves of several runs side by side: `python -m experiments.compare
--analysis=curves DIR1 DIR2 ... [--metrics=train/loss,val/mse] [--output=FILE.md]`.

Reads each run's metrics.jsonl (`cardiac_jax.metric_logging.read_metrics`). Where a step was
logged more than once (a run resumed from an earlier checkpoint logs the steps after it again),
its last record counts: the values the run went on from. Writes FILE.png (one panel per metric,
one line per run), FILE.csv (every logged point: run, metric, step, value) and FILE.md, a table
per run and metric of the last logged step and value, the mean of the last quarter of the
logged points, and the minimum and maximum with their steps. Runs are named as in the
evaluation table (config name plus the config fields that tell them apart; a field added to
the configs after a run was written counts at the value that reproduces it). Default metrics:
train/loss and each run's selection metric (train.best_metric).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from typing import Any, Sequence

import numpy as np

from experiments import compare


@dataclasses.dataclass
class RunCurves:
  """One run's logged scalars: metric -> (steps, values), steps increasing."""
  workdir: str
  config_name: str | None
  fields: dict[str, Any]
  curves: dict[str, tuple[np.ndarray, np.ndarray]]

  @property
  def basename(self) -> str:
    return os.path.basename(os.path.normpath(self.workdir))


def _number(value: Any) -> float | None:
  """A logged scalar as a float (non-finite values are logged as the strings "nan", "inf")."""
  if isinstance(value, bool):
    return None
  if isinstance(value, (int, float)):
    return float(value)
  if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "+inf"):
    return float(value)
  return None


def load_curves(workdir: str) -> RunCurves:
  """Reads DIR/metrics.jsonl (required) and DIR/config.json (optional, for the run's name).

  Raises:
    compare.MissingEvaluationError: no such run or no metrics.jsonl.
    ValueError: a damaged metrics.jsonl line (named) or config.json.
  """
  from cardiac_jax import metric_logging
  from cardiac_jax.run_config import comparable_fields
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isdir(workdir) or not os.path.isfile(path):
    raise compare.MissingEvaluationError(
        f"run {workdir} has no {path}: name a run directory of experiments.train (it logs "
        "every train.log_every steps)")
  by_metric: dict[str, dict[int, float]] = {}
  for record in metric_logging.read_metrics(workdir):
    for key, value in record.items():
      number = _number(value)
      if key != "step" and number is not None:
        by_metric.setdefault(key, {})[record["step"]] = number
  config_path = os.path.join(workdir, "config.json")
  fields = comparable_fields(compare.read_json(config_path)) if os.path.isfile(config_path) else {}
  curves = {}
  for metric, points in by_metric.items():
    steps = np.array(sorted(points), dtype=np.int64)
    curves[metric] = steps, np.array([points[s] for s in steps], dtype=np.float64)
  return RunCurves(workdir, fields.get("name") or None, fields, curves)


def default_metrics(runs: Sequence[RunCurves]) -> list[str]:
  """train/loss and the runs' selection metrics (train.best_metric), in that order."""
  metrics = ["train/loss"]
  for run in runs:
    best = run.fields.get("train.best_metric")
    if best and best not in metrics:
      metrics.append(best)
  return metrics


def _check_logged(runs: Sequence[RunCurves], metrics: Sequence[str]) -> None:
  """ValueError naming every (run, metric) pair never logged, with what the run did log
  (without the per-channel copies such as val/mse_ch0)."""
  from cardiac_jax.metric_logging import is_channel_entry
  problems = []
  for run in runs:
    missing = [m for m in metrics if m not in run.curves]
    if missing:
      logged = sorted(m for m in run.curves if not is_channel_entry(m))
      problems.append(f"run {run.workdir} never logged {', '.join(missing)}; it logged: "
                      f"{', '.join(logged) or 'nothing'}")
  if problems:
    raise ValueError("\n".join(problems))


def summary(steps: np.ndarray, values: np.ndarray) -> dict[str, float | int | None]:
  """Last step and value, mean of the finite values of the last quarter of the points (at
  least one), and the finite minimum and maximum with their steps (None when no value is
  finite). Both extremes: whether lower or higher is better depends on the metric."""
  tail = values[-max(1, math.ceil(len(values) / 4)):]
  tail = tail[np.isfinite(tail)]
  finite = np.isfinite(values)
  out: dict[str, float | int | None] = {
      "last_step": int(steps[-1]), "last": float(values[-1]),
      "tail_mean": float(tail.mean()) if tail.size else None}
  for name, pick, fill in (("min", np.argmin, np.inf), ("max", np.argmax, -np.inf)):
    at = int(pick(np.where(finite, values, fill))) if finite.any() else None
    out[name] = None if at is None else float(values[at])
    out[f"{name}_step"] = None if at is None else int(steps[at])
  return out


def _format(value: float | None) -> str:
  return "-" if value is None else f"{value:.5g}"


def _extreme(stats: dict, name: str) -> str:
  """"value (step)" of the min or max, "-" when no value is finite."""
  return "-" if stats[name] is None else f"{_format(stats[name])} ({stats[name + '_step']})"


def curves_comparison(workdirs: Sequence[str], metrics: Sequence[str],
                      output: str) -> str:
  """Writes output (markdown), its .png and .csv; returns the markdown."""
  from cardiac_jax import io, viz
  if not workdirs:
    raise ValueError("no run directories given")
  if any(not metric.strip() for metric in metrics):
    raise ValueError(f"--metrics={','.join(metrics)} has an empty metric name")
  runs = [load_curves(workdir) for workdir in workdirs]
  metrics = list(metrics) or default_metrics(runs)
  _check_logged(runs, metrics)
  labels = compare.config_labels([(r.config_name, r.fields, r.basename) for r in runs],
                                 compare.BOOKKEEPING_FIELDS)
  rows = []
  for metric in metrics:
    for label, run in zip(labels, runs):
      stats = summary(*run.curves[metric])
      rows.append([label, metric, stats["last_step"], _format(stats["last"]),
                   _format(stats["tail_mean"]), _extreme(stats, "min"),
                   _extreme(stats, "max")])
  markdown = (f"Curves of {len(runs)} runs (metrics.jsonl; a step logged twice keeps its last "
              "record); figure: " + os.path.basename(png_path(output)) + "\n\n"
              + io.markdown_table(["Run", "Metric", "last step", "last", "mean, last quarter",
                                   "min (step)", "max (step)"], rows, "llrrrrr"))
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  viz.save_curves_figure(png_path(output), [
      (metric, [(label, *run.curves[metric]) for label, run in zip(labels, runs)])
      for metric in metrics])
  with open(compare.csv_path(output), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["run", "workdir", "metric", "step", "value"])
    for metric in metrics:
      for label, run in zip(labels, runs):
        for step, value in zip(*run.curves[metric]):
          writer.writerow([label, run.workdir, metric, int(step), repr(float(value))])
  with open(output, "w") as f:
    f.write(markdown)
  return markdown


def png_path(markdown_path: str) -> str:
  return os.path.splitext(markdown_path)[0] + ".png"
