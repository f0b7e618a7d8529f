"""Linear probe of clinical traits from a DiffAE run's latents: `python -m experiments.probe`.

  python -m experiments.probe --workdir=DIR [--latents=FILE] [--traits=lv_edv_ml,lv_ef]
      [--train_split=train] [--test_split=test] [--output_dir=DIR/probe]

How much of a trait the semantic code z_sem carries linearly (`cardiac_jax.phenotypes.
linear_probe`): the codes are standardised with the training subjects' statistics, a ridge
regression with the penalty chosen by leave-one-out cross-validation over a log grid of alphas
(1e-3 .. 1e5) is fitted on the training split, and the test split gives
  R^2 = 1 - sum (y - y_hat)^2 / sum (y - mean y)^2   and   r = Pearson(y, y_hat).

Inputs:
- latents: --latents (a latents CSV or PLINK phenotype file of `experiments.infer_latents`),
  else DIR/latents/latents.csv, computed by `infer_latents.load_or_compute` when absent (and
  recomputed when it is not this run's);
- traits: columns of the run's prepared attributes.csv (`data_pipelines.cine`: lv_edv_ml,
  lv_esv_ml, rv_edv_ml, ..., lv_ef, rv_ef, lv_sv_ml, myo_mass_g, lv_wall_thickness_mm), by
  subject id, read by `experiments.associate.trait_values` (empty or NA cells: missing);
- splits: the run's prepared splits.json (the encoder was trained on the train split, so the
  test subjects are unseen by both the encoder and the probe).
Subjects of a split without latents or without the trait are dropped and counted.

Writes --output_dir (default DIR/probe/): results.json (settings, and per trait n_train,
n_test, dropped counts, R^2, r, alpha) and probe.md (the table), and prints the table.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Optional, Sequence

from absl import app, flags

from cardiac_jax import io
from cardiac_jax import runtime
from experiments import common

DEFAULT_TRAITS = ("lv_edv_ml", "lv_ef")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command-line flags; defined only when run as a program (a test passes its own
  FlagValues)."""
  fv = {"flag_values": flag_values}
  common.define_workdir_flag("diffae3d run directory.", flag_values)
  common.define_latents_flag(flag_values)
  flags.DEFINE_list("traits", list(DEFAULT_TRAITS), "attributes.csv columns to probe.", **fv)
  flags.DEFINE_string("train_split", "train", "Split the probe is fitted on.", **fv)
  flags.DEFINE_string("test_split", "test", "Split the probe is scored on.", **fv)
  common.define_output_dir_flag("Output folder (default: DIR/probe).", flag_values)
  common.define_step_flag("Checkpoint of computed latents: a step, best (the best validation "
                          "checkpoint) or latest (default).", flag_values)
  # Flags defined by experiments.common are this command's: --help lists them.
  flags.adopt_module_key_flags(common, flag_values)


_log = runtime.phase_logger('probe')


def _finite(value: float) -> Optional[float]:
  return value if math.isfinite(value) else None


def probe_traits(table, traits: dict[str, dict[str, float]], train_subjects: Sequence[str],
                 test_subjects: Sequence[str]) -> list[dict]:
  """One row per trait: the ridge probe fitted on `train_subjects`, scored on
  `test_subjects` (subjects without latents or trait value dropped and counted)."""
  import numpy as np
  from cardiac_jax import phenotypes
  index = {s: i for i, s in enumerate(table.subjects)}

  def arrays(subjects, values):
    z = np.full((len(subjects), table.dim), np.nan)
    have = [k for k, s in enumerate(subjects) if s in index]
    z[have] = table.z[[index[subjects[k]] for k in have]]
    y = np.asarray([values.get(s, math.nan) for s in subjects], np.float64)
    return z, y, len(subjects) - len(have)

  rows = []
  for trait, values in traits.items():
    z_train, y_train, no_code_train = arrays(list(train_subjects), values)
    z_test, y_test, no_code_test = arrays(list(test_subjects), values)
    result = phenotypes.linear_probe(z_train, y_train, z_test, y_test)
    rows.append({"trait": trait, "n_train": result.n_train, "n_test": result.n_test,
                 "r2": _finite(result.r2), "pearson_r": _finite(result.pearson_r),
                 "alpha": result.alpha, "dropped_train": result.dropped_train,
                 "dropped_test": result.dropped_test,
                 "without_latents_train": no_code_train, "without_latents_test": no_code_test})
  return rows


