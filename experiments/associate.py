"""Association of every latent of a diffae3d run with the cohort's traits:
`python -m experiments.associate --workdir=DIR`.

  python -m experiments.associate --workdir=DIR [--latents=FILE] [--traits=lv_edv_ml,...]
      [--binary_traits=group:DCM,...] [--covariates=height_cm,weight_kg,heart_rate_bpm]
      [--covariates_file=CSV] [--inverse_normal] [--splits=train,val,test] [--alpha=0.05]

Inputs:
- Latents: DIR/latents/latents.csv (header `subject,split,z0,...,z{D-1}`, one row per subject
  of the run's prepared dataset: the EMA encoder's z_sem), or --latents=FILE in that format
  (or a PLINK phenotype file; `cardiac_jax.phenotypes.read_latents`). When the default file is
  missing it is computed first (`experiments.infer_latents.load_or_compute`). Subjects of
  --splits are tested (default: all of them: the encoder never saw a trait, so there is no
  training-set bias to avoid); every one of them needs finite latents.
- Traits: continuous columns of the prepared dataset's attributes.csv (--traits, default every
  attribute of `structures.ATTRIBUTE_NAMES`), tested by linear regression; binary traits
  `column:value` (--binary_traits, default `group:<g>` for every diagnostic group of the
  cohort), y = 1 where attributes.csv's column equals value, tested by logistic regression.
  A subject without a trait value (no attributes.csv row, or an empty or NA cell) is dropped
  from that trait's tests; a cell that is not a number is an error naming the subject
  (`read_attributes`, `trait_values`: the trait reader of experiments.probe and manipulate too).
- Covariates (--covariates, default height_cm, weight_kg, heart_rate_bpm): columns of a CSV
  with a `subject` column, --covariates_file, by default the generating parameters.csv of a
  synthetic cohort (the raw folder recorded in the prepared dataset's report.json, or
  `cine.synthetic_raw_dir`); for other datasets without --covariates_file, no covariates.
  Every tested subject needs every covariate: a missing row or value is an error naming the
  subjects and the file. --covariates= (empty) tests without covariates.

Tests (`cardiac_jax.association`): for latent d and trait y over the subjects with a value,
  linear:    y = b0 + b z_d + C g + e,  t-test of b (Student t, n - k degrees of freedom);
  logistic:  logit P(y = 1) = b0 + b z_d + C g,  Wald z-test of b (Newton-Raphson);
z_d standardised (mean 0, SD 1 over the tested subjects, after the rank-based inverse normal
transform of each latent when --inverse_normal: `phenotypes.inverse_normal_transform`), so b
is the trait change (or log odds ratio) per standard deviation of the latent. A logistic fit
that separates the classes or does not converge reports NaN se, stat, p (converged False).
Benjamini-Hochberg over all the finite P-values of all traits and latents: q; significant =
q < --alpha.

Writes DIR/associate/ (or --output_dir):
- associations.csv: trait, kind, latent, n, beta, se, stat, p, q, significant, converged, note
  (one row per trait x latent, traits in the order given, latents in index order);
- summary.md: the settings, and per trait its number of significant latents at q < alpha,
  tests without a P-value, and its 5 latents of smallest P-value (with beta and q);
- manhattan.png: -log10 p of every test, latents in index order within a block per trait
  (alternating colours), the BH line (`association.bh_threshold`: the largest significant
  P-value, or alpha / m when nothing is significant) dashed, the significant tests in red
  (the 3 strongest per trait labelled).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional, Sequence

from absl import app, flags, logging
import numpy as np

from cardiac_jax import io
from data_pipelines.errors import InvalidArgumentError, InvalidInputError

OUTPUT_DIR = "associate"
DEFAULT_COVARIATES = ("height_cm", "weight_kg", "heart_rate_bpm")
SPLITS = ("train", "val", "test")
PARAMETERS_CSV = "parameters.csv"
TOP_LATENTS = 5
ANNOTATED_PER_TRAIT = 3


# ----------------------------------------------------------------------------- traits

@dataclasses.dataclass(frozen=True)
class Trait:
  """A tested trait: `values` (N,) aligned to the latents' subjects, NaN where missing."""
  name: str
  kind: str           # "linear" | "logistic"
  values: np.ndarray


