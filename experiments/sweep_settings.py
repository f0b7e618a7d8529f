"""The settings of a sweep (`experiments.sweep`), parsed and checked against the config before
any job runs: the --set axes, --seeds, --extra training flags, --eval_steps and --root. A key the
config lacks, a value its field cannot take, or a grid point the run cannot use (a batch size of
0, a size the network cannot halve) is refused here, naming it, instead of failing in every job.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shlex
from typing import Sequence

from absl import flags

from cardiac_jax import config_checks
from data_pipelines import errors as data_errors
from experiments import configs


class SweepConfigError(data_errors.InvalidArgumentError):
  """The sweep's settings do not fit the config (nothing has been run)."""


@dataclasses.dataclass(frozen=True)
class SweepAxis:
  """One --set: a config field and the values it takes (strings, parsed by ml_collections)."""
  path: str                  # Dotted path inside the config, e.g. "loss.gamma".
  values: tuple[str, ...]

  @property
  def flag(self) -> str:
    return f"--config.{self.path}"

def split_top_level(text: str) -> list[str]:
  """Splits at commas outside brackets and quotes: "1,(8,16),'a,b'" -> ["1", "(8,16)", "'a,b'"]."""
  parts, current, depth, quote = [], [], 0, None
  for char in text:
    if quote:
      quote = None if char == quote else quote
    elif char in "'\"":
      quote = char
    elif char in "([{":
      depth += 1
    elif char in ")]}":
      depth -= 1
    elif char == "," and depth == 0:
      parts.append("".join(current))
      current = []
      continue
    current.append(char)
  parts.append("".join(current))
  return [p.strip() for p in parts]


def parse_set(text: str) -> SweepAxis:
  """'config.loss.gamma=0,0.05' (the `config.` prefix is optional) -> SweepAxis."""
  key, sep, values_text = text.partition("=")
  key = key.strip().removeprefix("--").removeprefix("config.")
  if not sep or not key:
    raise SweepConfigError(f"--set={text!r}: expected config.section.key=v1,v2,...")
  values = split_top_level(values_text)
  if any(not v for v in values):
    raise SweepConfigError(f"--set={text!r}: empty value in the list {values_text!r}")
  if len(set(values)) != len(values):
    raise SweepConfigError(f"--set={text!r}: a value is repeated")
  return SweepAxis(path=key, values=tuple(values))


def parse_seeds(values: Sequence[str]) -> list[int]:
  """--seeds as integers, each one a config.seed can take (checked by config_checks' rule:
  a negative seed or one beyond JAX's 32-bit keys would fail, or repeat a run, in every job)."""
  seeds = []
  for value in values:
    try:
      seeds.append(int(value))
    except ValueError:
      raise SweepConfigError(f"--seeds: {value!r} is not an integer") from None
    problem = config_checks.RULES["seed"](seeds[-1])
    if problem:
      raise SweepConfigError(f"--seeds: {value} {problem} (config.seed)")
  if not seeds:
    raise SweepConfigError("--seeds: give at least one seed")
  if len(set(seeds)) != len(seeds):
    raise SweepConfigError(f"--seeds: a seed is repeated in {seeds}")
  return seeds


def parse_extra(values: Sequence[str]) -> list[str]:
  """--extra values, each split like a shell word list (`--extra="--a=1 --b=2"` works too)."""
  return [arg for value in values for arg in shlex.split(value)]


def check_field_path(config, path: str, source: str) -> None:
  """Raises SweepConfigError unless `path` ("loss.gamma") is a leaf field of `config` (an unknown
  key is named with its nearest keys, as experiments.train names them)."""
  try:
    config_checks.check_keys(config, [path])
  except config_checks.ConfigError as e:
    raise SweepConfigError(f"{source}: {e}") from None
  node = config
  for part in path.split("."):
    node = node[part]
  if hasattr(node, "keys"):
    raise SweepConfigError(f"{source}: config.{path} is a section, not a field; set one of "
                           f"its fields ({', '.join(sorted(node.keys()))})")


