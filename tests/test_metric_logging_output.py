"""What a first run prints: one line per phase and no library noise (TensorFlow's C++ notices,
tensorflow-datasets' config dumps, build messages and progress bars), which
CARDIAC_JAX_VERBOSE=1 brings back."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lines the libraries print on a first run (a fresh data cache) unless silenced.
NOISE = ("oneDNN custom operations", "absl::InitializeLog", "cpu_feature_guard",
         "Using custom data configuration", "Downloading and preparing dataset",
         "Subsequent calls will reuse this data", "Generating splits", "Shuffling",
         "examples/s]")


def run_python(args, cache: str, verbose: bool, cwd):
  """Runs `python args` with a fresh data cache, as from a user's shell (no TensorFlow log
  settings inherited from this test session); returns stdout and stderr as one stream, in the
  order they were written."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS", "CARDIAC_JAX_VERBOSE")}
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["CARDIAC_JAX_CACHE"] = cache
  if verbose:
    env["CARDIAC_JAX_VERBOSE"] = "1"
  result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
  output = result.stdout
  assert result.returncode == 0, output[-3000:]
  return output


def test_first_run_prints_its_phases_and_no_library_noise(tmp_path):
  workdir = str(tmp_path / "run")
  output = run_python(["-m", "experiments.train", "--config=vae:smoke", f"--workdir={workdir}",
                       "--config.train.num_steps=2"], str(tmp_path / "cache"), False, tmp_path)
  found = [pattern for pattern in NOISE if pattern in output]
  assert not found, f"library noise {found} in:\n{output[-4000:]}"
  # The cohort's line is data_pipelines.synthetic's: only its words that say what it does.
  phases = ["vae: ", "cohort", "10 of 10 subjects",
            "Preparing the mid slices", "prepared 10 of 10 subjects",
            "Training vae for 2 steps", f"tensorboard --logdir {workdir}", f"Done: {workdir}"]
  positions = [output.find(phase) for phase in phases]
  assert -1 not in positions and positions == sorted(positions), output[-4000:]


# The data phase of the training command (quieted as `experiments.train` quiets it): cheap,
# and tensorflow-datasets builds a dataset there, which it always announces.
PREPARE = textwrap.dedent("""
    from experiments import common, configs
    common.quiet_logs()
    common.prepared_dir(configs.get_config("vae:smoke"))
""")


def test_verbose_environment_variable_brings_the_library_logs_back(tmp_path):
  verbose = run_python(["-c", PREPARE], str(tmp_path / "verbose"), True, tmp_path)
  # tfds's progress bars (its "Downloading and preparing" lines are the builders' own choice:
  # silenced in every mode by data_pipelines.tfds_builders.SubjectBuilder).
  assert "Generating splits" in verbose, verbose[-3000:]
  assert "Using custom data configuration" in verbose, verbose[-3000:]
  quiet = run_python(["-c", PREPARE], str(tmp_path / "quiet"), False, tmp_path)
  assert not [pattern for pattern in NOISE if pattern in quiet], quiet[-3000:]
  assert "prepared 10 of 10 subjects" in quiet
