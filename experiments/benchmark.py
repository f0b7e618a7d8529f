"""Speed of a config's train step and input pipeline on this machine, as one JSON line.

`python -m experiments.benchmark --config=NAME[:variant] --steps=N [--config.key=value ...]`

What is measured, in this order, in one process:
1. peak_gflops: the best of several runs of a jitted float32 (M x M) @ (M x M) matmul
   (--peak_matmul_size, 2 M^3 FLOPs), the practical compute ceiling of this backend;
2. the train step of the config's backend (config.parallel.backend, .num_devices) on synthetic
   random batches of the global batch size, so the time is the model's and not the input's:
   compile_sec is the ahead-of-time compilation (`lower(...).compile()`, which the first call
   reuses), flops_per_step comes from XLA's cost analysis of that executable (per-device counts
   times the number of devices), then one warm-up step and N timed steps, each finished with
   block_until_ready as the training loop's per-step metric read does;
3. peak_rss_mb: the process's peak resident memory (getrusage ru_maxrss) after the step timing,
   before the input pipeline (TensorFlow) is imported;
4. input_samples_per_sec: `data_pipelines.pipeline.measure_throughput` of the config's prepared
   training split (generated and prepared first if the cache lacks it), single process.

mfu = flops_per_step * steps_per_sec / (peak_gflops * 1e9): the share of the measured matmul
peak the step reaches. input_to_step_ratio = input_samples_per_sec / samples_per_sec: above 1
the input pipeline keeps up with training.
"""

from __future__ import annotations

import contextlib
import functools
import json
import resource
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from experiments import configs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config: NAME[:variant].",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed train steps (after one warm-up step).")
_INPUT_BATCHES = flags.DEFINE_integer("input_batches", 20,
                                      "Batches timed for the input-pipeline throughput.")
_PEAK_MATMUL_SIZE = flags.DEFINE_integer("peak_matmul_size", 2048,
                                         "Side of the square float32 matmul timed for the peak.")
_PEAK_REPEATS = flags.DEFINE_integer("peak_repeats", 5, "Timed runs of the matmul (best kept).")


def measure_matmul_peak(size: int, repeats: int) -> float:
  """Best GFLOP/s of a jitted float32 (size x size) @ (size x size) on the default device."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()  # Compilation is not compute.
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size ** 3 / best / 1e9


def synthetic_batch(config, rows: int, seed: int = 0) -> dict:
  """Random host batch in the training layout: image (rows, S, S, C) in [0, 1), attributes."""
  import numpy as np
  rng = np.random.default_rng(seed)
  size, channels = int(config.data.image_size), len(config.data.channels)
  return {
      "image": rng.random((rows, size, size, channels), dtype=np.float32),
      "attributes": rng.normal(size=(rows, len(config.data.attributes))).astype(np.float32),
  }


def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older JAX: one dict per executable.
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  if flops is None or flops < 0:
    raise RuntimeError("XLA's cost analysis reported no FLOP count for the train step")
  return float(flops)


def benchmark_train_step(config, num_steps: int) -> dict:
  """Compile time, FLOPs and speed of the config's train step on synthetic batches."""
  import jax
  from cardiac_jax import parallel, steps
  if num_steps < 1:
    raise ValueError(f"--steps must be positive, got {num_steps}")
  backend = config.parallel.backend
  mesh = parallel.make_mesh(config.parallel.num_devices)
  batch_size = int(config.train.batch_size)
  parallel.check_batch_size(batch_size, mesh)
  family = steps.make_family(config)
  root = jax.random.key(config.seed)
  state = jax.jit(family.init_state, out_shardings=parallel.replicated(mesh))(root)
  train_step = parallel.compile_train_step(
      lambda axis: steps.make_family(config, axis_name=axis).train_step, mesh, backend)
  batch = synthetic_batch(config, batch_size // jax.process_count())

  start = time.perf_counter()
  compiled = train_step.lower(state, batch, root).compile()
  compile_sec = time.perf_counter() - start
  # Per-device program counts; the devices run it in parallel on their rows.
  flops_per_step = _flops(compiled) * mesh.size

  state, metrics = train_step(state, batch, jax.random.fold_in(root, 0))  # Warm-up.
  jax.block_until_ready((state, metrics))
  start = time.perf_counter()
  for step in range(1, num_steps + 1):
    state, metrics = train_step(state, batch, jax.random.fold_in(root, step))
    jax.block_until_ready(metrics)
  jax.block_until_ready(state)
  seconds = time.perf_counter() - start
  steps_per_sec = num_steps / seconds
  return {
      "backend": backend, "devices": mesh.size, "platform": jax.default_backend(),
      "batch_size": batch_size, "image_size": int(config.data.image_size),
      "steps": num_steps, "steps_per_sec": steps_per_sec,
      "samples_per_sec": steps_per_sec * batch_size, "compile_sec": compile_sec,
      "flops_per_step": flops_per_step,
  }


def measure_input(config, num_batches: int) -> float:
  """Samples/s of the single-process training iterator on the config's prepared split."""
  from data_pipelines import pipeline
  from experiments import common
  # Generation/preparation report progress on stdout, which carries only the result line here.
  with contextlib.redirect_stdout(sys.stderr):
    source = common.split_source(config, "train")
  result = pipeline.measure_throughput(source, config.data,
                                       global_batch_size=int(config.train.batch_size),
                                       num_batches=num_batches, seed=config.seed)
  return result["samples_per_sec"]


def run_benchmark(config, spec: str, num_steps: int, input_batches: int,
                  peak_matmul_size: int, peak_repeats: int) -> dict:
  """All measurements of the module docstring as one flat dict."""
  peak_gflops = measure_matmul_peak(peak_matmul_size, peak_repeats)
  result = {"config": spec}
  result.update(benchmark_train_step(config, num_steps))
  result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
  result["peak_gflops"] = peak_gflops
  result["mfu"] = result["flops_per_step"] * result["steps_per_sec"] / (peak_gflops * 1e9)
  result["input_samples_per_sec"] = measure_input(config, input_batches)
  result["input_to_step_ratio"] = result["input_samples_per_sec"] / result["samples_per_sec"]
  return result


def _config_spec(argv: list[str]) -> str:
  """NAME[:variant] and the --config.key=value overrides, as written on the command line."""
  spec, overrides = "", []
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      spec = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
    elif arg.startswith("--config."):
      overrides.append(arg[len("--config."):])
  return " ".join([spec] + overrides)


def main(argv, spec: str = ""):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError(f"--config is required; available: "
                         f"{', '.join(configs.available_configs())}")
  from experiments import common  # Heavy imports after flag parsing.
  common.quiet_logs()
  result = run_benchmark(config, spec, _STEPS.value, _INPUT_BATCHES.value,
                         _PEAK_MATMUL_SIZE.value, _PEAK_REPEATS.value)
  print(json.dumps(result), flush=True)


def run():
  spec = _config_spec(sys.argv)
  sys.argv = configs.resolve_config_argv(sys.argv)
  app.run(functools.partial(main, spec=spec))


if __name__ == "__main__":
  run()
