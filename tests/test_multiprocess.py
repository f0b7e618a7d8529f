"""Two JAX processes on 127.0.0.1 (gloo CPU collectives) train as one run.

Each worker process joins the runtime through `cardiac_jax.distributed`, reads its half of every
global batch from `data_pipelines.pipeline` (process_index/process_count) and then

1. runs `training.train_and_evaluate` (jit backend) for a few steps in a shared workdir, with a
   SIGTERM delivered to one process only in the middle: both processes must stop after the
   same step and save one checkpoint together (collective orbax save), then the rerun resumes
   from it (restore) to the end. This exercises the config check, the metric writer (process 0
   only), evaluation with gathered outputs, preemption and resume;
2. runs the same steps again with the pmap backend through `parallel.compile_train_step`,
   recording the loss of every step on every process.

A single-process run of the same script on the whole global batch is the reference. The
processes are time-boxed so a hang in a collective fails the test instead of blocking CI.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 3
TIMEOUT_S = 240

WORKER = r"""
import json, os, signal, sys
import numpy as np
port, process_id, num_processes, workdir, out = sys.argv[1:6]
process_id, num_processes = int(process_id), int(num_processes)
import jax
from cardiac_jax import distributed
if num_processes > 1:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  distributed.initialize_from_environment(coordinator_address=f"127.0.0.1:{port}",
                                          num_processes=num_processes, process_id=process_id)
from cardiac_jax import checkpointing, families, parallel, training
from data_pipelines import pipeline
from experiments.configs import get_config
from tests.conftest import make_disc_example

assert jax.process_count() == num_processes and jax.process_index() == process_id
config = get_config("vae:smoke")
config.data.image_size = 16
config.model.channels = (4, 8)
config.train.batch_size = 8
config.train.eval_batch_size = 8
config.train.num_steps = NUM_STEPS
config.train.checkpoint_every = NUM_STEPS
config.train.eval_every = NUM_STEPS
config.train.figure_every = 0
examples = [make_disc_example(i, size=32) for i in range(16)]
process = dict(process_index=jax.process_index(), process_count=jax.process_count())

def train_batches(start):
  return pipeline.train_batches(examples, config.data, global_batch_size=8, seed=config.seed,
                                start_step=start, **process)

data = training.DataSource(
    train_batches=train_batches,
    eval_batches=lambda: pipeline.eval_batches(examples[:12], config.data, batch_size=8,
                                               **process))
# With several processes, a first attempt in which a SIGTERM reaches process 1 only, while
# step 2 runs: every process must stop after that same step with one checkpoint; the second
# call resumes from it to the end. The single-process reference trains straight through.
preempted_at, preempted_message = None, ""
if num_processes > 1:
  def signalled_batches(start):
    for index, batch in enumerate(train_batches(start)):
      if index == 1 and jax.process_index() == 1:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  try:
    training.train_and_evaluate(config, workdir, training.DataSource(
        train_batches=signalled_batches, eval_batches=data.eval_batches))
    raise AssertionError("training did not stop at the signal")
  except training.Preempted as e:
    preempted_message = str(e)
  preempted_at = checkpointing.latest_step(os.path.join(workdir, "checkpoints"))
state = training.train_and_evaluate(config, workdir, data)
result = {"jit_step": int(jax.device_get(state.step)), "preempted_at": preempted_at,
          "preempted_message": preempted_message,
          "checkpoint_step": checkpointing.latest_step(os.path.join(workdir, "checkpoints"))}
params = {"jit/" + jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]}

# The same run again, per replica (pmap), with the loss of every step on this process.
mesh = parallel.make_mesh()
family = families.make_family(config)
root = jax.random.key(config.seed)
state = jax.jit(family.init_state, out_shardings=parallel.replicated(mesh))(root)
step_fn = parallel.compile_train_step(
    lambda axis: families.make_family(config, axis_name=axis).train_step, mesh, "pmap")
losses = []
batches = train_batches(0)
step_keys = jax.random.fold_in(root, 1)  # As in train_and_evaluate.
for step in range(NUM_STEPS):
  state, metrics = step_fn(state, next(batches), jax.random.fold_in(step_keys, step))
  losses.append(float(jax.device_get(metrics)["loss"]))
result["pmap_losses"] = losses
params.update({"pmap/" + jax.tree_util.keystr(p): np.asarray(v)
               for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]})
np.savez(out + ".npz", **params)
with open(out + ".json", "w") as f:
  json.dump(result, f)
