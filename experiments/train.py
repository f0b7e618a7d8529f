"""Train a model: `python -m experiments.train --config=NAME[:variant] [--workdir=DIR]
[--config.section.key=value ...]`.

With no data flags it trains on the synthetic cohort (generated and prepared once into the
cache). Rerunning the same command resumes from the latest checkpoint in the workdir.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from experiments import configs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config: NAME[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Run directory (default: workdirs/<config name>).")
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process runs: host:port of process 0 (default: "
    "$CARDIAC_JAX_COORDINATOR, or detected under SLURM / on a TPU pod).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Multi-process runs: number of processes.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "Multi-process runs: this process's index in [0, num_processes).")


def default_workdir(config) -> str:
  return os.path.join("workdirs", config.name or "run")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError(f"--config is required; available: {', '.join(configs.available_configs())}")
  from cardiac_jax import distributed, steps, training  # Heavy imports after flag parsing.
  import jax
  distributed.initialize_from_environment(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value,
                                          _PROCESS_ID.value)  # Before any device is touched.
  from experiments import common
  common.quiet_logs()
  workdir = _WORKDIR.value or default_workdir(config)
  if jax.process_index() == 0:
    print(steps.parameter_summary(config), flush=True)
  try:
    training.train_and_evaluate(config, workdir, common.make_data_source(config))
  except training.Preempted as e:
    print(str(e), file=sys.stderr)
    sys.exit(0)
  print(f"Done: {workdir}")


def run():
  sys.argv = configs.resolve_config_argv(sys.argv)
  app.run(main)


if __name__ == "__main__":
  run()
