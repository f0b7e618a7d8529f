"""Shared test fixtures: an isolated data cache, and small in-memory prepared examples."""

from __future__ import annotations

import contextlib
import fcntl
import os

import numpy as np
import pytest

from cardiac_jax import runtime, structures

# Cheaper XLA:CPU code generation for the whole session and for the command-line runs the
# tests start (they inherit the environment): compilation dominates the toy-sized programs of
# the tests, and without LLVM's backend optimisation it takes about half the time (the bfloat16
# training tests: 109 s -> 59 s). Every program still computes the same function; comparisons
# within a test (resume vs uninterrupted, sharded vs single device) run under the same flags.
# Set before JAX creates its CPU backend, which reads XLA_FLAGS once.
_FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0",
                       "--xla_llvm_disable_expensive_passes=true")
runtime.add_xla_flags(_FAST_COMPILE_FLAGS, "xla_backend_optimization_level")
runtime.configure_xla_cpu()  # What every command does first.


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
  """Every test session generates its synthetic data into its own cache directory."""
  path = str(tmp_path_factory.mktemp("cardiac_jax_cache"))
  previous = os.environ.get("CARDIAC_JAX_CACHE")
  os.environ["CARDIAC_JAX_CACHE"] = path
  yield path
  if previous is None:
    os.environ.pop("CARDIAC_JAX_CACHE", None)
  else:
    os.environ["CARDIAC_JAX_CACHE"] = previous


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory, worker_id):
  """XLA's persistent compilation cache for the whole session, shared by the xdist workers
  and by the command-line runs the tests start (JAX_COMPILATION_CACHE_DIR): the many tests
  that train the same smoke configs load compiled programs instead of compiling them again
  (compilation dominates smoke steps on a CPU). Results do not change: a cached executable is
  the program the compiler would build."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc
  previous = jax.config.jax_compilation_cache_dir
  if previous:                          # The caller already caches: leave it alone.
    yield previous
    return
  if worker_id == "master":
    path = str(tmp_path_factory.mktemp("xla_cache"))
  else:
    path = os.path.join(str(tmp_path_factory.getbasetemp().parent), "xla_cache")
    os.makedirs(path, exist_ok=True)
  previous_env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  cc.reset_cache()
  jax.config.update("jax_compilation_cache_dir", path)
  try:
    yield path
  finally:
    jax.config.update("jax_compilation_cache_dir", previous)
    cc.reset_cache()
    if previous_env is None:
      os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    else:
      os.environ["JAX_COMPILATION_CACHE_DIR"] = previous_env


def make_disc_example(index: int, size: int = 64) -> dict:
  """A prepared-schema example: concentric LV cavity / myocardium discs and an RV crescent,
  with radii (and so attributes) that vary with `index`."""
  yy, xx = np.mgrid[:size, :size]
  radius = size * (0.12 + 0.015 * (index % 7))
  centre = size / 2
  labels = np.zeros((size, size), np.uint8)
  distance = np.hypot(yy - centre, xx - centre)
  labels[np.hypot(yy - centre, xx - centre + 1.6 * radius) < 1.1 * radius] = \
      structures.RV_BLOOD_POOL
  labels[distance < radius + size * 0.06] = structures.LV_MYOCARDIUM
  labels[distance < radius] = structures.LV_BLOOD_POOL
  es_labels = np.where(distance < 0.7 * radius, structures.LV_BLOOD_POOL,
                       np.where(labels == structures.LV_BLOOD_POOL, structures.LV_MYOCARDIUM,
                                labels)).astype(np.uint8)
  intensity = {0: 0.0, structures.RV_BLOOD_POOL: 0.8, structures.LV_MYOCARDIUM: 0.3,
               structures.LV_BLOOD_POOL: 0.9}
  image = np.stack([np.vectorize(intensity.get)(labels), np.vectorize(intensity.get)(es_labels)],
                   axis=-1).astype(np.float32)
  attributes = {name: float((index % 7 + 1) * (k + 1)) for k, name in
                enumerate(structures.ATTRIBUTE_NAMES)}
  return {"subject": f"patient{index + 1:03d}", "group": index % len(structures.GROUPS),
          "image": image, "label": np.stack([labels, es_labels], axis=-1),
          "slice_index": 4, "attributes": attributes}


@pytest.fixture(scope="session")
def disc_examples():
  return [make_disc_example(i) for i in range(24)]


def in_memory_source(train: list, evaluation: list):
  """A training.DataSource over fixed batches: training batch k is train[k % len(train)], so a
  run resumed at step k sees what it would have seen; evaluation is the list of eval batches."""
  from cardiac_jax import training

  def train_batches(start):
    step = start
    while True:
      yield train[step % len(train)]
      step += 1

  return training.DataSource(train_batches=train_batches, eval_batches=lambda: list(evaluation))


# ----------------------------------------------------------------------------- cine analyses
# A tiny synthetic cine cohort with the 4-chamber view, prepared once per session, and a
# smoke diffae3d run trained on it: shared by the tests of the DiffAE analyses (latents,
# sampling, manipulation, association, reproducibility) so that each module does not
# synthesize, prepare and train again.
CINE_COHORT_SUBJECTS = 12
CINE_COHORT_SEED = 11


@contextlib.contextmanager
def _built_once(tmp_path_factory, worker_id: str, name: str):
  """Yields (directory, build): a directory shared by the pytest-xdist workers of this session
  (their common base temp; this process's own one without xdist), held under a file lock, and
  whether the caller must build its content (False once a previous holder finished)."""
  if worker_id == "master":
    base = str(tmp_path_factory.mktemp(name))
  else:
    base = os.path.join(str(tmp_path_factory.getbasetemp().parent), name)
  os.makedirs(base, exist_ok=True)
  done = os.path.join(base, ".done")
  with open(os.path.join(base, ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    yield base, not os.path.exists(done)
    open(done, "w").close()


@pytest.fixture(scope="session")
def cine_cohort(tmp_path_factory, worker_id):
  """(raw cohort root, prepared cine dataset directory) of 12 small synthetic subjects:
  8 frames of 32 px at 3 mm, subject split 6 / 2 / 4. Built once per test session: the
  xdist workers share it (the first one builds it under a file lock, the others wait)."""
  from data_pipelines import cine, synthetic
  with _built_once(tmp_path_factory, worker_id, "cine_cohort") as (base, build):
    root, prepared = os.path.join(base, "raw"), os.path.join(base, "prepared")
    if build:
      ranges = synthetic.AcquisitionRanges(image_size=(144, 160), spacing_mm=(1.7, 1.8),
                                           num_frames=(10, 12))
      synthetic.synthesize_cohort(root, CINE_COHORT_SUBJECTS, CINE_COHORT_SEED, ranges=ranges,
                                  long_axis_4ch=True)
      cine.prepare_cine_dataset(root, prepared, cine.CineConfig(num_frames=8, image_size=32,
                                                                spacing_mm=3.0),
                                split_fractions=(0.5, 0.17, 0.33))
  return root, prepared


def diffae_smoke_config(prepared_dir: str, seed: int = 0):
  """The diffae3d smoke config reading the prepared tiny cohort (4 frames of 16 px)."""
  from experiments.configs import diffae3d
  config = diffae3d.get_config("smoke")
  config.seed = seed
  config.data.dataset = "prepared"
  config.data.prepared_dir = prepared_dir
  config.data.prepare.image_size = 32
  config.data.prepare.spacing_mm = 3.0
  config.data.num_frames = 8
  config.train.num_steps = 3
  config.train.eval_every = 0
  config.train.figure_every = 0
  config.train.checkpoint_every = 3
  return config


def train_diffae_smoke(prepared_dir: str, workdir: str, seed: int = 0) -> str:
  """Trains the smoke diffae3d config on the prepared tiny cohort into `workdir`."""
  from cardiac_jax import training
  from experiments import common
  config = diffae_smoke_config(prepared_dir, seed)
  training.train_and_evaluate(config, workdir, common.make_data_source(config))
  return workdir


@pytest.fixture(scope="session")
def diffae_run(cine_cohort, tmp_path_factory, worker_id):
  """Workdir of a smoke diffae3d run (3 steps, seed 0) on the prepared tiny cohort, trained
  once per test session (shared by the xdist workers like `cine_cohort`). Treat it as
  read-only: a test whose command writes into the run directory works on `copy_run(...)`."""
  _, prepared = cine_cohort
  with _built_once(tmp_path_factory, worker_id, "diffae_run") as (base, build):
    workdir = os.path.join(base, "run")
    if build:
      train_diffae_smoke(prepared, workdir, seed=0)
  return workdir


def copy_run(workdir: str, destination) -> str:
  """A private copy of a run directory (for tests whose commands write into the run)."""
  import shutil
  target = os.path.join(str(destination), os.path.basename(workdir.rstrip("/")) or "run")
  shutil.copytree(workdir, target)
  return target


def tree_files(root: str) -> dict[str, bytes]:
  """{path relative to root, '/'-separated: bytes} of every file under root."""
  out = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root).replace(os.sep, "/")] = f.read()
  return out
