"""Speed of a config's train step and input pipeline on this machine, as one JSON line.

`python -m experiments.benchmark --config=NAME[:variant] --steps=N [--config.key=value ...]
    [--torch_python=PYTHON] [--remat=none|blocks] [--input_batches=0]`

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
4. input_samples_per_sec: the single-process training iterator of the config's prepared
   training split (slices or cine; generated and prepared first if the cache lacks it), timed
   over --input_batches batches after a warm-up batch; skipped with --input_batches=0;
5. with --torch_python=PYTHON: the PyTorch eager baseline of the config's family, run right
   after the JAX steps by that interpreter (an environment that has PyTorch; PyTorch is never a
   project dependency) at the same configuration, for as many timed steps after one warm-up
   step: benchmarks/torch_baseline.py for the soft_intro VAE configs (the same AR-SIVAE model
   and encoder + decoder update, loss weights and latent size), benchmarks/imlatent_baseline.py
   for diffae3d (the ImLatent reference network at the config's frames, size, channels and
   attention; encoder + eps loss + backward + clipping + Adam + EMA). jax_over_torch =
   jax_s_per_step / torch_s_per_step (below 1: JAX is faster). Both parameter counts (trained
   parameters, not an EMA copy) are reported and must agree.

The machine may be shared: the 1-, 5- and 15-minute load averages (os.getloadavg) at the start
and end of the run are part of the line, and so are the individual step times of both
frameworks, so that a ratio can be judged against the load it was measured under.

mfu = flops_per_step * steps_per_sec / (peak_gflops * 1e9): the share of the measured matmul
peak the step reaches. input_to_step_ratio = input_samples_per_sec / samples_per_sec: above 1
the input pipeline keeps up with training. step_buffers_mb is XLA's memory analysis of the
compiled step (arguments + outputs + temporaries - aliased donations): the device memory the
step needs, independent of what else the process holds (used to compare model.remat settings).

--profile_dir=DIR traces one more step with jax.profiler into DIR and adds op_profile: the
step's operations summed per category (conv forward / input gradient / kernel gradient, dot,
other fusions; experiments/step_profile.py) and its slowest instructions.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import resource
import subprocess
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from experiments import configs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config: NAME[:variant].",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed train steps (after one warm-up step).")
# Lower bounds are checked when the flags are parsed: a matmul of side 0 measured a peak of
# 0 FLOP/s and the run ended dividing by it after the whole benchmark.
_INPUT_BATCHES = flags.DEFINE_integer(
    "input_batches", 20, "Batches timed for the input-pipeline throughput (0 = skip it).",
    lower_bound=0)
_PEAK_MATMUL_SIZE = flags.DEFINE_integer("peak_matmul_size", 2048,
                                         "Side of the square float32 matmul timed for the peak.",
                                         lower_bound=1)
_PEAK_REPEATS = flags.DEFINE_integer("peak_repeats", 5, "Timed runs of the matmul (best kept).",
                                     lower_bound=1)
_TORCH_PYTHON = flags.DEFINE_string(
    "torch_python", "", "Python interpreter with PyTorch installed: also time the PyTorch eager "
    "baseline at the same configuration (benchmarks/torch_baseline.py for soft_intro VAE "
    "configs, benchmarks/imlatent_baseline.py for diffae3d).")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0,
                                      "torch.set_num_threads for the baseline (0 = its default).",
                                      lower_bound=0)

_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir", "", "Trace one more step with jax.profiler into this folder and add "
    "op_profile (time per operation category, experiments/step_profile.py) to the line.")
_REMAT = flags.DEFINE_enum(
    "remat", None, ["none", "blocks"],
    "model.remat of the benchmarked step (blocks: residual and attention blocks recompute "
    "their activations in the backward pass); default: config.model.remat (or none).")

BENCHMARKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "benchmarks")
TORCH_BASELINE = os.path.join(BENCHMARKS_DIR, "torch_baseline.py")
IMLATENT_BASELINE = os.path.join(BENCHMARKS_DIR, "imlatent_baseline.py")


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
  """Random host batch in the config's training layout. Slice data: image (rows, S, S, C) in
  [0, 1) and attributes. Cine data (data.format "cine"): every field of a cine batch with T =
  data.num_frames (label maps with values in 0..3, 0..5 for la_label, images in [0, 1) or
  [-1, 1) as prepared)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  size = int(config.data.image_size)
  if config.data.get("format", "slices") == "cine":
    frames = int(config.data.num_frames)
    cine = (rows, frames, size, size)
    return {
        "subject": np.array([f"s{i}" for i in range(rows)]),
        "group": rng.integers(0, 5, rows).astype(np.int32),
        "sa_image": rng.random(cine + (3,), dtype=np.float32),
        "sa_label": rng.integers(0, 4, cine + (3,)).astype(np.int32),
        "sa_mid_image": rng.uniform(-1, 1, cine + (1,)).astype(np.float32),
        "la_image": rng.uniform(-1, 1, cine + (1,)).astype(np.float32),
        "la_label": rng.integers(0, 6, cine + (1,)).astype(np.int32),
        "lv_volume_ml": rng.uniform(50, 150, (rows, frames)).astype(np.float32),
        "pixel_spacing_mm": np.full(rows, 1.8, np.float32),
        "slice_thickness_mm": np.full(rows, 8.0, np.float32),
    }
  channels = len(config.data.channels)
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


