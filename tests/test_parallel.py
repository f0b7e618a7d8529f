"""jit on 1 device, jit on 8 devices and pmap on 8 devices train the same model.

The check runs in a subprocess with 8 fake CPU devices (XLA_FLAGS must be set before JAX starts
its backend, and the other test files keep their single device). For a fixed global batch of 8
examples, the smoke VAE (16 px, channels (4, 8)) takes 3 steps under each backend; the loss
trajectories, final parameters, BatchNorm statistics and optimizer states must agree. The
Soft-IntroVAE case also turns on attribute regularisation (pairs across the whole batch) and
checks that a checkpoint written from the pmap run restores into the single-device jit run's
structure with the same values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cardiac_jax import distributed, parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240

CHECK = r"""
import json, sys
import jax
import numpy as np
from cardiac_jax import checkpointing, families, parallel
from experiments.configs import get_config

objective, checkpoint_dir = sys.argv[1], sys.argv[2]
assert jax.device_count() == 8, jax.devices()
config = get_config("vae:smoke")
config.data.image_size = 16
config.model.channels = (4, 8)
config.train.batch_size = 8
config.loss.objective = objective
if objective == "soft_intro":
  config.loss.gamma = 1.0
  config.loss.regularized_dims = (0, 1, 2)
rng = np.random.default_rng(0)
batches = [{"image": rng.random((8, 16, 16, 1), dtype=np.float32),
            "attributes": rng.normal(size=(8, 3)).astype(np.float32),
            "subject": np.array([f"s{i}" for i in range(8)])} for _ in range(3)]
root = jax.random.key(0)
init_state = jax.jit(families.make_family(config).init_state)  # Compiled once, run per backend.

def run(num_devices, backend):
  mesh = parallel.make_mesh(num_devices)
  state = parallel.replicate(init_state(root), mesh)
  step = parallel.compile_train_step(
      lambda axis: families.make_family(config, axis_name=axis).train_step, mesh, backend)
  losses = []
  for i, batch in enumerate(batches):
    state, metrics = step(state, batch, jax.random.fold_in(root, i))
    metrics = jax.device_get(metrics)
    losses.append([float(metrics["loss"]), float(metrics["grad_norm_encoder"]),
                   float(metrics["grad_norm_decoder"])])
  assert state.params["encoder"]["stem"]["kernel"].sharding.is_fully_replicated
  return state, losses

def arrays(state):
  tree = (state.params, state.batch_stats, state.opt_state, state.step)
  return {jax.tree_util.keystr(p): np.asarray(v).tolist()
          for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}

out = {}
for name, num_devices, backend in (("jit1", 1, "jit"), ("jit8", 8, "jit"), ("pmap8", 8, "pmap")):
  state, losses = run(num_devices, backend)
  out[name] = {"losses": losses, "arrays": arrays(state)}
  if name == "pmap8" and checkpoint_dir != "-":
    with checkpointing.Checkpointer(checkpoint_dir) as checkpointer:
      checkpointer.save(3, state, force=True)
    mesh = parallel.make_mesh(1)
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=parallel.replicated(mesh)),
        jax.eval_shape(families.make_family(config).init_state, root))
    with checkpointing.Checkpointer(checkpoint_dir) as checkpointer:
      restored = checkpointer.restore(abstract, 3)
    out["restored"] = {"arrays": arrays(restored),
                       "devices": len(restored.params["encoder"]["stem"]["kernel"].devices())}
