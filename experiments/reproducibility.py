"""Reproducibility of DiffAE latents across training seeds:
`python -m experiments.reproducibility DIR_seed1 DIR_seed2 [...]`.

  python -m experiments.reproducibility DIR_a DIR_b [DIR_c ...] [--threshold=0.5]
      [--splits=train,val,test] [--output_dir=DIR_a/reproducibility] [--batch_size=B]

Reproducibility across seeds (Ometto et al. 2024): for each latent of one seed, its best
|cosine| or |Pearson r| match among another seed's latents across subjects; the latent is
reproduced when that is above the threshold (0.5).

1. Latents: each run's DIR/latents/latents.csv (`experiments.infer_latents.load_or_compute`,
   computed when absent or not that run's), restricted to --splits (default: every split) and to the
   subjects common to all runs (ValueError naming the runs when fewer than 3 are).
2. Matching (`cardiac_jax.phenotypes.match_latents`) over every ordered pair of runs (a, b),
   a != b: per latent i of a, max_j |r_ij| and max_j |cos_ij| over the latents j of b; the
   best match is not one-to-one (several latents of a may share a partner; the distinct
   partners are counted too). A run given twice is matched with itself (every latent is then
   reproduced, a sanity check).
3. Counts (`phenotypes.reproducibility_counts`): latents of a with best |r| > threshold, best
   |cos| > threshold, either, out of D_a; per pair and their mean over the ordered pairs.

Writes --output_dir (default: the first workdir's reproducibility/): results.json (runs,
subjects, threshold, per pair the counts and the best |r| / |cos| and partner of every latent,
the means), reproducibility.md (the table, printed too) and abs_pearson_heatmap.png (per
unordered pair the |r| matrix, rows: latents of a by decreasing best |r|, columns: latents of b
in the order they are first a best partner, then the others).
"""

from __future__ import annotations

import itertools
import os
from typing import Callable, Optional, Sequence

from absl import app, flags

from cardiac_jax import io
from cardiac_jax import runtime
from experiments import common

MIN_SUBJECTS = 3
SPLITS = ("train", "val", "test")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command-line flags; defined only when run as a program (a test passes its own
  FlagValues)."""
  fv = {"flag_values": flag_values}
  flags.DEFINE_float("threshold", 0.5, "A latent is reproduced when its best |r| (|cos|) in "
                     "the other run is above this.", **fv)
  common.define_splits_flag("Subjects of these splits only (default: all).",
                            flag_values=flag_values)
  common.define_output_dir_flag("Output folder (default: the first workdir's "
                                "reproducibility/).", flag_values)
  flags.DEFINE_integer("batch_size", None, "Batch size of latents that must be computed.",
                       lower_bound=1, **fv)
  common.define_step_flag("Checkpoint of every run: a step, best (the best validation "
                          "checkpoint) or latest (default).", flag_values)
  # Flags defined by experiments.common are this command's: --help lists them.
  flags.adopt_module_key_flags(common, flag_values)


_log = runtime.phase_logger('reproducibility')


def run_labels(workdirs: Sequence[str]) -> list[str]:
  """Short unique labels: the folder names, numbered when two runs share one."""
  names = [os.path.basename(os.path.normpath(os.path.abspath(w))) for w in workdirs]
  if len(set(names)) == len(names):
    return names
  return [f"{i}:{name}" for i, name in enumerate(names)]


def align_latents(tables, labels: Sequence[str], splits: Optional[Sequence[str]] = None):
  """(subjects, [(N, D_k) codes of run k]) on the subjects common to every table (of `splits`
  when given), in the first table's order. ValueError naming the runs when fewer than
  MIN_SUBJECTS subjects are shared."""
  from cardiac_jax import phenotypes
  if splits:
    tables = [t.in_splits(splits) for t in tables]
  subjects = phenotypes.common_subjects(tables)
  if len(subjects) < MIN_SUBJECTS:
    counts = ", ".join(f"{label}: {len(t.subjects)}" for label, t in zip(labels, tables))
    from data_pipelines.errors import InvalidInputError
    raise InvalidInputError(f"the runs {', '.join(labels)} share {len(subjects)} subjects"
                     f"{f' in splits {list(splits)}' if splits else ''} (subjects per run: "
                     f"{counts}); matching latents needs at least {MIN_SUBJECTS} common "
                     "subjects")
  return subjects, [t.rows(subjects) for t in tables]


def match_pairs(codes: Sequence, labels: Sequence[str], threshold: float = 0.5) -> dict:
  """Counts of every ordered pair and their mean (module docstring)."""
  import numpy as np
  from cardiac_jax import phenotypes
  pairs, matches = [], {}
  for a, b in itertools.permutations(range(len(codes)), 2):
    match = phenotypes.match_latents(codes[a], codes[b], MIN_SUBJECTS)
    matches[(a, b)] = match
    counts = phenotypes.reproducibility_counts(match, threshold)
    pairs.append({"reference": labels[a], "other": labels[b], "reference_index": a,
                  "other_index": b, **counts,
                  "best_abs_pearson": match.best_abs_pearson.round(6).tolist(),
                  "best_pearson_index": match.best_pearson_index.tolist(),
                  "best_abs_cosine": match.best_abs_cosine.round(6).tolist(),
                  "best_cosine_index": match.best_cosine_index.tolist()})
  keys = ("pearson", "cosine", "either", "pearson_distinct_partners", "mean_best_abs_pearson",
          "mean_best_abs_cosine", "dim")
  mean = {k: float(np.mean([p[k] for p in pairs])) for k in keys}
  return {"pairs": pairs, "mean": mean, "matches": matches}


def heatmap_order(abs_r) -> tuple[list[int], list[int]]:
  """(rows, columns) order of an |r| matrix: rows by decreasing best |r|, columns in the order
  they are first a row's best partner, then the remaining columns."""
  import numpy as np
  rows = [int(i) for i in np.argsort(-abs_r.max(axis=1), kind="stable")]
  columns = list(dict.fromkeys(int(np.argmax(abs_r[i])) for i in rows))
  columns += [j for j in range(abs_r.shape[1]) if j not in columns]
  return rows, columns


