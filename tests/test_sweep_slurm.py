"""The sweep's SLURM job array (experiments.sweep --slurm) and its aggregation (--aggregate):
the script's syntax and resources, task i running job i of the --dry_run list, tasks run by
bash with small Python scripts in place of training and evaluation (no SLURM needed), their
requeue before the time limit, and the comparison table of the finished jobs."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from experiments import sweep, sweep_slurm
from tests.test_compare_sweep import FAKE_EVALUATE, FAKE_TRAIN, SLOW_TRAIN

EVAL_STEPS = ["latest", "best"]


def dry_run_lines(axes, seeds, root):
  out = io.StringIO()
  sweep.run_sweep("vae:smoke", axes, seeds, root, dry_run=True, out=out,
                  eval_steps=EVAL_STEPS)
  return out.getvalue().splitlines()


def run_task(script, index, *args, env=None, timeout=120):
  env = dict(env or os.environ, SLURM_ARRAY_TASK_ID=str(index), SLURM_ARRAY_JOB_ID="77")
  return subprocess.run(["bash", script, *args], env=env, capture_output=True, text=True,
                        timeout=timeout)


@pytest.fixture
def fake_python(tmp_path):
  """A directory to put first on PATH: its `python` runs small scripts for `-m
  experiments.train` / `-m experiments.evaluate` (FAKE_TRAIN, FAKE_EVALUATE, or the test's own
  train script) and the real interpreter otherwise; its `scontrol` records its arguments."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "train.py").write_text(FAKE_TRAIN)
  (bin_dir / "evaluate.py").write_text(FAKE_EVALUATE)
  (bin_dir / "python").write_text(textwrap.dedent(f"""\
      #!/bin/bash
      if [ "$1" = -m ] && [ "$2" = experiments.train ]; then
        shift 2; exec {sys.executable} {bin_dir}/train.py "$@"
      fi
      if [ "$1" = -m ] && [ "$2" = experiments.evaluate ]; then
        shift 2; exec {sys.executable} {bin_dir}/evaluate.py "$@"
      fi
      exec {sys.executable} "$@"
      """))
  (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {bin_dir}/scontrol.log\n')
  for name in ("python", "scontrol"):
    os.chmod(bin_dir / name, 0o755)
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  return bin_dir, env


def test_the_script_is_valid_bash_and_task_i_runs_job_i(tmp_path):
  axes = [sweep.parse_set("config.loss.beta_kl=1,2"),
          sweep.parse_set("config.model.channels=(8,16),(16,32)")]
  root = str(tmp_path / "sweep")
  path = str(tmp_path / "array.sh")
  settings = sweep_slurm.SlurmSettings(partition="gpu-long", time="02:00:00", gpus=2, cpus=4,
                                 max_running=3)
  jobs = sweep_slurm.write_slurm_sweep("vae:smoke", axes, [0, 1], root, path, eval_steps=EVAL_STEPS,
                                 settings=settings, out=io.StringIO())
  assert len(jobs) == 8
  assert subprocess.run(["bash", "-n", path]).returncode == 0
  with open(path) as f:
    script = f.read()
  for line in ("#SBATCH --array=0-7%3", "#SBATCH --partition=gpu-long",
               "#SBATCH --time=02:00:00", "#SBATCH --gpus=2", "#SBATCH --cpus-per-task=4",
               "#SBATCH --requeue", "#SBATCH --open-mode=append",
               f"#SBATCH --output={root}/slurm_logs/%x-%A_%a.out",
               "#SBATCH --signal=B:USR1@300"):
    assert any(l.startswith(line) for l in script.splitlines()), line
  assert os.path.isdir(os.path.join(root, "slurm_logs"))
  assert os.path.isfile(os.path.join(root, "sweep.json"))

  expected = dry_run_lines(axes, [0, 1], root)
  printed = [run_task(path, i, "--print").stdout.rstrip("\n") for i in range(len(jobs))]
  assert printed == expected
  assert all("--config.seed=" in line and "--step=best" in line for line in printed)
  outside = run_task(path, len(jobs), "--print")
  assert outside.returncode == 2 and "tasks 0-7" in outside.stderr

  # Defaults: the cluster's partition, one GPU, no limit on running tasks.
  default = sweep_slurm.slurm_script(jobs, "vae:smoke", [], EVAL_STEPS, root)
  assert "--partition" not in default and "#SBATCH --gpus=1\n" in default
  assert "#SBATCH --array=0-7\n" in default


def test_finished_array_tasks_aggregate_to_the_local_sweeps_table(fake_python, tmp_path,
                                                                  monkeypatch):
  bin_dir, env = fake_python
  axes = [sweep.parse_set("config.loss.beta_kl=1,2")]
  # The local sweep, with the same small scripts as its jobs.
  local_root = str(tmp_path / "local")
  monkeypatch.setattr(sweep, "train_command", lambda job, spec, extra, python="python": [
      sys.executable, str(bin_dir / "train.py"), f"--workdir={job.workdir}", *job.overrides,
      *extra])
  real_evaluate_command = sweep.evaluate_command
  monkeypatch.setattr(sweep, "evaluate_command",
                      lambda job, python="python", selection="latest": [
                          sys.executable, str(bin_dir / "evaluate.py"),
                          *real_evaluate_command(job, python, selection)[3:]])
  results = sweep.run_sweep("vae:smoke", axes, [0], local_root, out=io.StringIO(),
                            eval_steps=EVAL_STEPS)
  assert [r.status for r in results] == ["done", "done"]
  monkeypatch.undo()

  # The cluster path: every task of the array run by bash, then --aggregate.
  cluster_root = str(tmp_path / "cluster")
  path = str(tmp_path / "array.sh")
  sweep_slurm.write_slurm_sweep("vae:smoke", axes, [0], cluster_root, path, eval_steps=EVAL_STEPS,
                          out=io.StringIO())
  out = io.StringIO()
  assert sweep_slurm.aggregate_sweep("vae:smoke", axes, [0], cluster_root, eval_steps=EVAL_STEPS,
                               out=out) != []
  assert "0 of 2 jobs evaluated" in out.getvalue()
  for index in range(2):
    done = run_task(path, index, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"task {index} done" in done.stdout
  again = run_task(path, 0, env=env)  # A requeued task whose job is finished does nothing.
  assert again.returncode == 0 and "already evaluated" in again.stdout
  out = io.StringIO()
  assert sweep_slurm.aggregate_sweep("vae:smoke", axes, [0], cluster_root, eval_steps=EVAL_STEPS,
                               out=out) == []
  assert "2 of 2 jobs evaluated" in out.getvalue()
  # TensorBoard's HParams dashboard sees the grid and each job, as after a local sweep.
  from tensorboard.plugins.hparams import metadata as hparams_metadata
  from tests.test_tensorboard import read_events
  experiment = hparams_metadata.parse_experiment_plugin_data(read_events(
      cluster_root).PluginTagToContent("hparams")[hparams_metadata.EXPERIMENT_TAG])
  assert {h.name for h in experiment.hparam_infos} == {"loss.beta_kl", "seed"}
  for job in sweep.make_jobs(axes, [0], cluster_root):
    events = read_events(os.path.join(job.workdir, "tensorboard"))
    assert hparams_metadata.SESSION_START_INFO_TAG in events.PluginTagToContent("hparams")
  for name in ("comparison.md", "comparison.csv", "comparison_best.md", "comparison_best.csv"):
    with open(os.path.join(local_root, name)) as f:
      local = f.read()
    with open(os.path.join(cluster_root, name)) as f:  # The CSVs name the workdirs.
      assert f.read() == local.replace(local_root, cluster_root), name
  assert "loss.beta_kl=2.0" in local


def test_a_task_whose_training_stopped_early_is_not_evaluated(fake_python, tmp_path):
  _, env = fake_python
  root = str(tmp_path / "sweep")
  path = str(tmp_path / "array.sh")
  axes = [sweep.parse_set("loss.beta_kl=4")]  # FAKE_TRAIN's preempted run.
  sweep_slurm.write_slurm_sweep("vae:smoke", axes, [0], root, path, out=io.StringIO())
  done = run_task(path, 0, env=env)
  assert done.returncode == 1 and "stopped before its last step" in done.stderr
  assert not os.path.exists(sweep.metrics_path(os.path.join(root, "beta_kl=4,seed=0")))


def test_usr1_before_the_time_limit_stops_training_and_requeues_the_task(fake_python,
                                                                         tmp_path):
  bin_dir, env = fake_python
  (bin_dir / "train.py").write_text(SLOW_TRAIN)
  root = str(tmp_path / "sweep")
  path = str(tmp_path / "array.sh")
  sweep_slurm.write_slurm_sweep("vae:smoke", [sweep.parse_set("loss.beta_kl=1,2")], [0], root, path,
                          out=io.StringIO())
  workdir = os.path.join(root, "beta_kl=2,seed=0")
  task = subprocess.Popen(["bash", path], env=dict(env, SLURM_ARRAY_TASK_ID="1",
                                                   SLURM_ARRAY_JOB_ID="77"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 60
  while not os.path.exists(os.path.join(workdir, "ready")) and time.monotonic() < deadline:
    time.sleep(0.05)
  task.send_signal(signal.SIGUSR1)  # What SLURM sends the batch script (--signal=B:USR1@300).
  stdout, stderr = task.communicate(timeout=60)
  assert task.returncode == 0, stdout + stderr
  with open(os.path.join(workdir, "stopped_by_signal")) as f:
    assert f.read() == str(int(signal.SIGTERM))
  with open(bin_dir / "scontrol.log") as f:
    assert f.read().split() == ["requeue", "77_1"]
  assert not os.path.exists(sweep.metrics_path(workdir))
