"""GPU and TPU lowering of a config's steps, checked on a machine without either.

`python -m experiments.check_lowering --config=NAME[:variant] [--platforms=cuda,tpu]
    [--config.key=value ...]`
(--config and the synthetic batch layout are those of `experiments.benchmark`.)

Every jitted program a run needs on an accelerator (the train step with the state donated, the
warm-up train step where the family has one, the eval step and, for a family with DDIM
inversion, the semantic encoder and the DDIM encode and decode) is exported with
`jax.export.export(jax.jit(f), platforms=...)` for abstract arguments (`jax.eval_shape` of the
state, `jax.ShapeDtypeStruct` batches of the config's batch sizes): StableHLO for each platform
is produced, nothing is compiled or run. A step fails the check when the export refuses it (a
host callback, a custom call without a stable target) or when its module calls an XLA:CPU-only
custom call (LAPACK, the CPU callback targets). Convolutions are exported with the setting
accelerators use: `model.conv_impl = "auto"` becomes "xla" (the DiffAE's auto picks "frames"
only on the CPU backend). One JSON line per program; exit status 1 if any fails.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import sys
import time
from typing import Any, Callable, Sequence

from absl import app, flags

from experiments import benchmark  # Its --config flag and synthetic batch layout.
from experiments import configs

ACCELERATORS = ("cuda", "tpu")
# Custom-call targets that only XLA:CPU provides: LAPACK (the CPU lowering of linear algebra)
# and the CPU host-callback targets. jax.export accepts the LAPACK ones as stable, so a module
# for accelerators that calls one passes the export but cannot run there.
CPU_ONLY_CUSTOM_CALL_PREFIXES = ("lapack_", "ducc_", "xla_python_cpu_callback",
                                 "xla_ffi_python_cpu_callback")
_CUSTOM_CALL = re.compile(r"custom_call\s+@([\w.$-]+)")
# Source locations in the module text (#locN definitions and loc(...) uses): they name the
# caller's files, so two processes exporting the same program differ only in them.
_LOCATION_DEFINITION = re.compile(r"^#loc.*$\n?", re.M)
_LOCATION_USE = re.compile(r"\s*loc\((?:[^()]|\([^()]*\))*\)")

# jax.export accepts any platform name and lowers with the default rules for one it does not
# know: a misspelt --platforms=gpu used to pass the check ("ok") without checking anything.
PLATFORMS = ("cuda", "rocm", "tpu", "cpu")
_PLATFORMS = flags.DEFINE_list("platforms", list(ACCELERATORS),
                               f"Platforms to export for ({', '.join(PLATFORMS)}).")


def check_platforms(values: Sequence[str]) -> list[str]:
  """The --platforms entries, stripped; absl's UsageError when empty, unknown or repeated."""
  platforms = [p.strip() for p in values if p.strip()]
  if not platforms:
    raise app.UsageError("--platforms is empty")
  unknown = [p for p in platforms if p not in PLATFORMS]
  if unknown:
    raise app.UsageError(f"--platforms: unknown {', '.join(unknown)} (one of "
                         f"{', '.join(PLATFORMS)})")
  if len(set(platforms)) != len(platforms):
    raise app.UsageError(f"--platforms: {','.join(platforms)} names a platform twice")
  return platforms


@dataclasses.dataclass(frozen=True)
class LoweringTarget:
  """One jitted program: its name, the function, abstract arguments and donated arguments."""
  name: str
  function: Callable
  args: tuple
  donate_argnums: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class LoweringResult:
  """The check of one program for a tuple of platforms."""
  name: str
  platforms: tuple[str, ...]
  ok: bool
  seconds: float
  message: str = ""
  custom_calls: tuple[str, ...] = ()
  module_sha256: str = ""     # Of the module text without source locations.

  def as_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "platforms": list(self.platforms),
            "custom_calls": list(self.custom_calls)}


def accelerator_config(config):
  """A copy of `config` with model.conv_impl "auto" resolved as on GPU and TPU ("xla")."""
  config = config.copy_and_resolve_references()
  if config.model.get("conv_impl") == "auto":
    with config.unlocked():
      config.model.conv_impl = "xla"
  return config


def abstract_batch(config, family, rows: int) -> dict:
  """ShapeDtypeStructs of a (rows, ...) batch in the config's layout as the input pipeline
  delivers it to the family: of the cine image and label fields only its `batch_fields`, the
  per-subject values and volume curves always (data_pipelines.cine); every numeric field of
  slice data."""
  import jax
  from cardiac_jax import parallel
  example = parallel.device_fields(benchmark.synthetic_batch(config, 1))
  reads = getattr(family, "batch_fields", None)
  return {name: jax.ShapeDtypeStruct((rows,) + value.shape[1:], value.dtype)
          for name, value in example.items()
          if reads is None or name in reads or value.ndim <= 2}


