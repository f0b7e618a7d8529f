"""Evaluate a trained run: `python -m experiments.evaluate --workdir=DIR [--split=test]`.

The run's model family computes the metrics (`evaluate_run` of `cardiac_jax.families`):
VAE-family runs get reconstruction and interpretability metrics under the reference protocol
with traversals (`cardiac_jax.families.vae_evaluation`), diffae3d runs DDIM reconstructions
(`cardiac_jax.families.diffae3d`). DIR/eval/metrics.json (or --output_dir) starts with the run,
split and checkpoint; the figures go beside it. Resumable: batches finished before an
interruption are kept in a partial folder there and not recomputed; the folder is removed once
metrics.json is written.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

def define_flags() -> None:
  """The command-line flags; defined only when run as a program (so that importing the module
  next to other commands defines nothing). Counts and the traversal width are checked when the
  flags are parsed, before the run is restored."""
  from experiments import common
  common.define_workdir_flag("Run directory written by experiments.train.")
  flags.DEFINE_enum("split", "test", ["train", "val", "test"], "Split to evaluate.")
  common.define_step_flag()
  common.define_output_dir_flag("Where metrics.json and the figures go (default: DIR/eval); "
                                "e.g. DIR/eval_best for --step=best beside the final step's.")
  flags.DEFINE_integer("traversal_steps", 9, "Columns of the traversal grid.", lower_bound=1)
  flags.DEFINE_float("traversal_range", 2.5,
                     "Traversal half-width in standard deviations of the test codes.")
  flags.DEFINE_enum("codes", "sampled", ["sampled", "mean"],
                    "Codes the interpretability metrics score: one draw z ~ q(z|x) per subject "
                    "(the reference protocol) or the posterior means; the other kind is "
                    "reported beside them.")
  flags.DEFINE_integer("code_seed", 0, "Seed of the draws of --codes=sampled.")
  flags.DEFINE_integer("inversion_steps", None,
                       "diffae3d: DDIM inversion steps (default: config.eval).", lower_bound=1)
  flags.DEFINE_integer("decode_steps", None,
                       "diffae3d: DDIM decoding steps (default: config.eval).", lower_bound=1)
  flags.DEFINE_enum("ddim_grid", None, ["stride", "even"],
                    "diffae3d: DDIM step grid (default: config.eval.ddim_grid; runs without "
                    "the field: even).")
  # Flags defined by experiments.common are this command's: --help lists them.
  flags.adopt_module_key_flags(common)
  flags.register_validator("traversal_range", lambda value: value > 0 and value != float("inf"),
                           "--traversal_range must be a finite number > 0")


def evaluate(workdir: str, split: str = "test", step=None, options=None,
             output_dir: str | None = None) -> dict:
  """Evaluates the checkpoint `step` (see `common.parse_step`) of a run on `split` with
  `options` (`families.EvalOptions`); writes and returns `output_dir`/metrics.json (default
  DIR/eval)."""
  return _evaluate(workdir, split, step, options, output_dir)[1]


def _evaluate(workdir, split, step, options, output_dir):
  """(the run's family, `evaluate`'s metrics)."""
  from cardiac_jax import families
  from experiments import common
  config, family, state, mesh = common.restore_run(workdir, step)
  header = {"workdir": os.path.abspath(workdir), "config": config.name, "split": split,
            "step": int(state.step), "step_selection": common.step_selection(step)}
  return family, family.evaluate_run(state, mesh, common.split_batches(config, family, split),
                                     output_dir or os.path.join(workdir, "eval"),
                                     options or families.EvalOptions(), header)


def main(argv):
  from cardiac_jax import families
  from experiments import common
  FLAGS = flags.FLAGS
  common.start_command(argv, workdir=FLAGS.workdir)
  from cardiac_jax import workdir as workdir_lib
  workdir_lib.check_output_dir(FLAGS.output_dir)
  options = families.EvalOptions(
      codes=FLAGS.codes, code_seed=FLAGS.code_seed, traversal_steps=FLAGS.traversal_steps,
      traversal_range=FLAGS.traversal_range, inversion_steps=FLAGS.inversion_steps,
      decode_steps=FLAGS.decode_steps, ddim_grid=FLAGS.ddim_grid)
  family, result = _evaluate(FLAGS.workdir, FLAGS.split, FLAGS.step, options, FLAGS.output_dir)
  print(family.evaluation_summary(result))
  output_dir = FLAGS.output_dir or os.path.join(FLAGS.workdir, "eval")
  print(f"Wrote {os.path.join(output_dir, 'metrics.json')}", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  app.run(main)