def _fmt(value: Optional[float], spec: str = ".3f") -> str:
  return "n/a" if value is None else format(value, spec)


def markdown_table(rows: Sequence[dict], header: str) -> str:
  """`header`, then one row per probed trait."""
  cells = [[r["trait"], r["n_train"], r["n_test"], _fmt(r["r2"]), _fmt(r["pearson_r"]),
            f"{r['alpha']:.3g}"] for r in rows]
  return f"{header}\n\n" + io.markdown_table(
      ["trait", "n_train", "n_test", "R^2", "r", "alpha"], cells, "lrrrrr")


def run(workdir: str, latents: Optional[str] = None, traits: Sequence[str] = DEFAULT_TRAITS,
        train_split: str = "train", test_split: str = "test",
        output_dir: Optional[str] = None, step: Optional[int] = None,
        log: Callable[[str], None] = _log) -> dict:
  """The probe of every trait (module docstring); writes and returns results.json's content."""
  from cardiac_jax import phenotypes
  from data_pipelines import cine, prepare
  from data_pipelines.errors import InvalidArgumentError, InvalidInputError
  from experiments import associate, infer_latents
  if not traits:
    raise InvalidArgumentError("--traits is empty: no traits to probe")
  if train_split == test_split:
    raise InvalidArgumentError(f"the probe needs two different splits, got {train_split!r} "
                               "twice (--train_split, --test_split)")
  config = common.load_run_config(workdir)
  # The run's own latents are checked against the run (refresh): stale ones are recomputed.
  table = infer_latents.load_or_compute(workdir, latents, refresh=True, step=step, log=log)
  directory = cine.prepared_cine_dir(config)
  assignment = io.read_json(os.path.join(directory, prepare.SPLITS))
  if assignment is None:
    raise FileNotFoundError(f"{os.path.join(directory, prepare.SPLITS)} is missing or "
                            "unreadable")
  for split in (train_split, test_split):
    if not assignment.get(split):
      raise InvalidInputError(f"{os.path.join(directory, prepare.SPLITS)}: split {split!r} holds "
                              "no subjects")
  attributes_path, attributes = associate.read_attributes(directory)
  subjects = list(attributes)
  values = {name: dict(zip(subjects, associate.trait_values(attributes, subjects, name,
                                                            attributes_path).values))
            for name in traits}
  rows = probe_traits(table, values, assignment[train_split], assignment[test_split])
  result = {"workdir": os.path.abspath(workdir), "latents": os.path.abspath(table.path),
            "dataset": directory, "train_split": train_split, "test_split": test_split,
            "z_dim": table.dim, "alphas": list(phenotypes.DEFAULT_ALPHAS),
            "method": "standardised z (train statistics), RidgeCV (leave-one-out), R^2 and "
                      "Pearson r on the test split", "traits": rows}
  out_dir = output_dir or os.path.join(workdir, "probe")
  io.write_json(os.path.join(out_dir, "results.json"), result)
  header = (f"Linear probe of {os.path.basename(os.path.abspath(workdir))} latents "
            f"({table.dim}-d, {os.path.basename(table.path)}): ridge fitted on {train_split}, "
            f"scored on {test_split}.")
  io.write_text(os.path.join(out_dir, "probe.md"), markdown_table(rows, header))
  log(f"wrote {out_dir}")
  return result


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
  f = flag_values
  common.start_command(argv, quiet=f is flags.FLAGS, workdir=f.workdir)
  from cardiac_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  workdir_lib.check_output_dir(f.output_dir)
  run(f.workdir, f.latents, f.traits, f.train_split, f.test_split, f.output_dir, f.step)
  out_dir = f.output_dir or os.path.join(f.workdir, "probe")
  with open(os.path.join(out_dir, "probe.md"), encoding="utf-8") as fh:
    print(fh.read())


if __name__ == "__main__":
  define_flags()
  app.run(main)