def lowering_targets(config) -> list[LoweringTarget]:
  """The programs a run of `config` jits on an accelerator, with abstract arguments."""
  import jax
  from cardiac_jax import families
  config = accelerator_config(config)
  family = families.make_family(config)
  state = jax.eval_shape(family.init_state, jax.random.key(int(config.seed)))
  key = jax.eval_shape(lambda: jax.random.key(0))
  train_batch = abstract_batch(config, family, int(config.train.batch_size))
  eval_batch = abstract_batch(config, family, int(config.train.eval_batch_size))
  targets = [LoweringTarget("train_step", family.train_step, (state, train_batch, key), (0,))]
  if family.warmup_train_step is not None:
    targets.append(LoweringTarget("warmup_train_step", family.warmup_train_step,
                                  (state, train_batch, key), (0,)))
  targets.append(LoweringTarget("eval_step", family.eval_step, (state, eval_batch)))
  if families.supports(family, "invert"):
    # The family reads one cine field: the x_0 of the DDIM encode (inversion) and decode.
    x0 = eval_batch[family.batch_fields[0]]
    z_sem = jax.eval_shape(family.encode, state, x0)
    targets.append(LoweringTarget("encode", family.encode, (state, x0)))
    targets.append(LoweringTarget(
        "ddim_encode", functools.partial(family.invert,
                                         num_steps=int(config.eval.inversion_steps)),
        (state, x0, z_sem)))
    if hasattr(family, "decode"):
      targets.append(LoweringTarget(
          "ddim_decode", functools.partial(family.decode,
                                           num_steps=int(config.eval.decode_steps)),
          (state, x0, z_sem)))
  return targets


def export_target(target: LoweringTarget, platforms: Sequence[str]):
  """`jax.export.Exported` of the jitted target for `platforms` (raises what export raises)."""
  import jax
  from jax import export
  jitted = jax.jit(target.function, donate_argnums=target.donate_argnums)
  return export.export(jitted, platforms=tuple(platforms))(*target.args)


def _error_line(error: Exception) -> str:
  lines = str(error).strip().splitlines() or [""]
  return f"{type(error).__name__}: {lines[0]}"


def module_without_locations(text: str) -> str:
  """A module's text with its source locations removed (what `module_sha256` digests)."""
  return _LOCATION_USE.sub("", _LOCATION_DEFINITION.sub("", text))


def cpu_only_custom_calls(custom_calls: Sequence[str]) -> list[str]:
  return [c for c in custom_calls if c.startswith(CPU_ONLY_CUSTOM_CALL_PREFIXES)]


def check_target(target: LoweringTarget,
                 platforms: Sequence[str] = ACCELERATORS) -> LoweringResult:
  """Exports `target` for `platforms` and reports whether the module can run on all of them."""
  platforms = tuple(platforms)
  start = time.perf_counter()
  try:
    exported = export_target(target, platforms)
  except Exception as error:  # pylint: disable=broad-except
    message = _error_line(error)
    if len(platforms) > 1:  # Name the platforms that refuse it on their own.
      failing = []
      for platform in platforms:
        try:
          export_target(target, (platform,))
        except Exception:  # pylint: disable=broad-except
          failing.append(platform)
      message = f"export for {','.join(failing or platforms)} failed: {message}"
    return LoweringResult(target.name, platforms, False, time.perf_counter() - start, message)
  seconds = time.perf_counter() - start
  text = exported.mlir_module()
  calls = tuple(sorted(set(_CUSTOM_CALL.findall(text))))
  digest = hashlib.sha256(module_without_locations(text).encode()).hexdigest()
  problems = []
  if tuple(exported.platforms) != platforms:
    problems.append(f"exported for {exported.platforms}, not {platforms}")
  cpu_only = cpu_only_custom_calls(calls) if "cpu" not in platforms else []
  if cpu_only:
    problems.append(f"calls XLA:CPU-only custom call(s) {', '.join(cpu_only)}")
  return LoweringResult(target.name, platforms, not problems, seconds, "; ".join(problems),
                        calls, digest)


def check_config(config, platforms: Sequence[str] = ACCELERATORS) -> list[LoweringResult]:
  """`check_target` of every program of `lowering_targets(config)`."""
  return [check_target(target, platforms) for target in lowering_targets(config)]


def main(argv):
  config = flags.FLAGS.config
  from experiments import common  # pylint: disable=g-import-not-at-top
  common.start_command(argv, config=config)
  platforms = check_platforms(_PLATFORMS.value)
  try:
    results = check_config(config, platforms)
  except ValueError as error:
    raise app.UsageError(str(error)) from error
  for result in results:
    print(json.dumps({"config": config.name or config.model.family,
                      "conv_impl": accelerator_config(config).model.get("conv_impl"),
                      **result.as_dict()}), flush=True)
  if not all(r.ok for r in results):
    sys.exit(1)


def run():
  configs.run_config_command(main)


if __name__ == "__main__":
  run()
