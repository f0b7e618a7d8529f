"""Hostile inputs on the training side, each of which must end in a clear error or a correct
result: random config overrides on the training command line, and random damage to a run's
metrics.jsonl and config.json (truncation, bit flips, deleted or repeated lines, foreign bytes).
No case builds a model or compiles anything; the damaged-checkpoint cases live in
tests/test_training.py, which reuses that module's trained run.
"""

from __future__ import annotations

import json
import os
import random

import pytest
from absl import flags

from cardiac_jax import config_checks, families, metric_logging, run_config, training
from experiments import train
from experiments.configs import get_config

OVERRIDE_CASES = 300
LOG_CASES = 300
CONFIG_FILE_CASES = 120

# ----------------------------------------------------------------------------- overrides

_VALUES = {
    int: ["0", "1", "-1", "-5", "3", "1000000", "1.5", "1e3", "abc", "", " ", "True", "0x10",
          "+4", "2**3", "None"],
    float: ["0", "-1", "1e-4", "-2e-4", "nan", "inf", "-inf", "1e400", "abc", "", "0.5", "1",
            "1,2", "True"],
    bool: ["true", "false", "1", "0", "maybe", "", "yes", "None"],
    str: ["", "x", "val/ssim", "ssim", "\u00e9", "a b", "None", "val/", "'quoted'"],
    tuple: ["(8,16)", "(8.5,16)", "(8,abc)", "()", "[8,16]", "8", "(0,4)", "(-1,)", "(ed,es)",
            "('ed','es')", "ed", "((1,2),)", "(1,2", "{}", "None", "(True,)", "(4,)"],
}
_ANY = sorted({v for values in _VALUES.values() for v in values})


def _mutated(key: str, rng: random.Random) -> str:
  """A typo of `key`: a character dropped, doubled, swapped or replaced, a part added or lost."""
  i = rng.randrange(len(key))
  kind = rng.randrange(6)
  if kind == 0:
    return key[:i] + key[i + 1:]
  if kind == 1:
    return key[:i] + key[i] + key[i:]
  if kind == 2 and i + 1 < len(key):
    return key[:i] + key[i + 1] + key[i] + key[i + 2:]
  if kind == 3:
    return key[:i] + rng.choice("abcxyz_.") + key[i + 1:]
  if kind == 4:
    return key + rng.choice([".x", "_", ".", "s"])
  return key.split(".", 1)[-1]


def _override_case(config, keys, sections, rng: random.Random) -> list[str]:
  args = []
  for _ in range(rng.choice([1, 1, 1, 2, 3])):
    roll = rng.random()
    if roll < 0.55:
      key = rng.choice(keys)
      default = config_checks._get(config, key)  # pylint: disable=protected-access
      kind = type(default) if type(default) in _VALUES else str
      if rng.random() < 0.4:  # A plausible value: the default, written as a user would.
        value = (str(default).lower() if isinstance(default, bool) else
                 "(" + ",".join(repr(v) for v in default) + ",)" if isinstance(default, tuple)
                 else str(default))
      else:
        value = rng.choice(_VALUES[kind] if rng.random() < 0.8 else _ANY)
    elif roll < 0.85:
      key, value = _mutated(rng.choice(keys), rng), rng.choice(_ANY)
    elif roll < 0.92:
      key, value = rng.choice(sections), rng.choice(["", "3", "{}", "{'a': 1}", "None"])
    else:
      key = "".join(rng.choice("ab._-0\u00e9") for _ in range(rng.randrange(0, 8)))
      value = rng.choice(_ANY)
    form = rng.random()
    if form < 0.9:
      args.append(f"--config.{key}={value}")
    elif form < 0.95:
      args.append(f"--config.{key}")
    else:
      args.append(f"--noconfig.{key}")
  return args


def _flat(config) -> dict:
  return run_config.flatten_config(json.loads(config.to_json_best_effort()))