print("RESULT " + json.dumps(out))
"""


def _launch_check(objective: str, checkpoint_dir: str) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             # Cheaper XLA:CPU code generation keeps the three compilations short; every backend
             # in the comparison runs under the same flags.
             XLA_FLAGS="--xla_force_host_platform_device_count=8 "
                       "--xla_backend_optimization_level=0 "
                       "--xla_llvm_disable_expensive_passes=true")
  return subprocess.Popen([sys.executable, "-c", CHECK, objective, checkpoint_dir], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
  try:
    stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    proc.kill()
    pytest.fail(f"the 8-device check did not finish within {TIMEOUT_S} s")
  if proc.returncode:
    pytest.fail(f"8-device check failed:\n{stdout[-2000:]}\n{stderr[-4000:]}")
  line = [l for l in stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


# Tolerances. The runs differ only in the order of float32 reductions (one sum over 8 rows vs
# 8 per-device sums all-reduced; per-device vs global BatchNorm moments), ~1e-7 relative.
# Losses and gradient norms: rtol 1e-5. Parameters and optimizer moments: Adam divides by
# sqrt(v) + 1e-8, so a parameter with a near-zero gradient can move by a different fraction of
# lr = 2e-4 when its gradient rounds differently; atol 2e-5 (3 steps) allows that and is still
# far below the ~1e-4 that un-averaged gradients or per-device BatchNorm statistics produce.
LOSS_RTOL = 1e-5
ARRAY_RTOL, ARRAY_ATOL = 1e-5, 2e-5


def _assert_same_run(run, reference, label):
  assert run["arrays"].keys() == reference["arrays"].keys()
  if "losses" in run:
    np.testing.assert_allclose(run["losses"], reference["losses"], rtol=LOSS_RTOL,
                               err_msg=f"{label}: loss / gradient-norm trajectory")
  for name, value in reference["arrays"].items():
    np.testing.assert_allclose(np.asarray(run["arrays"][name]), np.asarray(value),
                               rtol=ARRAY_RTOL, atol=ARRAY_ATOL, err_msg=f"{label}: {name}")


OBJECTIVES = ("vae", "soft_intro")


@pytest.fixture(scope="module")
def all_runs(tmp_path_factory):
  """{objective: runs}; both checks run at once (their compilations overlap on 2 cores)."""
  checkpoint_dir = str(tmp_path_factory.mktemp("pmap_checkpoint"))
  launched = {objective: _launch_check(objective, checkpoint_dir if objective == "soft_intro"
                                       else "-") for objective in OBJECTIVES}
  try:
    return {objective: _result(proc) for objective, proc in launched.items()}
  finally:
    for proc in launched.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(params=OBJECTIVES)
def backends(request, all_runs):
  return request.param, all_runs[request.param]


def test_eight_device_jit_matches_one_device(backends):
  objective, runs = backends
  _assert_same_run(runs["jit8"], runs["jit1"], f"{objective} jit 8 devices")


def test_eight_device_pmap_matches_one_device(backends):
  objective, runs = backends
  _assert_same_run(runs["pmap8"], runs["jit1"], f"{objective} pmap 8 devices")
  losses = np.asarray(runs["jit1"]["losses"])
  assert np.all(np.isfinite(losses)) and len(losses) == 3
  assert len({round(loss, 4) for loss in losses[:, 0]}) == 3  # The model did change.


def test_pmap_checkpoint_restores_into_a_jit_run(all_runs):
  runs = all_runs["soft_intro"]
  assert runs["restored"]["devices"] == 1
  assert runs["restored"]["arrays"] == runs["pmap8"]["arrays"]  # Saved values, bit for bit.
  _assert_same_run(runs["restored"], runs["jit1"], "soft_intro restored pmap checkpoint")


def test_unknown_backend_is_rejected():
  with pytest.raises(ValueError, match="parallel.backend='pjit'"):
    parallel.check_backend("pjit")


def test_distributed_is_a_no_op_for_one_process(monkeypatch):
  for name in (distributed.COORDINATOR_ENV, distributed.NUM_PROCESSES_ENV,
               distributed.PROCESS_ID_ENV, "SLURM_JOB_ID"):
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize_from_environment() is False
  assert distributed.initialize_from_environment(num_processes=1, process_id=0) is False


def test_distributed_rejects_incomplete_settings(monkeypatch):
  with pytest.raises(ValueError, match="needs all of coordinator address"):
    distributed.initialize_from_environment(num_processes=2)
  with pytest.raises(ValueError, match="outside"):
    distributed.initialize_from_environment("127.0.0.1:1234", num_processes=2, process_id=2)
  monkeypatch.setenv(distributed.NUM_PROCESSES_ENV, "two")
  with pytest.raises(ValueError, match="CARDIAC_JAX_NUM_PROCESSES must be an integer"):
    distributed.initialize_from_environment()