def _step_buffers_mb(compiled) -> float | None:
  """Arguments + outputs + temporaries - aliased bytes of the compiled step, in MiB."""
  try:
    memory = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):  # Not every backend reports it.
    return None
  if isinstance(memory, (list, tuple)):
    memory = memory[0] if memory else None
  if memory is None:
    return None
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
           + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  return total / 2 ** 20


def count_parameters(params) -> int:
  import jax
  return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params)))


def _remat_settings(module) -> set:
  """The `remat` fields of a Flax module and of the modules among its fields."""
  import dataclasses
  from flax import linen as nn
  found = {module.remat} if hasattr(module, "remat") else set()
  for field in dataclasses.fields(module):
    value = getattr(module, field.name, None)
    if isinstance(value, nn.Module):
      found |= _remat_settings(value)
  return found


def make_family(config, remat: str, axis_name: str | None = None):
  """The config's model family built from config.model.remat = `remat` ("none" | "blocks"),
  as training builds it (the families read the field themselves); a family whose model has no
  rematerialisation option refuses "blocks"."""
  from cardiac_jax import families
  if remat != config.model.get("remat", "none"):
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.model.remat = remat
  family = families.make_family(config, axis_name=axis_name)
  model = getattr(family, "model", None)
  if remat != "none" and (model is None or remat not in _remat_settings(model)):
    raise ValueError(f"model.family {config.model.family!r} has no rematerialisation option "
                     f"(--remat / model.remat={remat!r})")
  return family