def test_random_config_overrides_end_in_one_line_errors_or_checked_configs():
  """Each random command line is parsed as `python -m experiments.train` parses it. A refusal
  is a ConfigError of one line naming one of the given keys; an accepted config passes
  validation, builds its model family, keeps every field's type and differs from the default
  only where overridden."""
  default = get_config("vae:smoke")
  keys = [k for k in config_checks.leaf_keys(default)
          if not hasattr(config_checks._get(default, k), "keys")]  # pylint: disable=protected-access
  sections = [k for k in config_checks.leaf_keys(default) if k not in keys]
  base = _flat(default)
  rng = random.Random(21)
  outcomes = {"refused": 0, "accepted": 0}
  failures = []
  for _ in range(OVERRIDE_CASES):
    args = _override_case(default, keys, sections, rng)
    argv = ["train", "--config=vae:smoke", *args]
    given = train.override_keys(argv)
    values = flags.FlagValues()
    train.define_flags(values, sys_argv=argv)
    try:
      train.parse_flags(argv, values)
    except config_checks.ConfigError as e:
      message = str(e)
      if "\n" in message or not any(k in message for k in given):
        failures.append((args, f"unclear error: {message!r}"))
      outcomes["refused"] += 1
      continue
    except Exception as e:  # pylint: disable=broad-except
      failures.append((args, f"{type(e).__name__}: {e}"))
      continue
    config = values["config"].value
    try:
      families.make_family(config)  # What the loop builds first from an accepted config.
    except Exception as e:  # pylint: disable=broad-except
      failures.append((args, f"accepted, but the family refuses it: {type(e).__name__}: {e}"))
    changed = {k for k, v in _flat(config).items() if base.get(k, object()) != v}
    unexpected = {k for k in changed if not any(k == g or k.startswith(g + ".") for g in given)}
    retyped = {k for k in changed & set(base) if type(_flat(config)[k]) is not type(base[k])
               and not (isinstance(base[k], float) and isinstance(_flat(config)[k], int))}
    if unexpected or retyped:
      failures.append((args, f"changed {sorted(unexpected)}, retyped {sorted(retyped)}"))
    outcomes["accepted"] += 1
  assert not failures, failures[:5]
  assert outcomes["refused"] > OVERRIDE_CASES // 3 and outcomes["accepted"] > OVERRIDE_CASES // 10


def test_unknown_override_key_is_one_line_naming_the_nearest_keys():
  """`--config.optimizer.lr=abc` used to end in three chained tracebacks."""
  argv = ["train", "--config=vae:smoke", "--config.optimizer.lr=abc"]
  values = flags.FlagValues()
  train.define_flags(values, sys_argv=argv)
  with pytest.raises(config_checks.ConfigError,
                     match=r"^unknown config key 'optimizer.lr'; nearest: "
                           r"optimizer.learning_rate"):
    train.parse_flags(argv, values)


# ----------------------------------------------------------------------------- metrics.jsonl

def _pristine_log(directory: str) -> bytes:
  writer = metric_logging.MetricWriter(directory, tensorboard=False)
  for step in range(1, 13):
    writer.write(step, {"loss": 1.0 / step, "grad_norm_encoder": 0.5 * step}, prefix="train/")
    if step % 4 == 0:
      writer.write(step, {"ssim": 0.5 + step / 100, "mse": 0.1 / step}, prefix="val/")
  writer.close()
  with open(writer.path, "rb") as f:
    return f.read()


