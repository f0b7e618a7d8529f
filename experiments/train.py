"""Train a model: `python -m experiments.train --config=NAME[:variant] [--workdir=DIR]
[--config.section.key=value ...]`.

With no data flags it trains on the synthetic cohort (generated and prepared once into the
cache). Rerunning the same command resumes from the latest checkpoint in the workdir. A mistake
in the command line (an unknown config key, a value of the wrong type or out of range, a
workdir that names a file, a workdir held by another run) ends in one line naming it, before
anything is written.
"""

from __future__ import annotations

import os
import re
import sys

from absl import flags
from ml_collections import config_flags

from experiments import configs


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, sys_argv=None) -> None:
  """The command's flags (`sys_argv`: the command line the config overrides are read from,
  default sys.argv at parse time)."""
  config_flags.DEFINE_config_file("config", None, "Experiment config: NAME[:variant].",
                                  flag_values=flag_values, lock_config=True, sys_argv=sys_argv)
  flags.DEFINE_string("workdir", None, "Run directory (default: workdirs/<config name>).",
                      flag_values=flag_values)
  flags.DEFINE_string(
      "coordinator_address", None, "Multi-process runs: host:port of process 0 (default: "
      "$CARDIAC_JAX_COORDINATOR, or detected under SLURM / on a TPU pod).",
      flag_values=flag_values)
  flags.DEFINE_integer("num_processes", None, "Multi-process runs: number of processes.",
                       flag_values=flag_values)
  flags.DEFINE_integer("process_id", None,
                       "Multi-process runs: this process's index in [0, num_processes).",
                       flag_values=flag_values)


_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]*)")


def override_keys(argv: list[str]) -> list[str]:
  """The dotted keys of the `--config.KEY[=VALUE]` arguments of a command line."""
  return [m.group(1) for m in map(_OVERRIDE.match, argv[1:]) if m]


def _named_config(argv: list[str]):
  """The config named by --config=NAME[:variant] (before overrides), or None when --config is
  absent or a file path (ml_collections then loads it and reports its own errors)."""
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith("--config="):
      spec = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
    else:
      continue
    name = spec.partition(":")[0]
    if name in configs.available_configs():
      return configs.get_config(spec)
    if os.path.dirname(name) == str(configs.CONFIG_DIR) and name.endswith(".py"):
      stem = os.path.basename(name)[:-3]
      if stem in configs.available_configs():
        return configs.get_config(stem + spec[len(name):])
    return None
  return None


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """Parses the command line into `flag_values` (defined by `define_flags`) and checks the
  resolved config; returns the remaining arguments.

  Raises config_checks.ConfigError, one line naming the key: an unknown override key (with the
  nearest valid ones), a value the field's type cannot take, or a value out of range.
  """
  from cardiac_jax import config_checks  # pylint: disable=g-import-not-at-top
  try:
    argv = configs.resolve_config_argv(argv)
  except SystemExit as e:  # An unknown config name, with the available ones.
    raise config_checks.ConfigError(str(e).removeprefix("error: ")) from None
  keys = override_keys(argv)
  named = _named_config(argv)
  if named is not None:
    config_checks.check_keys(named, keys)
  try:
    rest = flag_values(argv)
  except flags.Error as e:
    raise config_checks.ConfigError(" ".join(str(e).split())) from None
  except (AttributeError, KeyError, ValueError, TypeError, SyntaxError) as e:
    # ml_collections reports a bad override of a config loaded from a file path this way.
    raise config_checks.ConfigError(
        f"cannot apply {' '.join('--config.' + k for k in keys)}: {type(e).__name__}: "
        f"{' '.join(str(e).split())}") from None
  config = flag_values["config"].value
  if config is not None:
    if named is not None:
      _check_sections(named, config, keys)
    config_checks.validate(config)
  return rest


def _check_sections(named, config, keys: list[str]) -> None:
  """An override of a whole section (--config.optimizer={...}) may change its values but not
  drop or add fields."""
  from cardiac_jax import config_checks  # pylint: disable=g-import-not-at-top
  before, after = set(config_checks.leaf_keys(named)), set(config_checks.leaf_keys(config))
  if before != after:
    lost, new = sorted(before - after), sorted(after - before)
    changes = "; ".join(part for part in (f"drops {', '.join(lost[:6])}" if lost else "",
                                          f"adds {', '.join(new[:6])}" if new else "") if part)
    raise config_checks.ConfigError(
        f"{' '.join('--config.' + k for k in keys)} {changes}: set a section's fields one by "
        "one (--config.section.field=value)")


def _parse_flags_or_exit(argv: list[str]) -> list[str]:
  from cardiac_jax import config_checks  # pylint: disable=g-import-not-at-top
  try:
    return parse_flags(argv)
  except config_checks.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def default_workdir(config) -> str:
  return os.path.join("workdirs", config.name or "run")


def main(argv):
  FLAGS = flags.FLAGS
  config = FLAGS.config
  from experiments import common  # Heavy imports.
  from cardiac_jax import distributed, training, workdir as workdir_lib
  # Logs are quieted once the processes are set up.
  common.start_command(argv, quiet=False, config=config)
  workdir = FLAGS.workdir or default_workdir(config)
  try:
    workdir_lib.check_path(workdir)  # Before the data are prepared for a run that cannot start.
    training.check_workdir_entries(workdir)
  except workdir_lib.WorkdirError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  import jax
  from cardiac_jax import families
  distributed.initialize_from_environment(FLAGS.coordinator_address, FLAGS.num_processes,
                                          FLAGS.process_id)  # Before any device is touched.
  common.quiet_logs()
  if jax.process_index() == 0:
    print(families.parameter_summary(config), flush=True)
  try:
    training.train_and_evaluate(config, workdir, common.make_data_source(config))
  except training.Preempted as e:
    print(str(e), file=sys.stderr)
    sys.exit(0)
  except common.USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"Done: {workdir}", flush=True)


def run():
  # Flags are defined only when the command runs, so importing this module beside another
  # command's (tests, tools) defines no second --config.
  define_flags()
  configs.run_config_command(main, checked_by_parser=True, flags_parser=_parse_flags_or_exit)


if __name__ == "__main__":
  run()
