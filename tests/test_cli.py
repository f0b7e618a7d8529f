"""The documented commands end to end at smoke size, as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, cwd, check=True, without_cpu_flag=False):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  if without_cpu_flag:  # As a user's shell: the command has to set it itself.
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "ynn_fusion_type" not in f)
  result = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
  if check and result.returncode != 0:
    raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                         f"{result.stderr[-3000:]}")
  return result


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """`python -m experiments.train --config=ar_sivae:smoke` from a directory outside the repo."""
  cwd = tmp_path_factory.mktemp("user")
  workdir = str(cwd / "run")
  result = run(["experiments.train", "--config=ar_sivae:smoke", f"--workdir={workdir}",
                "--config.train.num_steps=3"], cwd=cwd, without_cpu_flag=True)
  # The XLA:CPU setting is applied before the config checks start JAX's backend.
  assert "started its backend before" not in result.stderr, result.stderr[-2000:]
  return cwd, workdir


def test_train_writes_the_documented_workdir(trained_run):
  _, workdir = trained_run
  for name in ("config.json", "metrics.jsonl", "checkpoints", "figures", "tensorboard"):
    assert os.path.exists(os.path.join(workdir, name)), name
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["train"]["num_steps"] == 3
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f if "train/loss" in line]
  assert steps == [1, 2, 3]
  assert any(f.endswith(".png") for f in os.listdir(os.path.join(workdir, "figures")))


def test_rerun_resumes_and_sigterm_checkpoints_and_the_process_exits(trained_run):
  """Rerunning the command resumes the run; a preempted job must save, print how to resume,
  and actually exit (no hung threads), its log one unbroken history."""
  cwd, workdir = trained_run
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  process = subprocess.Popen(
      [sys.executable, "-m", "experiments.train", "--config=ar_sivae:smoke",
       f"--workdir={workdir}", "--config.train.num_steps=100000"],
      cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")

  def train_steps():
    with open(metrics) as f:
      return [json.loads(line)["step"] for line in f
              if "train/loss" in line and line.endswith("\n")]

  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if max(train_steps()) >= 5:
      break
    time.sleep(0.5)
  assert process.poll() is None, process.communicate()[1][-3000:]
  process.send_signal(signal.SIGTERM)
  try:
    stdout, stderr = process.communicate(timeout=120)
  except subprocess.TimeoutExpired:
    process.kill()
    raise AssertionError("the training process did not exit after SIGTERM")
  assert process.returncode == 0, stderr[-3000:]
  assert "Resuming" in stdout + stderr and "rerun the same command to resume" in stderr
  steps = train_steps()
  assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 5
  assert str(steps[-1]) in os.listdir(os.path.join(workdir, "checkpoints"))


def test_evaluate_writes_metrics_and_figures(trained_run):
  cwd, workdir = trained_run
  run(["experiments.evaluate", f"--workdir={workdir}", "--split=train"], cwd=cwd)
  with open(os.path.join(workdir, "eval", "metrics.json")) as f:
    metrics = json.load(f)
  rec = metrics["reconstruction"]
  assert 0 <= rec["mse"] < 1 and -1 <= rec["ssim"] <= 1
  # Reconstructions, too, decode the seeded draw z ~ q(z|x) as the reference's forward pass
  # does; the posterior-mean decoding (with the loss terms) is beside them.
  mean_rec = metrics["reconstruction_mean_codes"]
  assert (rec["codes"], rec["seed"], mean_rec["codes"]) == ("sampled", 0, "mean")
  assert rec["mse"] != mean_rec["mse"] and "reconstruction_loss" in mean_rec
  assert set(metrics["regularized"]) >= {"lv_edv_ml", "myo_ed_ml", "rv_edv_ml"}
  for key in ("interpretability", "mig", "sap", "scc", "modularity", "mig_binned", "dci"):
    assert key in metrics["interpretability"]
    assert key in metrics["interpretability_mean_codes"]
  # By default the reference protocol: one seeded draw z ~ q(z|x) per subject.
  assert metrics["interpretability"]["codes"] == metrics["regularized"]["codes"] == "sampled"
  assert "q(z|x)" in metrics["interpretability"]["protocol"]
  assert metrics["interpretability_mean_codes"]["codes"] == "mean"
  assert metrics["regularized_mean_codes"]["protocol"] == "posterior means z = mu"
  for figure in ("reconstructions.png", "traversals.png", "attribute_scatter.png"):
    assert os.path.getsize(os.path.join(workdir, "eval", figure)) > 1000


def test_config_errors_fail_before_training_in_one_line(tmp_path):
  """An unknown key used to end in three chained tracebacks; every mistake below is one line
  naming it, and nothing is written."""
  for args, message in (
      (["--config.optimizer.lr=abc"], "error: unknown config key 'optimizer.lr'; nearest: "
                                      "optimizer.learning_rate"),
      (["--config.train.batch_size=large"], "error: flag --config.train.batch_size=large: "
                                            "invalid literal"),
      (["--config.model.no_such_key=1"], "error: unknown config key 'model.no_such_key'")):
    result = run(["experiments.train", "--config=vae:smoke", *args,
                  f"--workdir={tmp_path / 'a'}"], cwd=tmp_path, check=False)
    assert result.returncode == 2 and result.stderr.startswith(message), result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
  assert not os.path.exists(tmp_path / "a")
  missing = run(["experiments.train", "--config=nope"], cwd=tmp_path, check=False)
  assert missing.returncode != 0 and "available" in missing.stderr
