"""Compare evaluated runs side by side: `python -m experiments.compare DIR1 DIR2 ...
[--output=FILE.md] [--group_by_config] [--analysis=tcav|curves]`.

Builds the comparison table of the AR-SIVAE paper (Di Folco et al., MICCAI 2024, Table 1) from
each run's DIR/eval/metrics.json (written by `python -m experiments.evaluate --workdir=DIR`):
one row per run, columns

  reconstruction MSE, PSNR (dB), SSIM | interpretability score, MIG, binned MIG, SAP, SCC
  (means over attributes), modularity | DCI disentanglement, completeness, informativeness
  (mean held-out R^2) | mean |Spearman rho| of the regularised dimensions | codes

("-" where a run has no such metric, e.g. no regularised dimension). The interpretability
columns come from the "interpretability" and "regularized" blocks, the reference protocol
(codes sampled from q(z|x)) unless the run was evaluated with --codes=mean; the last column
says which codes each row scored ("sampled (seed S)" or "mean"; a metrics.json without a
"codes" field predates sampled codes and scored the posterior means). A row is named by its
config name plus the config fields that distinguish it from the other runs of the same config
(read from DIR/config.json), or by the workdir's basename when the run has no config.json.

With `--group_by_config`, runs whose configs are equal except for the field `seed` form one
row showing mean ± std over the seeds (std with Bessel's correction, ddof=1, the spread of a
seed population estimated from a few seeds; a group of one run shows its value alone).

With `--analysis=curves`, the runs' training curves (DIR/metrics.jsonl) are drawn side by side
and summarised (`experiments.curves`: figure, table, CSV).

With `--analysis=tcav`, the runs' TCAV tables (DIR/tcav/results.json of `experiments.tcav`)
are pooled as seeds of one protocol (refused when their concept pool, explained split, set
sizes or concepts differ): per concept the TCAV score, mean directional derivative and CAV
accuracy as mean ± std, each run's p-value, and in how many runs it is significant.

The markdown table is printed and written to --output (default ./comparison.md); the same
table goes to a CSV file with the same stem (means and stds in separate columns), for plotting.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
from typing import Any, Sequence

from absl import app, flags

from cardiac_jax.run_config import comparable_fields, flatten_config


@dataclasses.dataclass(frozen=True)
class Column:
  """One metric column: where it lives in eval/metrics.json and how it is printed."""
  key: str                   # Row dict / CSV key.
  header: str                # Markdown header.
  path: tuple[str, ...]      # Keys into metrics.json.
  digits: int                # Decimals in the markdown table.


COLUMNS = (
    Column("mse", "MSE", ("reconstruction", "mse"), 5),
    Column("psnr", "PSNR (dB)", ("reconstruction", "psnr"), 2),
    Column("ssim", "SSIM", ("reconstruction", "ssim"), 4),
    Column("interpretability", "Interpretability",
           ("interpretability", "interpretability", "mean"), 3),
    Column("mig", "MIG", ("interpretability", "mig", "mean"), 3),
    Column("mig_binned", "MIG (binned)", ("interpretability", "mig_binned", "mean"), 3),
    Column("sap", "SAP", ("interpretability", "sap", "mean"), 3),
    Column("scc", "SCC", ("interpretability", "scc", "mean"), 3),
    Column("modularity", "Modularity", ("interpretability", "modularity"), 3),
    Column("dci_disentanglement", "DCI D", ("interpretability", "dci", "disentanglement"), 3),
    Column("dci_completeness", "DCI C", ("interpretability", "dci", "completeness"), 3),
    Column("dci_informativeness", "DCI I (R^2)",
           ("interpretability", "dci", "informativeness", "mean"), 3),
    Column("regularized_abs_rho", "Mean abs rho (reg. dims)",
           ("regularized", "mean_abs_rho"), 3),
)

# Fields that change what a run logs or where it caches, not what it learns: they never name or
# split a row.
BOOKKEEPING_FIELDS = frozenset({
    "train.log_every", "train.eval_every", "train.checkpoint_every", "train.figure_every",
    "train.max_checkpoints", "train.progress_bar", "data.cache_dir", "parallel.num_devices"})
# A label listing more differing fields than this is unreadable: the workdir name is used.
_MAX_LABEL_FIELDS = 4


class MissingEvaluationError(FileNotFoundError):
  """A run to compare has no eval/metrics.json."""


@dataclasses.dataclass
class Run:
  """One run directory: its resolved config (flattened, may be empty) and eval metrics."""
  workdir: str
  config_name: str | None
  fields: dict[str, Any]     # Flattened config.json ("loss.gamma" -> 0.05); {} if absent.
  metrics: dict[str, Any]    # eval/metrics.json.

  @property
  def seed(self) -> Any:
    return self.fields.get("seed")

  @property
  def basename(self) -> str:
    return os.path.basename(os.path.normpath(self.workdir))


def read_json(path: str) -> dict:
  """The JSON object in `path`; ValueError naming the file when it is cut short, not JSON or
  not text (bytes that are not UTF-8 were reported without the file's name)."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError.
    raise ValueError(f"{path} is not valid JSON ({e}); rerun the job that writes it") from None
  if not isinstance(data, dict):
    raise ValueError(f"{path} holds a {type(data).__name__}, expected a JSON object")
  return data


def evaluate_hint(workdir: str, eval_name: str = "eval") -> str:
  """The command that writes DIR/<eval_name>/metrics.json ("eval_best": of --step=best)."""
  command = f"python -m experiments.evaluate --workdir={workdir}"
  if eval_name != "eval":
    step = eval_name[len("eval_"):] if eval_name.startswith("eval_") else "STEP"
    command += f" --step={step} --output_dir={os.path.join(workdir, eval_name)}"
  return command


def load_run(workdir: str, eval_name: str = "eval") -> Run:
  """Reads DIR/config.json (optional) and DIR/<eval_name>/metrics.json (required)."""
  metrics_path = os.path.join(workdir, eval_name, "metrics.json")
  if not os.path.isdir(workdir):
    raise MissingEvaluationError(
        f"run {workdir} {'is a file' if os.path.exists(workdir) else 'does not exist'}: name "
        f"a run directory of experiments.train, evaluated with "
        f"`{evaluate_hint(workdir, eval_name)}`")
  if not os.path.isfile(metrics_path):
    raise MissingEvaluationError(
        f"run {workdir} has no {metrics_path}: evaluate it first with "
        f"`{evaluate_hint(workdir, eval_name)}`")
  metrics = read_json(metrics_path)
  config_path = os.path.join(workdir, "config.json")
  fields, name = {}, None
  if os.path.isfile(config_path):
    fields = comparable_fields(read_json(config_path))
    name = fields.get("name") or None
  return Run(workdir=workdir, config_name=name, fields=fields, metrics=metrics)


def load_runs(workdirs: Sequence[str], eval_name: str = "eval") -> list[Run]:
  """Loads every run, reporting all runs without evaluation in one error."""
  if not workdirs:
    raise ValueError("no run directories given")
  runs, missing = [], []
  for workdir in workdirs:
    try:
      runs.append(load_run(workdir, eval_name))
    except MissingEvaluationError as e:
      missing.append(str(e))
  if missing:
    raise MissingEvaluationError("\n".join(missing))
  return runs


def metric_value(metrics: dict, column: Column) -> float | None:
  """The column's number in one eval/metrics.json, or None when the run has no such metric."""
  node: Any = metrics
  for key in column.path:
    if not isinstance(node, dict) or key not in node:
      return None
    node = node[key]
  if isinstance(node, bool) or not isinstance(node, (int, float)):
    return None
  return float(node)


def codes_label(metrics: dict) -> str | None:
  """Which codes a run's interpretability columns scored: "sampled (seed S)", "mean", or None
  when it has no interpretability block. Blocks without a "codes" field were written when
  evaluate scored the posterior means."""
  block = metrics.get("interpretability")
  if not isinstance(block, dict):
    return None
  codes = block.get("codes", "mean")
  if codes == "sampled" and "seed" in block:
    return f"sampled (seed {block['seed']})"
  return str(codes)


def _format_field_value(value: Any) -> str:
  if isinstance(value, float):
    return repr(value)  # Exact and short: 0.05, 0.0002, 1e-05.
  if isinstance(value, tuple):
    return "(" + ",".join(_format_field_value(v) for v in value) + ")"
  return str(value)


def _distinguishing_fields(field_sets: Sequence[dict[str, Any]],
                           ignore: frozenset[str]) -> list[str]:
  """Fields (sorted) whose values are not the same in all of `field_sets`."""
  keys = sorted(set().union(*field_sets)) if field_sets else []
  missing = object()
  return [k for k in keys if k not in ignore
          and len({repr(f.get(k, missing)) for f in field_sets}) > 1]


def config_labels(items: Sequence[tuple[str | None, dict[str, Any], str]],
            ignore: frozenset[str]) -> list[str]:
  """Row names for (config name, fields, workdir basename) items: the config name plus the
  fields that differ among the items of the same config name; unique by construction."""
  labels = []
  for name, fields, basename in items:
    if name is None:
      labels.append(basename)
      continue
    siblings = [f for n, f, _ in items if n == name]
    differing = _distinguishing_fields(siblings, ignore)
    if not differing:
      labels.append(name)
    elif len(differing) > _MAX_LABEL_FIELDS:
      labels.append(f"{name} ({basename})")
    else:
      labels.append(name + " " + ",".join(
          f"{k}={_format_field_value(fields.get(k, '-'))}" for k in differing))
  # Equal configs in different workdirs (a rerun, a copy) would share a label.
  counts = {label: labels.count(label) for label in labels}
  return [f"{label} [{basename}]" if counts[label] > 1 else label
          for label, (_, _, basename) in zip(labels, items)]


def _group_runs(runs: Sequence[Run]) -> list[list[Run]]:
  """Runs whose configs are equal except for `seed`, in order of first appearance."""
  groups: dict[Any, list[Run]] = {}
  for run in runs:
    if run.fields:
      key = (run.config_name, tuple(sorted(
          (k, repr(v)) for k, v in run.fields.items()
          if k != "seed" and k not in BOOKKEEPING_FIELDS)))
    else:
      key = ("workdir", os.path.abspath(run.workdir))  # Nothing to group a config-less run by.
    groups.setdefault(key, []).append(run)
  return list(groups.values())


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
  if not values:
    return None, None
  mean = math.fsum(values) / len(values)
  if len(values) == 1:
    return mean, None
  variance = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
  return mean, math.sqrt(variance)


def _format_cell(mean: float | None, std: float | None, digits: int) -> str:
  if mean is None:
    return "-"
  text = f"{mean:.{digits}f}"
  if std is not None:
    text += f" ± {std:.{digits}f}"
  return text


def build_rows(runs: Sequence[Run], group_by_config: bool = False) -> list[dict]:
  """One dict per row: name, workdirs, seeds, n, codes (the distinct `codes_label`s of its runs
  joined by "; ", None when none has one), and per column `key` (mean or value, None when
  absent) and `key_std` (None for a single run)."""
  if group_by_config:
    groups = _group_runs(runs)
    ignore = BOOKKEEPING_FIELDS | {"seed"}
  else:
    groups = [[run] for run in runs]
    ignore = BOOKKEEPING_FIELDS
  names = config_labels([(g[0].config_name, g[0].fields, g[0].basename) for g in groups], ignore)
  rows = []
  for name, group in zip(names, groups):
    row: dict[str, Any] = {"name": name, "workdirs": [r.workdir for r in group],
                           "seeds": [r.seed for r in group], "n": len(group)}
    labels = [label for label in (codes_label(r.metrics) for r in group) if label is not None]
    row["codes"] = "; ".join(dict.fromkeys(labels)) or None
    for column in COLUMNS:
      values = [v for v in (metric_value(r.metrics, column) for r in group) if v is not None]
      row[column.key], row[f"{column.key}_std"] = _mean_std(values)
    rows.append(row)
  return rows


def _format_seeds(seeds: Sequence[Any]) -> str:
  return ",".join("?" if s is None else str(s) for s in seeds)


def markdown_table(rows: Sequence[dict], group_by_config: bool = False) -> str:
  """The rows as a GitHub-flavoured markdown table (one line per row, trailing newline)."""
  from cardiac_jax import io
  headers = (["Run"] + (["Seeds"] if group_by_config else []) + [c.header for c in COLUMNS]
             + ["Codes"])
  cells = [[row["name"].replace("|", "\\|")]
           + ([_format_seeds(row["seeds"])] if group_by_config else [])
           + [_format_cell(row[c.key], row[f"{c.key}_std"], c.digits) for c in COLUMNS]
           + [row["codes"] or "-"] for row in rows]
  return io.markdown_table(headers, cells, "l" + "r" * (len(headers) - 2) + "l")


def comparison_table(workdirs: Sequence[str], group_by_config: bool = False,
                     eval_name: str = "eval") -> tuple[str, list[dict]]:
  """(markdown, rows) comparing the evaluated runs in `workdirs` (see the module docstring).

  Raises:
    MissingEvaluationError: a run has no eval/metrics.json (all such runs are named).
    ValueError: a config.json or metrics.json is not a JSON object; no workdirs.
  """
  rows = build_rows(load_runs(workdirs, eval_name), group_by_config)
  return markdown_table(rows, group_by_config), rows


def write_csv(path: str, rows: Sequence[dict], group_by_config: bool = False) -> None:
  """The table as CSV: run name, seeds, each metric (and its std when grouped), codes."""
  header = ["run"] + (["seeds", "n"] if group_by_config else ["seed"])
  for column in COLUMNS:
    header += [column.key] + ([f"{column.key}_std"] if group_by_config else [])
  header += ["codes", "workdirs"]
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    for row in rows:
      line = [row["name"]]
      line += ([_format_seeds(row["seeds"]), row["n"]] if group_by_config
               else [_format_seeds(row["seeds"])])
      for column in COLUMNS:
        keys = [column.key] + ([f"{column.key}_std"] if group_by_config else [])
        line += ["" if row[k] is None else repr(row[k]) for k in keys]
      line += [row["codes"] or "", ";".join(row["workdirs"])]
      writer.writerow(line)


def write_comparison(workdirs: Sequence[str], output: str, group_by_config: bool = False,
                     eval_name: str = "eval") -> tuple[str, list[dict]]:
  """Writes `output` (markdown) and the CSV beside it; returns (markdown, rows)."""
  markdown, rows = comparison_table(workdirs, group_by_config, eval_name)
  directory = os.path.dirname(os.path.abspath(output))
  os.makedirs(directory, exist_ok=True)
  with open(output, "w") as f:
    f.write(markdown)
  write_csv(csv_path(output), rows, group_by_config)
  return markdown, rows


# ------------------------------------------------------------------------------ TCAV over seeds
# What must be equal for TCAV tables of several runs to be pooled into one.
TCAV_PROTOCOL_KEYS = ("concept_pool", "explain_split", "set_size", "num_random_sets",
                      "allow_overlap", "step_selection")


def load_tcav(workdir: str) -> tuple[dict, Any]:
  """(DIR/tcav/results.json, the run's seed from DIR/config.json or None)."""
  path = os.path.join(workdir, "tcav", "results.json")
  if not os.path.isfile(path):
    raise MissingEvaluationError(f"run {workdir} has no {path}: run "
                                 f"`python -m experiments.tcav --workdir={workdir}` first")
  results = read_json(path)
  config_path = os.path.join(workdir, "config.json")
  seed = (flatten_config(read_json(config_path)).get("seed")
          if os.path.isfile(config_path) else None)
  return results, seed


def tcav_seed_rows(runs: Sequence[tuple[str, dict]]) -> list[dict]:
  """One row per concept over the TCAV results of several runs (seeds) of one protocol: TCAV
  score, mean directional derivative and CAV accuracy as mean and std (ddof=1), each run's
  p-value and in how many runs the concept is significant (each run's own Bonferroni test).

  Raises:
    ValueError: the runs differ in a `TCAV_PROTOCOL_KEYS` value or in their concepts (the
      first run that differs is named): their scores measure different things.
  """
  if not runs:
    raise ValueError("no run directories given")
  (first_dir, first), rest = runs[0], runs[1:]
  concepts = [row["concept"] for row in first["table"]]
  for workdir, results in rest:
    for key in TCAV_PROTOCOL_KEYS:
      if results.get(key) != first.get(key):
        raise ValueError(f"{workdir}: TCAV {key} {results.get(key)!r} differs from "
                         f"{first_dir}'s {first.get(key)!r}; only runs of one protocol pool")
    if [row["concept"] for row in results["table"]] != concepts:
      raise ValueError(f"{workdir}: its TCAV concepts differ from {first_dir}'s")
  rows = []
  for i, concept in enumerate(concepts):
    per_run = [results["table"][i] for _, results in runs]
    row: dict[str, Any] = {"concept": concept, "description": per_run[0]["description"],
                           "control": per_run[0]["control"], "n": len(per_run),
                           "p_values": [r["p_value"] for r in per_run],
                           "significant": sum(bool(r["significant"]) for r in per_run)}
    for key in ("tcav_score", "mean_derivative", "cav_accuracy"):
      row[key], row[f"{key}_std"] = _mean_std([r[key] for r in per_run])
    rows.append(row)
  return rows


def tcav_comparison(workdirs: Sequence[str]) -> tuple[str, list[dict]]:
  """(markdown, rows) of the TCAV tables of `workdirs` pooled over seeds (`tcav_seed_rows`)."""
  from cardiac_jax import io
  if not workdirs:
    raise ValueError("no run directories given")
  loaded = [(workdir, *load_tcav(workdir)) for workdir in workdirs]
  rows = tcav_seed_rows([(workdir, results) for workdir, results, _ in loaded])
  first = loaded[0][1]
  auc = _mean_std([results["auc"] for _, results, _ in loaded])
  header = (f"TCAV over {len(loaded)} runs (seeds {_format_seeds([s for *_, s in loaded])}, "
            f"steps {_format_seeds([r['step'] for _, r, _ in loaded])}): test AUC "
            f"{_format_cell(*auc, 3)}; concept pool {first['concept_pool']}"
            f"{' (overlap allowed)' if first.get('allow_overlap') else ''}; explained split "
            f"{first['explain_split']}; concept sets of {first['set_size']}, "
            f"{first['num_random_sets']} random sets; significance per run (Bonferroni over "
            "its concepts), counted over the runs.\n\n")
  cells = [[row["concept"], row["description"].replace("|", "\\|"),
            _format_cell(row["tcav_score"], row["tcav_score_std"], 3),
            _format_cell(row["mean_derivative"], row["mean_derivative_std"], 3),
            _format_cell(row["cav_accuracy"], row["cav_accuracy_std"], 2),
            ", ".join(f"{p:.2g}" for p in row["p_values"]),
            f"{row['significant']} of {row['n']}"] for row in rows]
  table = io.markdown_table(["Concept", "Description", "TCAV score", "mean S", "CAV acc.",
                             "p-value per run", "significant in"], cells, "llrrrrl")
  return header + table, rows


def write_tcav_csv(path: str, rows: Sequence[dict]) -> None:
  """The pooled TCAV table as CSV (means, stds, p-values joined by ';')."""
  keys = ["tcav_score", "tcav_score_std", "mean_derivative", "mean_derivative_std",
          "cav_accuracy", "cav_accuracy_std"]
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["concept", "control", "n", *keys, "p_values", "significant"])
    for row in rows:
      writer.writerow([row["concept"], row["control"], row["n"],
                       *("" if row[k] is None else repr(row[k]) for k in keys),
                       ";".join(repr(p) for p in row["p_values"]), row["significant"]])