def read_attributes(directory: str) -> tuple[str, dict[str, dict[str, str]]]:
  """(path, {subject: row}) of the attributes.csv of a prepared dataset (`common.read_table`);
  FileNotFoundError when the dataset has none."""
  from data_pipelines import prepare  # pylint: disable=g-import-not-at-top
  from experiments import common  # pylint: disable=g-import-not-at-top
  path = os.path.join(directory, prepare.ATTRIBUTES)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: the run's prepared dataset has no "
                            "attributes.csv (no labelled subjects), so there are no traits")
  return path, common.read_table(path)


def _columns(table: dict[str, dict[str, str]]) -> set[str]:
  return set(next(iter(table.values())).keys()) if table else set()


def parse_binary_trait(spec: str) -> tuple[str, str]:
  """"column:value" -> (column, value)."""
  column, sep, value = spec.partition(":")
  if not sep or not column or not value:
    raise InvalidArgumentError(f"--binary_traits: a binary trait is column:value (e.g. "
                               f"group:DCM), got {spec!r}")
  return column, value


def trait_values(table: dict[str, dict[str, str]], subjects: Sequence[str], name: str,
                 path: str) -> Trait:
  """One trait of attributes.csv (`read_attributes`) for `subjects`: a continuous column
  (linear; NaN without a row or for a missing cell: empty, NA, nan; ValueError naming the file
  and subject for a value that is not a number), or "column:value" (logistic: 1 where the
  column equals value, 0 elsewhere, NaN without a row or an empty cell). ValueError naming the
  file for an unknown column."""
  from cardiac_jax import phenotypes  # pylint: disable=g-import-not-at-top
  columns = _columns(table)
  if ":" in name:
    column, value = parse_binary_trait(name)
    if column not in columns:
      raise InvalidArgumentError(f"{path}: binary trait {name!r}: no column {column!r} "
                                 f"(columns: {sorted(columns)})")
    cells = [table.get(s, {}).get(column) for s in subjects]
    values = np.asarray([math.nan if c in (None, "") else float(c == value) for c in cells])
    return Trait(name=name, kind="logistic", values=values)
  if name not in columns:
    raise InvalidArgumentError(f"{path}: no column {name!r} for the trait (columns: "
                               f"{sorted(columns)})")
  values = np.asarray([phenotypes.parse_number(table.get(s, {}).get(name),
                                               f"{path}: subject {s}, {name}")
                       for s in subjects], dtype=np.float64).reshape(len(subjects))
  return Trait(name=name, kind="linear", values=values)


def default_covariates_file(config) -> Optional[str]:
  """parameters.csv of the synthetic cohort the run's data was prepared from, if any: the raw
  folder recorded in the prepared dataset's report.json, else `cine.synthetic_raw_dir` for
  data.dataset "synthetic"."""
  from data_pipelines import cine, prepare  # pylint: disable=g-import-not-at-top
  candidates = []
  report = io.read_json(os.path.join(cine.prepared_cine_dir(config, create=False),
                                    prepare.REPORT)) or {}
  recorded = report.get("config") or {}
  if recorded.get("dataset") == "synthetic" and recorded.get("input_dir"):
    candidates.append(os.path.join(recorded["input_dir"], PARAMETERS_CSV))
  if cine.data_field(config.data, "dataset") == "synthetic":
    candidates.append(os.path.join(cine.synthetic_raw_dir(config.data), PARAMETERS_CSV))
  return next((c for c in candidates if os.path.isfile(c)), None)


def covariate_matrix(path: str, names: Sequence[str], subjects: Sequence[str]) -> np.ndarray:
  """(N, c) covariates `names` of `subjects` from the CSV at `path` (a `subject` column);
  ValueError naming the subjects without a row or a numeric value, and the file."""
  from cardiac_jax import phenotypes  # pylint: disable=g-import-not-at-top
  from experiments import common  # pylint: disable=g-import-not-at-top
  table = common.read_table(path)
  absent = [n for n in names if n not in _columns(table)]
  if absent:
    raise InvalidArgumentError(f"{path}: no covariate columns {absent} (columns: "
                               f"{sorted(_columns(table))})")
  missing = [s for s in subjects if s not in table]
  if missing:
    raise InvalidInputError(f"{path}: {len(missing)} subject(s) have no covariate row: "
                            f"{missing[:20]}{' ...' if len(missing) > 20 else ''}")
  values = np.asarray([[phenotypes.parse_number(table[s][n], f"{path}: subject {s}, {n}")
                        for n in names] for s in subjects],
                      dtype=np.float64).reshape(len(subjects), len(names))
  bad = [f"{subjects[i]} ({names[j]})" for i, j in zip(*np.nonzero(~np.isfinite(values)))]
  if bad:
    raise InvalidInputError(f"{path}: missing or non-finite covariate values: {bad[:20]}")
  return values