def _damaged_log(data: bytes, rng: random.Random) -> tuple[str, bytes]:
  lines = data.split(b"\n")[:-1]
  kind = rng.choice(["truncate", "flip", "flip", "delete_line", "repeat_interleaved",
                     "partial_tail", "foreign_line", "blank_lines", "empty"])
  if kind == "truncate":
    return kind, data[:rng.randrange(len(data))]
  if kind == "flip":
    out = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 3])):
      out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return kind, bytes(out)
  if kind == "delete_line":
    del lines[rng.randrange(len(lines))]
    return kind, b"".join(line + b"\n" for line in lines)
  if kind == "repeat_interleaved":  # Two runs that wrote the same file at once.
    cut = rng.randrange(1, len(lines))
    mixed = lines[:cut] + [line for pair in zip(lines[cut:], lines[cut:]) for line in pair]
    return kind, b"".join(line + b"\n" for line in mixed)
  if kind == "partial_tail":
    line = lines[rng.randrange(len(lines))]
    return kind, data + line[:rng.randrange(1, len(line))]
  if kind == "foreign_line":
    junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 30))).replace(b"\n", b"")
    lines.insert(rng.randrange(len(lines)), junk)
    return kind, b"".join(line + b"\n" for line in lines)
  if kind == "blank_lines":
    lines.insert(rng.randrange(len(lines)), b"   ")
    return kind, b"".join(line + b"\n" for line in lines)
  return kind, b""


def _refusal(action, refusal: type[Exception]) -> tuple[str | None, str | None]:
  """(message, None) when `action` raises `refusal`, (None, "Type: text") when it raises
  anything else, (None, None) when it returns: one case of the damage tests."""
  try:
    action()
  except refusal as e:
    return str(e), None
  except Exception as e:  # pylint: disable=broad-except
    return None, f"{type(e).__name__}: {e}"
  return None, None


def test_random_damage_to_metrics_jsonl_is_repaired_or_named(tmp_path):
  """On resume at a random step, a damaged metrics.jsonl either comes back as one consistent
  history (records up to that step, once each, in step order, none that was not written
  except on a line the damage touched) or stays as it was with an error naming the file, the
  line and the fix; a partial last line is always dropped, never an error."""
  directory = str(tmp_path)
  pristine = _pristine_log(directory)
  pristine_lines = set(pristine.split(b"\n"))
  writer = metric_logging.MetricWriter(directory, tensorboard=False)
  rng = random.Random(7)
  failures, outcomes = [], {"repaired": 0, "named": 0}
  for _ in range(LOG_CASES):
    kind, data = _damaged_log(pristine, rng)
    with open(writer.path, "wb") as f:
      f.write(data)
    restored = rng.choice([0, 4, 6, 8, 12])
    message, error = _refusal(lambda: writer.truncate_after(restored),
                              metric_logging.MetricsFileError)
    if error is not None:
      failures.append((kind, error))
      continue
    if message is not None:
      with open(writer.path, "rb") as f:
        unchanged = f.read() == data
      if (kind not in ("flip", "foreign_line") or "\n" in message or writer.path not in message
          or "Delete that line" not in message or not unchanged):
        failures.append((kind, message))
      outcomes["named"] += 1
      continue
    with open(writer.path, "rb") as f:
      kept = f.read().split(b"\n")[:-1]
    records = [json.loads(line) for line in kept]
    steps = [r["step"] for r in records]
    identities = [(r["step"], tuple(sorted(k.split("/")[0] for k in r if k != "step")))
                  for r in records]
    foreign = [line for line in kept if line not in pristine_lines]
    if (steps != sorted(steps) or any(s > restored for s in steps)
        or len(set(identities)) != len(identities)
        or (foreign and kind not in ("flip", "foreign_line"))):
      failures.append((kind, f"kept {kept}"))
    outcomes["repaired"] += 1
  assert not failures, failures[:5]
  assert min(outcomes.values()) > 0


# ----------------------------------------------------------------------------- config.json

class _Checkpoints:
  """What check_workdir_config asks of a run's checkpoints: two saved steps and the config
  recorded with them."""

  def __init__(self, config):
    self.config = json.loads(config.to_json_best_effort())

  def all_steps(self):
    return [3, 6]

  def recorded_metadata(self, step=None):
    del step
    return {"config": self.config}


