"""Experiment configs: one module per experiment, each with `get_config(arg) -> ConfigDict`.

`NAME[:variant]` names a config: `vae`, `vae:smoke`, `ar_sivae:paper`. Variants are defined in
`base.finalize`. `resolve_config_argv` turns `--config=NAME[:variant]` on a command line
into the file path that ml_collections' config flag expects, so the name works from any working
directory; `run_config_command` starts a command whose flags name a config that way.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import sys

CONFIG_DIR = pathlib.Path(__file__).resolve().parent
# Shared sections that experiments build on, not experiments themselves.
_NOT_CONFIGS = {"__init__", "base", "cine_data"}


def available_configs() -> list[str]:
  return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in _NOT_CONFIGS)


def _split_name(spec: str) -> tuple[str, str | None]:
  name, _, variant = spec.partition(":")
  return name, (variant or None)


def get_config(spec: str):
  """The ConfigDict for `NAME[:variant]` (Python API used by tests, sweeps and benchmarks)."""
  name, variant = _split_name(spec)
  if name not in available_configs():
    raise ValueError(f"unknown config {name!r}; available: {', '.join(available_configs())}")
  module = importlib.import_module(f"experiments.configs.{name}")
  return module.get_config(variant)


def resolve_config_argv(argv: list[str], flag: str = "config") -> list[str]:
  """Rewrites `--config=NAME[:variant]` (or `--config NAME`) to `--config=/abs/NAME.py[:v]`."""
  out = list(argv)
  for i, arg in enumerate(out):
    value, joined = None, True
    if arg.startswith(f"--{flag}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{flag}" and i + 1 < len(out):
      value, joined = out[i + 1], False
    if value is None:
      continue
    name, variant = _split_name(value)
    if name.endswith(".py") or os.sep in name:
      continue  # Already a path.
    if name not in available_configs():
      raise SystemExit(f"error: unknown config {name!r}; available: "
                       f"{', '.join(available_configs())}")
    path = str(CONFIG_DIR / f"{name}.py") + (f":{variant}" if variant else "")
    if joined:
      out[i] = f"--{flag}={path}"
    else:
      out[i + 1] = path
  return out


def run_config_command(main, checked_by_parser: bool = False, **app_run_kwargs) -> None:
  """absl's app.run for a command with a --config=NAME[:variant] flag: the XLA:CPU setting is
  applied first (parsing the flag checks the config by tracing its model, which starts JAX's
  backend), the config name resolved to its file, and the config, overrides included, checked
  as training checks it (`config_checks`) before `main` runs: a value no run can use (a latent
  size of 0) is one line naming it, not a traceback from inside the model or JAX.
  `checked_by_parser`: the command's own flags_parser has already checked it (no second check)."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from cardiac_jax import runtime  # pylint: disable=g-import-not-at-top
  runtime.configure_xla_cpu()
  sys.argv = resolve_config_argv(sys.argv)

  def main_of_a_valid_config(argv):
    from absl import flags  # pylint: disable=g-import-not-at-top
    from cardiac_jax import config_checks  # pylint: disable=g-import-not-at-top
    config = flags.FLAGS.get_flag_value("config", None)
    # A missing --config is named by the command itself.
    if config is not None and not checked_by_parser:
      try:
        config_checks.validate(config)
      except config_checks.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return main(argv)

  app.run(main_of_a_valid_config, **app_run_kwargs)