# ----------------------------------------------------------------------------- tests

def _zscore(x: np.ndarray) -> np.ndarray:
  sd = x.std(axis=0)
  return (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


def association_rows(z: np.ndarray, traits: Sequence[Trait], covariates: Optional[np.ndarray],
                     inverse_normal: bool = False, alpha: float = 0.05) -> list[dict]:
  """Every latent x trait test with BH q-values over all of them (module docstring).

  Args:
    z: (N, D) latents of the tested subjects.
    traits: traits with (N,) values, NaN where missing.
    covariates: (N, c) or None.
    inverse_normal: rank-based inverse normal transform of each latent over the N subjects.
    alpha: BH level of `significant`.

  Returns:
    One dict per (trait, latent): trait, kind, latent, n, beta, se, stat, p, q, significant,
    converged, note.
  """
  from cardiac_jax import association, phenotypes  # pylint: disable=g-import-not-at-top
  z = np.asarray(z, np.float64)
  if inverse_normal:
    z = phenotypes.inverse_normal_transform(z)
  rows = []
  for trait in traits:
    keep = np.isfinite(trait.values)
    y = trait.values[keep]
    zk = _zscore(z[keep])
    ck = None if covariates is None or covariates.shape[1] == 0 else _zscore(covariates[keep])
    test = (association.ols_association if trait.kind == "linear"
            else association.logistic_association)
    for d in range(z.shape[1]):
      result = test(y, zk[:, d], ck)
      rows.append({"trait": trait.name, "kind": trait.kind, "latent": d, "n": result.n,
                   "beta": result.beta, "se": result.se, "stat": result.stat, "p": result.p,
                   "converged": result.converged, "note": result.note})
  q = association.benjamini_hochberg([r["p"] for r in rows])
  for row, value in zip(rows, q):
    row["q"] = float(value)
    row["significant"] = bool(np.isfinite(value) and value < alpha)
  order = ("trait", "kind", "latent", "n", "beta", "se", "stat", "p", "q", "significant",
           "converged", "note")
  return [{key: row[key] for key in order} for row in rows]


# ----------------------------------------------------------------------------- outputs

def _format(value) -> str:
  if isinstance(value, (bool, np.bool_)):
    return str(bool(value))
  if isinstance(value, float):
    return "nan" if math.isnan(value) else f"{value:.6g}"
  return str(value)


def write_summary(path: str, rows: list[dict], header: list[str], alpha: float) -> str:
  """summary.md: settings lines, then one table row per trait."""
  lines = ["# Latent-trait associations", "", *header, "",
           f"| trait | kind | n | significant (q < {alpha:g}) | no P-value | top {TOP_LATENTS} "
           "latents (beta, q) |", "|---|---|---|---|---|---|"]
  traits = list(dict.fromkeys(r["trait"] for r in rows))
  for trait in traits:
    tests = [r for r in rows if r["trait"] == trait]
    finite = sorted((r for r in tests if np.isfinite(r["p"])), key=lambda r: r["p"])
    top = ", ".join(f"z{r['latent']} ({r['beta']:+.3g}, {r['q']:.2g})"
                    for r in finite[:TOP_LATENTS]) or "-"
    n = max(r["n"] for r in tests)
    lines.append(f"| {trait} | {tests[0]['kind']} | {n} | "
                 f"{sum(r['significant'] for r in tests)} | {len(tests) - len(finite)} | "
                 f"{top} |")
  io.write_text(path, "\n".join(lines) + "\n")
  return path


def save_manhattan(path: str, rows: list[dict], threshold: float, title: str) -> str:
  """Manhattan-style plot of -log10 p (module docstring)."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  traits = list(dict.fromkeys(r["trait"] for r in rows))
  num_latents = max(r["latent"] for r in rows) + 1
  gap = max(1, num_latents // 8)
  width = min(18.0, max(8.0, 0.55 * len(traits) + 0.004 * len(rows) + 4.0))
  fig = Figure(figsize=(width, 4.8), dpi=110, layout="constrained")
  ax = fig.add_subplot()
  colours = ("#1f4e79", "#6fa8dc")
  centres = []
  top = -math.log10(threshold)
  for k, trait in enumerate(traits):
    offset = k * (num_latents + gap)
    tests = [r for r in rows if r["trait"] == trait and np.isfinite(r["p"])]
    x = np.asarray([offset + r["latent"] for r in tests], dtype=float)
    y = np.asarray([-math.log10(max(r["p"], 1e-300)) for r in tests])
    significant = np.asarray([r["significant"] for r in tests], dtype=bool)
    ax.scatter(x[~significant], y[~significant], s=9, color=colours[k % 2], linewidths=0)
    ax.scatter(x[significant], y[significant], s=22, color="#c00000", linewidths=0)
    # Only the strongest few per trait are named: 128 labels would hide the points.
    for i in [i for i in np.argsort(-y) if significant[i]][:ANNOTATED_PER_TRAIT]:
      r, xi, yi = tests[i], x[i], y[i]
      ax.annotate(f"z{r['latent']}", (xi, yi), xytext=(2, 2), textcoords="offset points",
                  fontsize=7)
    if k:
      ax.axvline(offset - (gap + 1) / 2, color="#dddddd", linewidth=0.6, zorder=0)
    top = max(top, float(y.max()) if y.size else 0.0)
    centres.append(offset + (num_latents - 1) / 2)
  ax.axhline(-math.log10(threshold), color="#c00000", linestyle="--", linewidth=1.0,
             label=f"BH threshold (p = {threshold:.2g})")
  ax.set_xticks(centres)
  ax.set_xticklabels(traits, rotation=35, ha="right", fontsize=8)
  ax.set_xlim(-gap, len(traits) * (num_latents + gap))
  ax.set_ylim(0, top * 1.1 + 0.2)
  ax.set_ylabel("-log10 p", fontsize=9)
  ax.set_xlabel(f"latent index (0..{num_latents - 1}) within each trait", fontsize=9)
  ax.set_title(title, fontsize=10)
  ax.legend(loc="upper right", fontsize=8)
  ax.tick_params(axis="y", labelsize=8)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  return path


# ----------------------------------------------------------------------------- driver

def associate(workdir: str, latents_path: Optional[str] = None,
              traits: Optional[Sequence[str]] = None,
              binary_traits: Optional[Sequence[str]] = None,
              covariates: Optional[Sequence[str]] = None,
              covariates_file: Optional[str] = None, inverse_normal: bool = False,
              splits: Sequence[str] = SPLITS, alpha: float = 0.05,
              output_dir: Optional[str] = None, step=None) -> dict:
  """Runs every latent x trait test and writes the outputs (module docstring). An explicit
  `step` (--step, `common.parse_step`) brings the run's own latents to that checkpoint.

  traits / binary_traits / covariates None mean the defaults; empty lists mean none.
  Returns {"rows", "threshold", "output_dir", "num_subjects", "covariates"}.
  """
  from cardiac_jax import association, structures  # pylint: disable=g-import-not-at-top
  from data_pipelines import cine  # pylint: disable=g-import-not-at-top
  from experiments import common, infer_latents  # pylint: disable=g-import-not-at-top
  # The arguments are checked before any latent is computed.
  unknown = [s for s in splits if s not in SPLITS]
  if unknown or not splits:
    raise InvalidArgumentError(f"--splits: unknown splits {unknown} (train, val, test)" if unknown
                               else "--splits is empty: name the splits whose subjects are "
                               "tested (train, val, test)")
  if not 0.0 < alpha < 1.0:
    raise InvalidArgumentError(f"--alpha must be in (0, 1), got {alpha}")
  for spec in binary_traits or ():
    parse_binary_trait(spec)
  config = common.load_run_config(workdir)
  latents = infer_latents.load_or_compute(workdir, latents_path, refresh=step is not None,
                                          step=step)
  tested_latents = latents.in_splits(splits).require_finite()
  subjects, z = tested_latents.subjects, tested_latents.z
  if len(subjects) < 3:
    raise InvalidInputError(f"{latents.path}: {len(subjects)} subjects in splits "
                            f"{list(splits)}; association needs at least 3")

  attributes_path, table = read_attributes(cine.prepared_cine_dir(config, create=False))
  if traits is None:
    traits = list(structures.ATTRIBUTE_NAMES)
  if binary_traits is None:
    present = {row.get("group") for row in table.values()}
    binary_traits = [f"group:{g}" for g in structures.GROUPS if g in present]
  for spec in binary_traits:
    parse_binary_trait(spec)
  tested = [trait_values(table, subjects, name, attributes_path)
            for name in list(traits) + list(binary_traits)]
  if not tested:
    raise InvalidArgumentError("no traits to test (--traits and --binary_traits are both empty)")

  explicit = covariates is not None
  names = list(DEFAULT_COVARIATES) if covariates is None else [c for c in covariates if c]
  source = covariates_file or (default_covariates_file(config) if names else None)
  if names and source is None:
    if explicit:
      raise InvalidArgumentError(f"covariates {names} were asked for, but the run's dataset has "
                                 "no generating parameters.csv: give --covariates_file=CSV "
                                 "(with a subject column)")
    logging.warning("no covariates file for this dataset: testing without covariates")
    names = []
  matrix = covariate_matrix(source, names, subjects) if names else None

  rows = association_rows(z, tested, matrix, inverse_normal=inverse_normal, alpha=alpha)
  threshold = association.bh_threshold([r["p"] for r in rows], alpha)
  out = output_dir or os.path.join(workdir, OUTPUT_DIR)
  io.write_csv(os.path.join(out, "associations.csv"),
               [{k: _format(v) for k, v in r.items()} for r in rows])
  num_tests = int(sum(np.isfinite(r["p"]) for r in rows))
  header = [
      f"- run: `{os.path.abspath(workdir)}` ({config.name})",
      f"- latents: `{latents.path}`: {len(subjects)} subjects of splits {', '.join(splits)}, "
      f"D = {z.shape[1]}{', rank-based inverse normal transformed' if inverse_normal else ''}",
      f"- traits: `{attributes_path}`",
      f"- covariates: {', '.join(names) if names else 'none'}"
      + (f" from `{source}`" if names else ""),
      f"- tests: {len(rows)} ({num_tests} with a P-value); Benjamini-Hochberg over all, "
      f"alpha = {alpha:g}, P-value threshold {threshold:.3g}; "
      f"{sum(r['significant'] for r in rows)} significant",
      "- beta: trait change (linear) or log odds ratio (logistic) per SD of the latent",
  ]
  write_summary(os.path.join(out, "summary.md"), rows, header, alpha)
  save_manhattan(os.path.join(out, "manhattan.png"), rows, threshold,
                 f"{config.name}: latent-trait associations ({len(subjects)} subjects, "
                 f"covariates: {', '.join(names) or 'none'})")
  return {"rows": rows, "threshold": threshold, "output_dir": out,
          "num_subjects": len(subjects), "covariates": names}


def define_flags() -> None:
  """The command-line flags; defined only when run as a program."""
  from experiments import common  # pylint: disable=g-import-not-at-top
  common.define_workdir_flag("diffae3d run directory.")
  common.define_step_flag("Checkpoint of computed latents: a step, best (the best validation "
                          "checkpoint) or latest (default).")
  common.define_latents_flag()
  flags.DEFINE_list("traits", None, "Continuous attributes.csv columns (default: every "
                    "attribute).")
  flags.DEFINE_list("binary_traits", None, "column:value binary traits (default: group:<g> for "
                    "every group of the cohort).")
  flags.DEFINE_list("covariates", None, "Covariate columns (default: height_cm, weight_kg, "
                    "heart_rate_bpm when a covariates file is found; empty for none).")
  flags.DEFINE_string("covariates_file", None, "CSV with a subject column (default: the "
                      "synthetic cohort's parameters.csv).")
  flags.DEFINE_bool("inverse_normal", False, "Rank-based inverse normal transform of each "
                    "latent before testing.")
  common.define_splits_flag("Splits whose subjects are tested.", list(SPLITS))
  flags.DEFINE_float("alpha", 0.05, "Benjamini-Hochberg level.")
  common.define_output_dir_flag("Output folder (default: DIR/associate).")
  # Flags defined by experiments.common are this command's: --help lists them.
  flags.adopt_module_key_flags(common)


def main(argv):
  from experiments import common  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  common.start_command(argv, workdir=f.workdir)
  from cardiac_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  workdir_lib.check_output_dir(f.output_dir)
  result = associate(f.workdir, latents_path=f.latents, traits=f.traits,
                     binary_traits=f.binary_traits, covariates=f.covariates,
                     covariates_file=f.covariates_file, inverse_normal=f.inverse_normal,
                     splits=f.splits, alpha=f.alpha, output_dir=f.output_dir, step=f.step)
  with open(os.path.join(result["output_dir"], "summary.md"), encoding="utf-8") as fh:
    print(fh.read())


if __name__ == "__main__":
  define_flags()
  app.run(main)