def test_random_damage_to_config_json_is_named_or_harmless(tmp_path):
  """A damaged config.json of a run with checkpoints is refused naming the file (or, when the
  damage changed a training value, naming that key), or the damage left the same config (or
  only a field allowed to change on resume) and the file is rewritten whole."""
  config = get_config("vae:smoke")
  workdir = str(tmp_path)
  path = os.path.join(workdir, "config.json")
  run_config.check_workdir_config(workdir, config)
  with open(path, "rb") as f:
    pristine = f.read()
  checkpoints = _Checkpoints(config)
  current = json.loads(config.to_json_best_effort())
  rng = random.Random(3)
  failures, outcomes = [], {"refused": 0, "accepted": 0}
  for _ in range(CONFIG_FILE_CASES):
    data = bytearray(pristine)
    kind = rng.choice(["truncate", "flip", "flip", "not_an_object", "foreign"])
    if kind == "truncate":
      data = data[:rng.randrange(len(data))]
    elif kind == "flip":
      for _ in range(rng.choice([1, 2])):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == "not_an_object":
      data = bytearray(rng.choice([b"[]", b"3", b"null", b'"config"']))
    else:
      data = bytearray(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    with open(path, "wb") as f:
      f.write(data)
    message, error = _refusal(
        lambda: run_config.check_workdir_config(workdir, config, checkpoints),
        run_config.WorkdirConflictError)
    if error is not None:
      failures.append((kind, error))
      continue
    if message is not None:
      if "\n" in message or (path not in message and "different config" not in message):
        failures.append((kind, message))
      outcomes["refused"] += 1
      continue
    with open(path) as f:
      if json.load(f) != current:
        failures.append((kind, "accepted, but config.json is not the run's config"))
    outcomes["accepted"] += 1
  assert not failures, failures[:5]
  assert outcomes["refused"] > CONFIG_FILE_CASES // 2


# ----------------------------------------------------------------------------- checkpoints

def test_a_step_without_a_manifest_is_checked_as_far_as_possible_and_said_unverified(
    tmp_path, capsys):
  """Steps saved before manifests existed: their JSON metadata must still parse, and a step
  restored without a manifest says that its bytes are unverified (it used to restore
  silently); a step with its manifest restores without a word."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from cardiac_jax import checkpointing
  directory = str(tmp_path / "checkpoints")
  state = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  with checkpointing.Checkpointer(directory) as checkpointer:
    checkpointer.save(1, state)
    checkpointer.save(2, state)
  abstract = jax.eval_shape(lambda: state)
  os.remove(os.path.join(directory, "2", checkpointing.MANIFEST_FILE))
  capsys.readouterr()
  with checkpointing.Checkpointer(directory) as checkpointer:
    restored = checkpointer.restore(abstract, 1)
    assert checkpointer.unverified_steps == [] and "WARNING" not in capsys.readouterr().err
    restored = checkpointer.restore(abstract, 2)
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert checkpointer.unverified_steps == [2]
    err = capsys.readouterr().err
    assert f"step 2 in {directory} has no {checkpointing.MANIFEST_FILE}" in err
    assert "cannot be verified" in err
  assert checkpointing.step_problem(os.path.join(directory, "2")) is None
  with open(os.path.join(directory, "2", "_CHECKPOINT_METADATA"), "r+", encoding="utf-8") as f:
    f.truncate(10)
  problem = checkpointing.step_problem(os.path.join(directory, "2"))
  assert problem and "_CHECKPOINT_METADATA is unreadable" in problem


def test_reading_the_config_recorded_with_checkpoints_prints_no_orbax_warning(tmp_path,
                                                                             caplog):
  """Every resume (and every workdir conflict error) printed orbax's 'Item "default" ... could
  not be restored' warning while the recorded config was read."""
  import logging
  import jax.numpy as jnp
  from cardiac_jax import checkpointing
  directory = str(tmp_path / "checkpoints")
  with checkpointing.Checkpointer(directory, step_metadata={"config": {"seed": 3}}) as c:
    c.save(1, {"w": jnp.ones(2)})
  with caplog.at_level(logging.WARNING):
    with checkpointing.Checkpointer(directory) as checkpointer:
      assert checkpointer.recorded_metadata() == {"config": {"seed": 3}}
  assert not [r for r in caplog.records if "could not be restored" in r.getMessage()]
