"""Evaluate a trained run: `python -m experiments.evaluate --workdir=DIR [--split=test]`.

The run's model family computes the metrics (`evaluate_run` of `cardiac_jax.families`):
VAE-family runs get reconstruction and interpretability metrics under the reference protocol
with traversals (`cardiac_jax.families.vae_evaluation`), diffae3d runs DDIM reconstructions
(`cardiac_jax.families.diffae3d`). DIR/eval/metrics.json (or --output_dir) starts with the run,
split and checkpoint; the figures go beside it. Resumable: batches finished before an
interruption are kept in a partial folder there and not recomputed; the folder is removed once
metrics.json is written. The folder is only resumed by the same run, checkpoint and split
(`clear_stale_partials`): batches of another model are never read back.
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


PARTIAL_OWNER = ".partial_owner.json"


def clear_stale_partials(out_dir: str, owner: dict) -> list[str]:
  """Removes the partial_* folders of an interrupted evaluation in out_dir unless they belong
  to `owner` (the run, the checkpoint's `checkpointing.step_identity`, the split): the folders
  are named by split and step only, so another run at the same step (a shared --output_dir) or
  the run trained again to that step would otherwise resume from batches of another model and
  report their metrics. Then records `owner` for a later resume. Returns the removed names."""
  import shutil
  from cardiac_jax import io
  recorded = io.read_json(os.path.join(out_dir, PARTIAL_OWNER))
  removed = []
  if recorded != owner and os.path.isdir(out_dir):
    for name in sorted(os.listdir(out_dir)):
      if name.startswith("partial_") and os.path.isdir(os.path.join(out_dir, name)):
        shutil.rmtree(os.path.join(out_dir, name))
        removed.append(name)
  if removed:
    print(f"Removed {', '.join(removed)} from {out_dir}: batches of another checkpoint or run.",
          file=sys.stderr, flush=True)
  io.write_json(os.path.join(out_dir, PARTIAL_OWNER), owner)
  return removed


def _evaluate(workdir, split, step, options, output_dir):
  """(the run's family, `evaluate`'s metrics)."""
  import jax
  from cardiac_jax import checkpointing, families
  from experiments import common
  config, family, state, mesh = common.restore_run(workdir, step)
  header = {"workdir": os.path.abspath(workdir), "config": config.name, "split": split,
            "step": int(state.step), "step_selection": common.step_selection(step)}
  out_dir = output_dir or os.path.join(workdir, "eval")
  step_dir = os.path.join(workdir, "checkpoints", str(int(state.step)))
  owner = {"workdir": header["workdir"], "step": header["step"], "split": split,
           "checkpoint": checkpointing.step_identity(step_dir)}
  single = jax.process_count() == 1  # Only single-process evaluations keep partial batches.
  if single:
    clear_stale_partials(out_dir, owner)
  result = family.evaluate_run(state, mesh, common.split_batches(config, family, split),
                               out_dir, options or families.EvalOptions(), header)
  if single:  # Finished: nothing left to resume.
    os.remove(os.path.join(out_dir, PARTIAL_OWNER))
  return family, result


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