""".replace("NUM_STEPS", str(NUM_STEPS))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(num_processes: int, workdir: str, out_dir: str, port: int, cache_dir: str) -> list:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             # The resumed run compiles the same programs again: reuse them from disk.
             JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             # One CPU device per process; cheaper XLA:CPU code generation keeps compilation of
             # the tiny model short (every run here uses the same flags).
             XLA_FLAGS="--xla_backend_optimization_level=0 "
                       "--xla_llvm_disable_expensive_passes=true")
  return [subprocess.Popen(
      [sys.executable, "-c", WORKER, str(port), str(i), str(num_processes), workdir,
       os.path.join(out_dir, f"process{i}")],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(num_processes)]


def _wait(processes: list) -> None:
  logs = []
  try:
    for p in processes:
      log, _ = p.communicate(timeout=TIMEOUT_S)
      logs.append(log)
  except subprocess.TimeoutExpired:
    for p in processes:
      p.kill()
    pytest.fail(f"a worker did not finish within {TIMEOUT_S} s (hung collective?)")
  for p, log in zip(processes, logs):
    if p.returncode:
      pytest.fail(f"worker exited with {p.returncode}:\n{log[-4000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Output directories of the 2-process run and of the single-process reference."""
  two = tmp_path_factory.mktemp("two_processes")
  one = tmp_path_factory.mktemp("one_process")
  for d in (two, one):
    os.makedirs(d / "out")
  # Both launched together: the 2-core machine overlaps their compilation.
  cache = str(tmp_path_factory.mktemp("jax_cache"))
  workers = _launch(2, str(two / "workdir"), str(two / "out"), _free_port(), cache)
  reference = _launch(1, str(one / "workdir"), str(one / "out"), _free_port(), cache)
  _wait(workers + reference)
  return two, one


def _load(directory, process: int):
  with open(directory / "out" / f"process{process}.json") as f:
    result = json.load(f)
  with np.load(directory / "out" / f"process{process}.npz") as params:
    return result, dict(params)


def test_processes_stay_in_lockstep(runs):
  two, _ = runs
  (result0, params0), (result1, params1) = _load(two, 0), _load(two, 1)
  assert result0["pmap_losses"] == result1["pmap_losses"]  # Same replicated value: bitwise.
  assert len(result0["pmap_losses"]) == NUM_STEPS
  assert params0.keys() == params1.keys() and len(params0) > 10
  for name in params0:
    np.testing.assert_array_equal(params0[name], params1[name], err_msg=name)


def test_two_processes_match_one_process_on_the_same_global_batch(runs):
  two, one = runs
  (result, params), (reference, reference_params) = _load(two, 0), _load(one, 0)
  # Two processes all-reduce per-process sums, one process sums once: equal up to float32
  # reduction order (observed differences ~1e-7 relative). Adam divides by sqrt(v), so a
  # parameter whose gradient is near zero can move by up to ~lr per step on a rounding flip;
  # 2e-5 absolute over 3 steps at lr 2e-4 is far below what a missing all-reduce or per-process
  # BatchNorm statistics produce (~1e-4).
  np.testing.assert_allclose(result["pmap_losses"], reference["pmap_losses"], rtol=1e-5)
  two_losses = [r["train/loss"] for r in _records(two)]
  one_losses = [r["train/loss"] for r in _records(one)]
  assert len(two_losses) == NUM_STEPS
  np.testing.assert_allclose(two_losses, one_losses, rtol=1e-5)
  np.testing.assert_allclose(two_losses, reference["pmap_losses"], rtol=1e-5)
  assert params.keys() == reference_params.keys()
  for name in params:
    np.testing.assert_allclose(params[name], reference_params[name], rtol=1e-5, atol=2e-5,
                               err_msg=name)


def _records(directory) -> list[dict]:
  with open(directory / "workdir" / "metrics.jsonl") as f:
    return [r for r in map(json.loads, f) if "train/loss" in r]


def test_only_process_zero_logs_and_the_checkpoint_is_saved(runs):
  two, _ = runs
  result0, _ = _load(two, 0)
  result1, _ = _load(two, 1)
  steps = [r["step"] for r in _records(two)]
  assert steps == list(range(1, NUM_STEPS + 1))  # One writer: no duplicated lines.
  with open(two / "workdir" / "metrics.jsonl") as f:
    val = [r for r in map(json.loads, f) if "val/mse" in r]
  assert [r["step"] for r in val] == [NUM_STEPS]
  assert result0["jit_step"] == result1["jit_step"] == NUM_STEPS
  assert result0["checkpoint_step"] == result1["checkpoint_step"] == NUM_STEPS


def test_a_signal_to_one_process_stops_both_after_the_same_step(runs):
  two, _ = runs
  result0, _ = _load(two, 0)
  result1, _ = _load(two, 1)
  assert result0["preempted_at"] == result1["preempted_at"] == 2
  assert result1["preempted_message"].startswith("received signal 15 at step 2")
  assert result0["preempted_message"].startswith("another process received a signal at step 2")
  # Lines logged before the preemption are kept once, the resumed steps appended.
  assert [r["step"] for r in _records(two)] == list(range(1, NUM_STEPS + 1))
