"""Device memory of a config's compiled train step per batch size, from XLA's memory analysis.

`python -m experiments.step_memory --config=NAME[:variant] [--batch_sizes=1,2,9]
    [--remat_modes=none,blocks] [--compute_dtypes=float32,bfloat16] [--capacities_gb=16,40,80]
    [--usable_fraction=0.9] [--config.key=value ...]`
(--config, the family and the batch layout are those of `experiments.benchmark`.)

The single-device train step is compiled for abstract arguments and never run, so this needs
the compiler's memory, not the step's. One JSON line per remat x compute dtype x batch size:
step_buffers_mb = arguments + outputs + temporaries - donated (aliased) bytes, as
`experiments.benchmark` reports it. Then, for each remat x dtype measured at two or more batch
sizes, one line with the least-squares fit step_buffers_mb = fixed_mb + per_sample_mb * batch
and the largest per-device batch that fits each capacity:
  max_batch = floor((usable_fraction * capacity - fixed_mb) / per_sample_mb),
capacity in GiB; usable_fraction leaves room for the runtime and allocator.
"""

from __future__ import annotations

import json
import math
import sys
import time

from absl import app, flags

from experiments import benchmark  # Its --config flag and synthetic batch layout.
from experiments import configs

_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "2", "9"], "Per-device batch sizes.")
_REMAT_MODES = flags.DEFINE_list("remat_modes", [],
                                 "model.remat values to measure (default: the config's).")
_COMPUTE_DTYPES = flags.DEFINE_list("compute_dtypes", [],
                                    "model.compute_dtype values to measure (default: the "
                                    "config's).")
_CAPACITIES_GB = flags.DEFINE_list("capacities_gb", ["16", "40", "80"],
                                   "Accelerator memory sizes (GiB) to fit the batch to.")
_USABLE_FRACTION = flags.DEFINE_float("usable_fraction", 0.9,
                                      "Share of each capacity the step may take.")


def _positive_ints(values: list[str], flag: str) -> list[int]:
  try:
    numbers = [int(v) for v in values]
  except ValueError as error:
    raise ValueError(f"--{flag} must be a comma-separated list of integers, got "
                     f"{','.join(values)!r}") from error
  if not numbers or min(numbers) < 1:
    raise ValueError(f"--{flag} must list positive integers, got {','.join(values)!r}")
  return numbers


def step_memory(config, batch_size: int) -> dict:
  """XLA's memory analysis (MiB) of the single-device jitted train step of `config` at
  `batch_size`, the state donated as in training, compiled for abstract arguments."""
  import jax
  from cardiac_jax import parallel
  mesh = parallel.make_mesh(1)
  family = benchmark.make_family(config, config.model.get("remat", "none"))
  key = jax.random.key(0)
  rep, sharded = parallel.replicated(mesh), parallel.data_sharded(mesh)
  state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                       jax.eval_shape(family.init_state, key))
  example = parallel.device_fields(benchmark.synthetic_batch(config, 1))
  fields = getattr(family, "batch_fields", None) or tuple(example)
  batch = {name: jax.ShapeDtypeStruct((batch_size,) + example[name].shape[1:],
                                      example[name].dtype, sharding=sharded)
           for name in fields}
  start = time.perf_counter()
  compiled = parallel.jit_train_step(family.train_step, mesh).lower(state, batch, key).compile()
  compile_sec = time.perf_counter() - start
  memory = compiled.memory_analysis()
  if isinstance(memory, (list, tuple)):
    memory = memory[0]
  mib = lambda n: n / 2 ** 20
  return {
      "argument_mb": mib(memory.argument_size_in_bytes),
      "output_mb": mib(memory.output_size_in_bytes),
      "temp_mb": mib(memory.temp_size_in_bytes),
      "alias_mb": mib(memory.alias_size_in_bytes),
      # As experiments.benchmark: what the step needs beyond the donated state it overwrites.
      "step_buffers_mb": mib(memory.argument_size_in_bytes + memory.output_size_in_bytes
                             + memory.temp_size_in_bytes - memory.alias_size_in_bytes),
      "compile_sec": compile_sec,
  }


def fit_batch_memory(batch_sizes: list[int], buffers_mb: list[float],
                     capacities_gb: list[float], usable_fraction: float) -> dict:
  """Least-squares fixed_mb + per_sample_mb * batch through the measurements, the largest
  error of the fit, and the per-device batch that fits each capacity (module docstring)."""
  import numpy as np
  if len(set(batch_sizes)) < 2:
    raise ValueError("the fit needs at least two different batch sizes")
  per_sample, fixed = np.polyfit(np.asarray(batch_sizes, float), np.asarray(buffers_mb), 1)
  residual = np.asarray(buffers_mb) - (fixed + per_sample * np.asarray(batch_sizes, float))
  max_batch = {}
  for capacity in capacities_gb:
    budget = usable_fraction * capacity * 1024.0
    max_batch[f"{capacity:g}"] = max(0, math.floor((budget - fixed) / per_sample))
  return {"fixed_mb": float(fixed), "per_sample_mb": float(per_sample),
          "max_fit_error_mb": float(np.max(np.abs(residual))),
          "usable_fraction": usable_fraction, "max_batch_per_device": max_batch}


def main(argv):
  config = flags.FLAGS.config
  from experiments import common  # Heavy imports after flag parsing.
  common.start_command(argv, config=config)
  try:
    batch_sizes = _positive_ints(_BATCH_SIZES.value, "batch_sizes")
    capacities = [float(c) for c in _CAPACITIES_GB.value]
  except ValueError as error:
    raise app.UsageError(f"--batch_sizes / --capacities_gb: {error}") from error
  if not capacities or min(capacities) <= 0:
    raise app.UsageError(f"--capacities_gb must list positive sizes, got {capacities}")
  unknown = set(_COMPUTE_DTYPES.value) - {"float32", "bfloat16"}
  if unknown:
    raise app.UsageError(f"--compute_dtypes: {sorted(unknown)} are not float32 or bfloat16")
  if not 0.0 < _USABLE_FRACTION.value <= 1.0:
    raise app.UsageError(f"--usable_fraction must be in (0, 1], got {_USABLE_FRACTION.value}")
  remats = _REMAT_MODES.value or [config.model.get("remat", "none")]
  dtypes = _COMPUTE_DTYPES.value or [config.model.compute_dtype]
  for remat in remats:
    for dtype in dtypes:
      variant = config.copy_and_resolve_references()
      with variant.unlocked():
        variant.model.remat = remat
        variant.model.compute_dtype = dtype
      buffers = []
      for batch_size in batch_sizes:
        try:
          result = step_memory(variant, batch_size)
        except ValueError as error:
          raise app.UsageError(str(error)) from error
        buffers.append(result["step_buffers_mb"])
        print(json.dumps({"remat": remat, "compute_dtype": dtype, "batch_size": batch_size,
                          **result}), flush=True)
      if len(set(batch_sizes)) >= 2:
        fit = fit_batch_memory(batch_sizes, buffers, capacities, _USABLE_FRACTION.value)
        print(json.dumps({"remat": remat, "compute_dtype": dtype, "fit_batch_sizes":
                          batch_sizes, **fit}), flush=True)


def run():
  configs.run_config_command(main)


if __name__ == "__main__":
  run()