def save_heatmap(path: str, matches: dict, labels: Sequence[str], threshold: float) -> str:
  """abs_pearson_heatmap.png: one |r| panel per unordered pair (module docstring)."""
  import numpy as np
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  pairs = [(a, b) for (a, b) in matches if a < b]
  columns = min(3, len(pairs))
  rows = -(-len(pairs) // columns)
  figure = Figure(figsize=(4.2 * columns, 4.0 * rows), dpi=100)
  FigureCanvasAgg(figure)
  image = None
  for k, (a, b) in enumerate(pairs):
    axis = figure.add_subplot(rows, columns, k + 1)
    abs_r = np.abs(matches[(a, b)].pearson)
    row_order, column_order = heatmap_order(abs_r)
    image = axis.imshow(abs_r[np.ix_(row_order, column_order)], vmin=0.0, vmax=1.0,
                        cmap="viridis", aspect="auto", interpolation="nearest")
    reproduced = int((abs_r.max(axis=1) > threshold).sum())
    axis.set_title(f"{labels[a]} vs {labels[b]}\n{reproduced}/{abs_r.shape[0]} with best "
                   f"|r| > {threshold:g}", fontsize=9)
    axis.set_ylabel(f"{labels[a]} latents (by best |r|)", fontsize=8)
    axis.set_xlabel(f"{labels[b]} latents (best partners first)", fontsize=8)
    for set_ticks, set_labels, order in ((axis.set_yticks, axis.set_yticklabels, row_order),
                                         (axis.set_xticks, axis.set_xticklabels, column_order)):
      if len(order) <= 32:  # Latent numbers; too many to read beyond that.
        set_ticks(range(len(order)))
        set_labels([str(i) for i in order], fontsize=6)
      else:
        set_ticks([])
  if image is not None:
    figure.colorbar(image, ax=figure.axes, shrink=0.8, label="|Pearson r|")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  figure.savefig(path + ".tmp.png")
  os.replace(path + ".tmp.png", path)
  return path


def markdown_table(result: dict) -> str:
  lines = [f"Latent reproducibility across {len(result['runs'])} runs on "
           f"{result['num_subjects']} common subjects: a latent of the reference run is "
           f"reproduced when its best |Pearson r| (|cosine|) with any latent of the other run "
           f"is above {result['threshold']:g}.", ""]
  cells = [[p["reference"], p["other"], p["dim"], p["pearson"], p["cosine"], p["either"],
            p["pearson_distinct_partners"], f"{p['mean_best_abs_pearson']:.3f}"]
           for p in result["pairs"]]
  m = result["mean"]
  cells.append(["mean", "", f"{m['dim']:g}", f"{m['pearson']:.1f}", f"{m['cosine']:.1f}",
                f"{m['either']:.1f}", f"{m['pearson_distinct_partners']:.1f}",
                f"{m['mean_best_abs_pearson']:.3f}"])
  return "\n".join(lines) + "\n" + io.markdown_table(
      ["reference", "other", "D", "by \\|r\\|", "by \\|cos\\|", "either",
       "distinct partners (\\|r\\|)", "mean best \\|r\\|"], cells, "llrrrrrr")


def run(workdirs: Sequence[str], threshold: float = 0.5,
        splits: Optional[Sequence[str]] = None, output_dir: Optional[str] = None,
        batch_size: Optional[int] = None, log: Callable[[str], None] = _log,
        step=None) -> dict:
  """Latents of every run (at checkpoint `step` of each, `common.parse_step`), matching of
  every ordered pair, outputs; returns results.json's content (module docstring)."""
  from data_pipelines.errors import InvalidArgumentError
  from experiments import infer_latents
  if len(workdirs) < 2:
    raise InvalidArgumentError(f"reproducibility needs at least 2 runs, got {len(workdirs)}")
  if not 0.0 <= threshold < 1.0:
    raise InvalidArgumentError(f"--threshold must be in [0, 1), got {threshold}")
  unknown = sorted(set(splits or ()) - set(SPLITS))
  if unknown:
    raise InvalidArgumentError(f"--splits: unknown splits {unknown} (of {', '.join(SPLITS)})")
  for workdir in workdirs:  # Every run directory before any latent is computed.
    common.load_run_config(workdir)
  labels = run_labels(workdirs)
  tables, paths = [], []
  for workdir in workdirs:
    path = infer_latents.default_latents_path(workdir)
    if path in paths:  # The same run twice: its latents once.
      tables.append(tables[paths.index(path)])
    else:
      # The run's own latents are checked against the run (refresh): stale ones are recomputed.
      tables.append(infer_latents.load_or_compute(workdir, refresh=True, batch_size=batch_size,
                                                  step=step, log=log))
    paths.append(path)
  subjects, codes = align_latents(tables, labels, splits)
  log(f"matching {len(workdirs)} runs on {len(subjects)} common subjects")
  matched = match_pairs(codes, labels, threshold)
  result = {"runs": [{"label": label, "workdir": os.path.abspath(w), "latents": p,
                      "dim": int(c.shape[1])}
                     for label, w, p, c in zip(labels, workdirs, paths, codes)],
            "num_subjects": len(subjects), "splits": list(splits) if splits else "all",
            "threshold": threshold, "pairs": matched["pairs"], "mean": matched["mean"]}
  out_dir = output_dir or os.path.join(workdirs[0], "reproducibility")
  io.write_json(os.path.join(out_dir, "results.json"), result)
  io.write_text(os.path.join(out_dir, "reproducibility.md"), markdown_table(result))
  save_heatmap(os.path.join(out_dir, "abs_pearson_heatmap.png"), matched["matches"], labels,
               threshold)
  log(f"wrote {out_dir}")
  return result


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
  f = flag_values
  workdirs = common.start_command_with_arguments(
      argv, "give at least two run directories: python -m experiments.reproducibility "
      "DIR_seed1 DIR_seed2 ...", min_count=2, quiet=f is flags.FLAGS)
  from cardiac_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  workdir_lib.check_output_dir(f.output_dir)
  result = run(workdirs, f.threshold, f.splits, f.output_dir, f.batch_size, step=f.step)
  print(markdown_table(result))


if __name__ == "__main__":
  define_flags()
  app.run(main)