def csv_path(markdown_path: str) -> str:
  return os.path.splitext(markdown_path)[0] + ".csv"


def define_flags() -> None:
  """The command-line flags; defined only when run as a program, so that importing this module
  (the sweep, tests) never collides with another entry point's flags in the same process."""
  flags.DEFINE_string("output", "comparison.md",
                      "Markdown file to write; the CSV goes next to it (same stem).")
  flags.DEFINE_bool("group_by_config", False, "One row per config (runs differing only in "
                    "`seed`), mean ± std over the seeds.")
  flags.DEFINE_enum("analysis", "evaluation", ["evaluation", "tcav", "curves"],
                    "What to compare: the evaluation metrics (DIR/<eval_name>/metrics.json), "
                    "the TCAV tables (DIR/tcav/results.json, pooled over the runs as seeds) or "
                    "the training curves (DIR/metrics.jsonl; a figure beside the table).")
  flags.DEFINE_list("metrics", [], "With --analysis=curves: the logged metrics to draw, e.g. "
                    "train/loss,val/mse (default: train/loss and the runs' train.best_metric).")
  flags.DEFINE_string("eval_name", "eval", "Evaluation folder of each run to compare: eval "
                      "(experiments.evaluate's default) or e.g. eval_best (written by "
                      "`evaluate --step=best --output_dir=DIR/eval_best`).")