def overridden_config(config, overrides: Sequence[str], source: str):
  """`config` with `--config.x=v` flags applied by ml_collections' own config flag (as
  experiments.train will), so a value of the wrong type is refused now rather than in every
  job."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = ["sweep", *overrides]
  flag_values = flags.FlagValues()
  try:
    config_flags.DEFINE_config_dict("config", config.copy_and_resolve_references(),
                                    flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
  except Exception as e:  # pylint: disable=broad-except
    raise SweepConfigError(f"{source}: {' '.join(overrides)} is not valid for this config: "
                           f"{e}") from None
  return flag_values.config


def check_root(root: str, must_exist: bool = False) -> None:
  """SweepConfigError unless --root can hold the job workdirs (not a file, nor under one) and,
  with `must_exist` (reading a sweep's results), is an existing folder: a mistyped root is
  named instead of being created with an empty table."""
  from cardiac_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  try:
    workdir_lib.check_path(root, "root", "folder")
  except workdir_lib.WorkdirError as e:
    raise SweepConfigError(str(e)) from None
  if must_exist and not os.path.isdir(root):
    raise SweepConfigError(f"--root={root} does not exist: no job of this sweep has run there "
                           "(give the --root the sweep ran with)")


def validate_sweep(config_spec: str, axes: Sequence[SweepAxis], extra: Sequence[str]) -> None:
  """Checks the whole sweep against the config before any job runs.

  Raises:
    SweepConfigError: unknown config, unknown or duplicated --set key, a value the field cannot
      take, or an --extra flag the sweep sets itself.
  """
  try:
    config = configs.get_config(config_spec)
  except ValueError as e:
    raise SweepConfigError(f"--config={config_spec}: {e}") from None
  seen = set()
  for axis in axes:
    if axis.path == "seed":
      raise SweepConfigError("--set=config.seed: give seeds with --seeds=0,1,2")
    if axis.path in seen:
      raise SweepConfigError(f"--set: config.{axis.path} is given twice")
    seen.add(axis.path)
    check_field_path(config, axis.path, f"--set={axis.flag.removeprefix('--')}")
    for value in axis.values:
      overridden_config(config, [f"{axis.flag}={value}"], "--set")
  config_overrides = []
  for arg in extra:
    name = arg.split("=", 1)[0]
    if name in ("--config", "--workdir") or not arg.startswith("-"):
      raise SweepConfigError(f"--extra: {arg!r} is not allowed: the sweep sets --config and "
                             "--workdir itself; give extra training flags as --flag=value")
    if name.startswith("--config."):
      if "=" not in arg:
        raise SweepConfigError(f"--extra: write {arg}=VALUE as one word")
      path = name.removeprefix("--config.")
      if path == "seed" or path in seen:
        raise SweepConfigError(f"--extra: {name} is already set by the sweep "
                               f"({'--seeds' if path == 'seed' else '--set'})")
      check_field_path(config, path, f"--extra={arg}")
      config_overrides.append(arg)
  if config_overrides:
    overridden_config(config, config_overrides, "--extra")
  # Every grid point's config as its jobs will train it: a value the run cannot use (a batch
  # size of 0, a size the network cannot halve) is refused here, not in every job.
  for point in itertools.product(*[[f"{a.flag}={v}" for v in a.values] for a in axes]):
    overrides = [*point, *config_overrides]
    try:
      config_checks.validate(overridden_config(config, overrides, "--set"))
    except config_checks.ConfigError as e:
      where = " ".join(overrides) or f"--config={config_spec}"
      raise SweepConfigError(f"{where}: {e}") from None


def parse_eval_steps(values: Sequence[str]) -> list[str]:
  """--eval_steps: latest, best or integer steps, each once."""
  out = []
  for value in values:
    value = value.strip()
    if value not in ("latest", "best") and not (value.isdigit() and int(value) > 0):
      raise SweepConfigError(f"--eval_steps entry {value!r} is not latest, best or a step > 0")
    if value not in out:
      out.append(value)
  if not out:
    raise SweepConfigError("--eval_steps is empty")
  return out