def benchmark_train_step(config, num_steps: int, remat: str | None = None,
                         profile_dir: str = "") -> dict:
  """Compile time, FLOPs and speed of the config's train step on synthetic batches; with
  profile_dir, one more step traced there and summed per operation category."""
  import jax
  from cardiac_jax import parallel
  if num_steps < 1:
    raise ValueError(f"--steps must be positive, got {num_steps}")
  backend = config.parallel.backend
  mesh = parallel.make_mesh(config.parallel.num_devices)
  batch_size = int(config.train.batch_size)
  parallel.check_batch_size(batch_size, mesh)
  remat = remat or config.model.get("remat", "none")
  family = make_family(config, remat)
  root = jax.random.key(config.seed)
  state = jax.jit(family.init_state, out_shardings=parallel.replicated(mesh))(root)
  train_step = parallel.compile_train_step(
      lambda axis: make_family(config, remat, axis_name=axis).train_step, mesh, backend)
  batch = synthetic_batch(config, batch_size // jax.process_count())

  start = time.perf_counter()
  compiled = train_step.lower(state, batch, root).compile()
  compile_sec = time.perf_counter() - start
  # Per-device program counts; the devices run it in parallel on their rows.
  flops_per_step = _flops(compiled) * mesh.size

  step_buffers_mb = _step_buffers_mb(compiled)
  # The model's trained parameters; an EMA copy carried in the state ("ema") is not the model.
  params = {part: count_parameters(p) for part, p in state.params.items() if part != "ema"}

  state, metrics = train_step(state, batch, jax.random.fold_in(root, 0))  # Warm-up.
  jax.block_until_ready((state, metrics))
  step_seconds = []
  for step in range(1, num_steps + 1):
    start = time.perf_counter()
    state, metrics = train_step(state, batch, jax.random.fold_in(root, step))
    jax.block_until_ready(metrics)
    step_seconds.append(time.perf_counter() - start)
  start = time.perf_counter()
  jax.block_until_ready(state)
  step_seconds[-1] += time.perf_counter() - start
  seconds = sum(step_seconds)
  steps_per_sec = num_steps / seconds
  op_profile = {}
  if profile_dir:
    from experiments import step_profile
    # The step as timed (its wrapper drops the batch's non-array fields, e.g. the subject ids
    # of cine batches), whose program is `compiled`'s: the trace's names are its instructions.
    op_profile["op_profile"] = step_profile.profile_call(
        train_step, (state, batch, jax.random.fold_in(root, num_steps + 1)),
        compiled.as_text(), profile_dir)
  return {
      "backend": backend, "devices": mesh.size, "platform": jax.default_backend(),
      "batch_size": batch_size, "image_size": int(config.data.image_size),
      "conv_impl": config.model.conv_impl, "compute_dtype": config.model.compute_dtype,
      "remat": remat,
      "steps": num_steps, "steps_per_sec": steps_per_sec, "jax_s_per_step": 1.0 / steps_per_sec,
      "jax_step_seconds": step_seconds,
      "samples_per_sec": steps_per_sec * batch_size, "compile_sec": compile_sec,
      "flops_per_step": flops_per_step, "step_buffers_mb": step_buffers_mb,
      "jax_params": sum(params.values()), **op_profile,
  }


def soft_intro_baseline_args(config) -> list[str]:
  """benchmarks/torch_baseline.py flags for `config` (a soft_intro VAE config)."""
  if config.loss.get("objective") != "soft_intro":  # Reached for the vae family only.
    raise ValueError(
        f"the PyTorch baseline implements the Soft-IntroVAE / AR-SIVAE update of the residual "
        f"VAE only; config has model.family={config.model.family!r}, "
        f"loss.objective={config.loss.objective!r}")
  if config.loss.reconstruction != "mse" or config.loss.scale != "chw":
    raise ValueError("the PyTorch baseline implements loss.reconstruction='mse' and "
                     "loss.scale='chw' only")
  loss = config.loss
  return [
      f"--image_size={int(config.data.image_size)}",
      f"--image_channels={len(config.data.channels)}",
      f"--channels={','.join(str(int(c)) for c in config.model.channels)}",
      f"--latent_dim={int(config.model.latent_dim)}",
      f"--num_attributes={len(config.data.attributes)}",
      f"--batch_size={int(config.train.batch_size)}",
      f"--learning_rate={float(config.optimizer.learning_rate)}",
      f"--beta_rec={float(loss.beta_rec)}", f"--beta_kl={float(loss.beta_kl)}",
      f"--beta_neg={float(loss.beta_neg)}", f"--gamma_r={float(loss.gamma_r)}",
      f"--gamma={float(loss.gamma)}", f"--delta={float(loss.delta)}",
  ]


def imlatent_baseline_args(config) -> list[str]:
  """benchmarks/imlatent_baseline.py flags for a diffae3d config: its network sizes, diffusion
  schedule, loss weights, optimizer, EMA decay and batch."""
  model, opt, diff = config.model, config.optimizer, config.diffusion
  if opt.name not in ("adam", "adamw") or opt.get("schedule", "constant") != "constant":
    raise ValueError(f"the ImLatent baseline implements optimizer.name adam or adamw with the "
                     f"constant schedule (and linear warm-up) only; config has "
                     f"optimizer.name={opt.name!r}, schedule={opt.get('schedule')!r}")
  ints = lambda values: ",".join(str(int(v)) for v in values)
  return [
      f"--num_frames={int(config.data.num_frames)}",
      f"--image_size={int(config.data.image_size)}",
      f"--base_channels={int(model.base_channels)}",
      f"--channel_mult={ints(model.channel_mult)}",
      f"--num_res_blocks={int(model.num_res_blocks)}",
      f"--attention_resolutions={ints(model.attention_resolutions)}",
      f"--encoder_channel_mult={ints(model.encoder_channel_mult)}",
      f"--encoder_num_res_blocks={int(model.encoder_num_res_blocks)}",
      f"--encoder_attention_resolutions={ints(model.encoder_attention_resolutions)}",
      f"--encoder_head={model.get('encoder_head', 'pool')}",
      f"--z_sem_dim={int(model.z_sem_dim)}",
      f"--time_embed_dim={int(model.time_embed_dim)}",
      f"--num_heads={int(model.num_heads)}",
      f"--dropout={float(model.dropout)}",
      f"--num_timesteps={int(diff.num_timesteps)}",
      f"--beta_start={float(diff.beta_start)}", f"--beta_end={float(diff.beta_end)}",
      f"--p2_gamma={float(diff.get('p2_gamma', 0.0))}", f"--p2_k={float(diff.get('p2_k', 1.0))}",
      f"--optimizer={opt.name}", f"--learning_rate={float(opt.learning_rate)}",
      f"--b1={float(opt.get('b1', 0.9))}", f"--b2={float(opt.get('b2', 0.999))}",
      f"--weight_decay={float(opt.get('weight_decay', 0.0))}",
      f"--lr_warmup_steps={int(opt.get('warmup_steps', 0))}",
      f"--grad_clip_norm={float(opt.get('grad_clip_norm', 0.0))}",
      f"--ema_decay={float(model.ema_decay)}",
      f"--batch_size={int(config.train.batch_size)}",
  ]


# model.family -> (PyTorch baseline script, its flags for a config of that family).
TORCH_BASELINES = {
    "vae": (TORCH_BASELINE, soft_intro_baseline_args),
    "diffae3d": (IMLATENT_BASELINE, imlatent_baseline_args),
}


def torch_baseline_command(config, torch_python: str, num_steps: int,
                           threads: int = 0) -> list[str]:
  """The command line of the config family's PyTorch baseline (TORCH_BASELINES) at the
  config's settings, `num_steps` timed steps after one warm-up step."""
  family = config.model.family
  if family not in TORCH_BASELINES:
    raise ValueError(f"no PyTorch baseline for model.family={family!r}; --torch_python works "
                     f"with {', '.join(sorted(TORCH_BASELINES))}")
  if config.model.compute_dtype != "float32":  # A ratio to a float32 baseline would mislead.
    raise ValueError(f"the PyTorch baselines run in float32 only; config has "
                     f"model.compute_dtype={config.model.compute_dtype!r} (time it without "
                     f"--torch_python)")
  script, baseline_args = TORCH_BASELINES[family]
  command = [torch_python, script, *baseline_args(config),
             f"--steps={num_steps}", "--warmup_steps=1", f"--seed={int(config.seed)}"]
  if threads:
    command.append(f"--threads={threads}")
  return command


def run_torch_baseline(command: list[str]) -> dict:
  """Runs the baseline command; returns its JSON line as a dict (raises with its stderr)."""
  if not os.path.exists(command[0]):
    raise FileNotFoundError(f"--torch_python {command[0]!r} does not exist")
  completed = subprocess.run(command, capture_output=True, text=True, check=False)
  if completed.returncode != 0:
    raise RuntimeError(f"PyTorch baseline failed (exit {completed.returncode}): "
                       f"{' '.join(command)}\n{completed.stderr.strip()}")
  lines = [l for l in completed.stdout.splitlines() if l.startswith("{")]
  if not lines:
    raise RuntimeError(f"PyTorch baseline printed no JSON line: {completed.stdout!r}")
  return json.loads(lines[-1])


def measure_input(config, num_batches: int) -> float:
  """Samples/s of the single-process training iterator on the config's prepared training
  split (slice or cine data), after one warm-up batch."""
  from experiments import common
  if num_batches <= 0:
    raise ValueError(f"--input_batches must be positive, got {num_batches}")
  # Generation/preparation report progress on stdout, which carries only the result line here.
  with contextlib.redirect_stdout(sys.stderr):
    batches = common.make_data_source(config).train_batches(0)
    next(batches)  # Tracing, thread pools and the first fetch are not throughput.
  start = time.perf_counter()
  for _ in range(num_batches):
    next(batches)
  return num_batches * int(config.train.batch_size) / (time.perf_counter() - start)


def run_benchmark(config, spec: str, num_steps: int, input_batches: int,
                  peak_matmul_size: int, peak_repeats: int, torch_python: str = "",
                  torch_threads: int = 0, remat: str | None = None,
                  profile_dir: str = "") -> dict:
  """All measurements of the module docstring as one flat dict."""
  # Fail on a config the baseline cannot run before spending minutes on the JAX side.
  torch_command = (torch_baseline_command(config, torch_python, num_steps, torch_threads)
                   if torch_python else None)
  result = {"config": spec, "loadavg_start": list(os.getloadavg())}
  peak_gflops = measure_matmul_peak(peak_matmul_size, peak_repeats)
  result.update(benchmark_train_step(config, num_steps, remat, profile_dir))
  result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
  result["peak_gflops"] = peak_gflops
  result["mfu"] = result["flops_per_step"] * result["steps_per_sec"] / (peak_gflops * 1e9)
  if torch_command:
    torch_result = run_torch_baseline(torch_command)
    if torch_result["total_params"] != result["jax_params"]:
      raise RuntimeError(f"parameter counts differ: JAX {result['jax_params']}, PyTorch "
                         f"{torch_result['total_params']}; the models are not the same")
    result.update({
        "torch_s_per_step": torch_result["s_per_step"],
        "torch_step_seconds": torch_result["step_seconds"],
        "torch_samples_per_sec": torch_result["samples_per_sec"],
        "torch_params": torch_result["total_params"],
        "torch_version": torch_result["torch_version"],
        "torch_threads": torch_result["threads"],
        "torch_peak_rss_mb": torch_result["peak_rss_mb"],
        "jax_over_torch": result["jax_s_per_step"] / torch_result["s_per_step"],
    })
  if input_batches > 0:
    result["input_samples_per_sec"] = measure_input(config, input_batches)
    result["input_to_step_ratio"] = result["input_samples_per_sec"] / result["samples_per_sec"]
  result["loadavg_end"] = list(os.getloadavg())
  return result


def _argv_values(argv: list[str], name: str) -> list[str]:
  """Values of --name=VALUE and --name VALUE in argv, in order."""
  values = []
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      values.append(arg.split("=", 1)[1])
    elif arg == f"--{name}" and i + 1 < len(argv):
      values.append(argv[i + 1])
  return values


def _config_spec(argv: list[str]) -> str:
  """NAME[:variant] and the --config.key=value overrides, as written on the command line."""
  spec = (_argv_values(argv, "config") or [""])[-1]
  overrides = [arg[len("--config."):] for arg in argv if arg.startswith("--config.")]
  return " ".join([spec] + overrides)


def main(argv, spec: str = ""):
  config = _CONFIG.value
  from experiments import common  # Heavy imports after flag parsing.
  common.start_command(argv, config=config)
  from cardiac_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  workdir_lib.check_output_dir(_PROFILE_DIR.value, "profile_dir")  # Before the measurements.
  try:
    result = run_benchmark(config, spec, _STEPS.value, _INPUT_BATCHES.value,
                           _PEAK_MATMUL_SIZE.value, _PEAK_REPEATS.value, _TORCH_PYTHON.value,
                           _TORCH_THREADS.value, _REMAT.value, _PROFILE_DIR.value)
  except (ValueError, FileNotFoundError) as error:
    raise app.UsageError(str(error)) from error
  print(json.dumps(result), flush=True)


def run():
  if any(_argv_values(sys.argv, "profile_dir")):
    from experiments import step_profile
    step_profile.enable_traceme()  # Before JAX starts its backend.
  configs.run_config_command(functools.partial(main, spec=_config_spec(sys.argv)))


if __name__ == "__main__":
  run()