def main(argv):
  from experiments import common  # pylint: disable=g-import-not-at-top
  workdirs = common.start_command_with_arguments(
      argv, "give the run directories to compare: python -m experiments.compare DIR1 DIR2 ...",
      quiet=False)
  output = flags.FLAGS.output
  if not output or os.path.isdir(output) or output.endswith(os.sep):
    print(f"error: --output={output!r} must name a markdown file (its CSV goes beside it), "
          "not a folder", file=sys.stderr)
    sys.exit(1)
  real = [os.path.realpath(workdir) for workdir in workdirs]
  repeated = sorted({w for w, r in zip(workdirs, real) if real.count(r) > 1})
  if repeated:
    print(f"error: the same run given more than once: {', '.join(repeated)}", file=sys.stderr)
    sys.exit(1)
  analysis, f = flags.FLAGS.analysis, flags.FLAGS
  # Flags of another analysis are refused, never silently ignored.
  misplaced = [f"{name} applies to --analysis={owner} only" for name, used, owner in (
      ("--group_by_config", f.group_by_config, "evaluation"),
      ("--eval_name", f.eval_name != "eval", "evaluation"),
      ("--metrics", bool(f.metrics), "curves")) if used and analysis != owner]
  if misplaced:
    print(f"error: {'; '.join(misplaced)} (this is --analysis={analysis})", file=sys.stderr)
    sys.exit(1)
  written = [output, csv_path(output)]
  try:
    if flags.FLAGS.analysis == "tcav":
      markdown, rows = tcav_comparison(workdirs)
      os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
      with open(output, "w") as f:
        f.write(markdown)
      write_tcav_csv(csv_path(output), rows)
    elif flags.FLAGS.analysis == "curves":
      from experiments import curves
      markdown = curves.curves_comparison(workdirs, flags.FLAGS.metrics, output)
      written.append(curves.png_path(output))
    else:
      markdown, _ = write_comparison(workdirs, output, flags.FLAGS.group_by_config,
                                     flags.FLAGS.eval_name)
  # FileNotFoundError: MissingEvaluationError as raised by experiments.curves, which imports
  # this module under its own name (a class other than __main__'s).
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(markdown, end="")
  print(f"Wrote {', '.join(written)}", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  app.run(main)
