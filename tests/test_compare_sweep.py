"""The comparison table (experiments.compare) on run directories with known numbers, and the
sweep (experiments.sweep): its grid, validation, job bookkeeping, and one real tiny sweep."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from experiments import compare, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(args, cwd, timeout=600):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=timeout)


def write_run(workdir, config, metrics):
  """A run directory as train + evaluate leave it (only the files compare reads)."""
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  if config is not None:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config, f)
  if metrics is not None:
    with open(os.path.join(workdir, "eval", "metrics.json"), "w") as f:
      json.dump(metrics, f)
  return str(workdir)


def fake_config(name, seed, gamma, log_every=25):
  return {"name": name, "seed": seed,
          "loss": {"gamma": gamma, "beta_kl": 1.0, "regularized_dims": [0, 1, 2]},
          "model": {"channels": [8, 16]}, "train": {"num_steps": 100, "log_every": log_every}}


def fake_metrics(mse, psnr, ssim, interp, mig, mig_binned, sap, scc, modularity, dci_d, dci_c,
                 dci_i, rho=None, codes="sampled"):
  """metrics.json with the given means; codes=None leaves out the protocol fields (a file
  written before evaluate scored sampled codes); the mean-code block holds other numbers."""
  names = ("lv_edv_ml", "myo_ed_ml", "rv_edv_ml")
  metrics = {
      "workdir": "x", "config": "ar_sivae", "split": "test", "step": 100, "num_subjects": 30,
      "reconstruction": {"mse": mse, "psnr": psnr, "ssim": ssim, "mse_ch0": mse,
                         "reconstruction_loss": 1.0, "kl": 2.0},
      "interpretability": {
          "interpretability": {**{n: {"dim": i, "score": interp} for i, n in enumerate(names)},
                               "mean": interp},
          "mig": {**{n: mig for n in names}, "mean": mig},
          "sap": {**{n: sap for n in names}, "mean": sap},
          "scc": {**{n: scc for n in names}, "mean": scc},
          "scc_dims": {n: 0 for n in names}, "modularity": modularity,
          "self_information": {n: 1.0 for n in names},
          "mig_binned": {**{n: mig_binned for n in names}, "mean": mig_binned},
          "dci": {"disentanglement": dci_d, "completeness": dci_c,
                  "informativeness": {**{n: dci_i for n in names}, "mean": dci_i}}}}
  if rho is not None:
    metrics["regularized"] = {**{n: {"dim": i, "spearman_rho": rho, "p_value": 0.01}
                                 for i, n in enumerate(names)}, "mean_abs_rho": rho}
  if codes is not None:
    metrics["interpretability_mean_codes"] = json.loads(json.dumps(metrics["interpretability"]))
    metrics["interpretability_mean_codes"]["mig"]["mean"] = 0.999
    for key, block in (("interpretability", metrics["interpretability"]),
                       ("interpretability_mean_codes", metrics["interpretability_mean_codes"])):
      protocol = codes if key == "interpretability" else "mean"
      block.update({"codes": protocol, "protocol": f"{protocol} codes",
                    **({"seed": 0} if protocol == "sampled" else {})})
  return metrics


# (config name, seed, gamma) -> metric numbers in the order of compare.COLUMNS; the first two
# differ only in seed.
RUNS = {
    "a": (("ar_sivae", 0, 0.1), (0.010, 20.0, 0.80, 0.60, 0.30, 0.25, 0.20, 0.70, 0.90,
                                 0.50, 0.45, 0.65, 0.95)),
    "b": (("ar_sivae", 1, 0.1), (0.014, 18.0, 0.70, 0.40, 0.10, 0.15, 0.40, 0.50, 0.80,
                                 0.30, 0.35, 0.55, 0.85)),
    "c": (("ar_sivae", 0, 0.05), (0.020, 17.0, 0.60, 0.30, 0.20, 0.12, 0.10, 0.40, 0.70,
                                  0.20, 0.25, 0.45, 0.75)),
    "d": (("vae", 0, 0.0), (0.030, 15.0, 0.50, 0.20, 0.05, 0.04, 0.05, 0.30, 0.60,
                            0.10, 0.15, 0.35, None)),
}


@pytest.fixture(scope="module")
def fake_runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("runs")
  dirs = {}
  for key, ((name, seed, gamma), numbers) in RUNS.items():
    # Run b logs more often than a: a bookkeeping field that must not split or name a row.
    dirs[key] = write_run(base / f"run_{key}",
                          fake_config(name, seed, gamma, log_every=5 if key == "b" else 25),
                          fake_metrics(*numbers, codes=None if key == "d" else "sampled"))
  return dirs


def table_cells(markdown):
  """Rows of a markdown table as lists of stripped cells (header first, separator dropped)."""
  lines = [l for l in markdown.strip().splitlines() if not l.startswith("|---")]
  return [[c.strip() for c in l.strip().strip("|").split(" | ")] for l in lines]


HEADER = ["Run", "MSE", "PSNR (dB)", "SSIM", "Interpretability", "MIG", "MIG (binned)", "SAP",
          "SCC", "Modularity", "DCI D", "DCI C", "DCI I (R^2)", "Mean abs rho (reg. dims)",
          "Codes"]


def test_table_has_one_row_per_run_with_its_numbers(fake_runs):
  order = ["a", "b", "c", "d"]
  markdown, rows = compare.comparison_table([fake_runs[k] for k in order])
  cells = table_cells(markdown)
  assert cells[0] == HEADER
  assert [c[0] for c in cells[1:]] == [
      "ar_sivae loss.gamma=0.1,seed=0", "ar_sivae loss.gamma=0.1,seed=1",
      "ar_sivae loss.gamma=0.05,seed=0", "vae"]
  assert cells[1][1:] == ["0.01000", "20.00", "0.8000", "0.600", "0.300", "0.250", "0.200",
                          "0.700", "0.900", "0.500", "0.450", "0.650", "0.950",
                          "sampled (seed 0)"]
  assert cells[4][-2] == "-"  # The VAE has no regularised dimension.
  assert cells[4][-1] == "mean"  # Its metrics.json predates sampled codes.
  for row, key in zip(rows, order):
    for column, value in zip(compare.COLUMNS, RUNS[key][1]):
      assert row[column.key] == (None if value is None else pytest.approx(value)), column.key
    assert row["n"] == 1 and row["mse_std"] is None and row["workdirs"] == [fake_runs[key]]


def test_group_by_config_gives_mean_and_std_over_seeds(fake_runs):
  markdown, rows = compare.comparison_table(
      [fake_runs[k] for k in ("a", "c", "b", "d")], group_by_config=True)
  assert [r["name"] for r in rows] == ["ar_sivae loss.gamma=0.1", "ar_sivae loss.gamma=0.05",
                                       "vae"]
  grouped = rows[0]
  assert grouped["n"] == 2 and grouped["seeds"] == [0, 1]
  a, b = RUNS["a"][1], RUNS["b"][1]
  for i, column in enumerate(compare.COLUMNS):
    assert grouped[column.key] == pytest.approx((a[i] + b[i]) / 2)
    assert grouped[f"{column.key}_std"] == pytest.approx(statistics.stdev([a[i], b[i]]))
  cells = table_cells(markdown)
  assert cells[0] == HEADER[:1] + ["Seeds"] + HEADER[1:]
  # MSE 0.012 ± 0.002828, PSNR 19 ± 1.414, |rho| 0.9 ± 0.0707.
  assert cells[1][:4] == ["ar_sivae loss.gamma=0.1", "0,1", "0.01200 ± 0.00283", "19.00 ± 1.41"]
  assert cells[1][-2:] == ["0.900 ± 0.071", "sampled (seed 0)"]
  assert cells[2][2] == "0.02000"  # A single seed: the value alone.
  assert cells[3][-2:] == ["-", "mean"]


def test_interpretability_columns_show_the_headline_protocol_and_name_its_codes(tmp_path):
  """The columns read the "interpretability" block (the reference protocol), never the
  mean-code block beside it, and a group whose runs scored different codes says so."""
  numbers = RUNS["a"][1]
  sampled = write_run(tmp_path / "sampled", fake_config("ar_sivae", 0, 0.1),
                      fake_metrics(*numbers))
  means = write_run(tmp_path / "means", fake_config("ar_sivae", 1, 0.1),
                    fake_metrics(*numbers, codes="mean"))
  _, rows = compare.comparison_table([sampled, means])
  assert [r["codes"] for r in rows] == ["sampled (seed 0)", "mean"]
  assert rows[0]["mig"] == pytest.approx(0.30) and rows[0]["mig_binned"] == pytest.approx(0.25)
  assert rows[0]["dci_informativeness"] == pytest.approx(0.65)
  markdown, grouped = compare.comparison_table([sampled, means], group_by_config=True)
  assert grouped[0]["codes"] == "sampled (seed 0); mean"
  assert table_cells(markdown)[1][-1] == "sampled (seed 0); mean"
  compare.write_csv(str(tmp_path / "t.csv"), rows)
  with open(tmp_path / "t.csv") as f:
    assert [r["codes"] for r in csv.DictReader(f)] == ["sampled (seed 0)", "mean"]


def test_runs_without_config_are_named_by_workdir(tmp_path):
  first = write_run(tmp_path / "baseline_run", None, fake_metrics(*RUNS["d"][1]))
  second = write_run(tmp_path / "other", None, fake_metrics(*RUNS["a"][1]))
  _, rows = compare.comparison_table([first, second], group_by_config=True)
  assert [r["name"] for r in rows] == ["baseline_run", "other"]
  assert rows[1]["regularized_abs_rho"] == pytest.approx(0.95)


def test_missing_evaluation_names_the_run_and_the_command(fake_runs, tmp_path):
  unevaluated = write_run(tmp_path / "not_evaluated", fake_config("vae", 0, 0.0), None)
  with pytest.raises(compare.MissingEvaluationError) as error:
    compare.comparison_table([fake_runs["a"], unevaluated])
  message = str(error.value)
  assert unevaluated in message
  assert f"python -m experiments.evaluate --workdir={unevaluated}" in message
  broken = write_run(tmp_path / "broken", None, None)
  with open(os.path.join(broken, "eval", "metrics.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match="broken.*metrics.json"):
    compare.comparison_table([broken])


def test_compare_command_writes_markdown_and_csv(fake_runs, tmp_path):
  result = run_module(["experiments.compare", fake_runs["a"], fake_runs["b"],
                       fake_runs["c"], "--group_by_config"], cwd=tmp_path, timeout=120)
  assert result.returncode == 0, result.stderr
  with open(tmp_path / "comparison.md") as f:
    written = f.read()
  assert written in result.stdout and len(table_cells(written)) == 3
  with open(tmp_path / "comparison.csv") as f:
    records = list(csv.DictReader(f))
  assert [r["run"] for r in records] == ["ar_sivae loss.gamma=0.1", "ar_sivae loss.gamma=0.05"]
  assert float(records[0]["ssim"]) == pytest.approx(0.75)
  assert float(records[0]["ssim_std"]) == pytest.approx(statistics.stdev([0.8, 0.7]))
  assert records[1]["ssim_std"] == "" and records[0]["seeds"] == "0,1"

  missing = run_module(["experiments.compare", fake_runs["a"], str(tmp_path / "nowhere"),
                        f"--output={tmp_path / 'x.md'}"], cwd=tmp_path, timeout=120)
  assert missing.returncode != 0
  assert "nowhere" in missing.stderr and "experiments.evaluate --workdir=" in missing.stderr
  assert not os.path.exists(tmp_path / "x.md")


def write_tcav(workdir, seed, rows, **protocol):
  """A run directory as train + tcav leave it (only the files compare reads)."""
  results = {"workdir": str(workdir), "step": 1200, "step_selection": "latest",
             "explain_split": "test", "concept_pool": "held_out_negatives",
             "allow_overlap": False, "auc": 0.9 + 0.05 * seed, "set_size": 100,
             "num_random_sets": 10, **protocol,
             "table": [{"concept": c, "description": f"{c} (a|b)", "control": c == "random",
                        "tcav_score": score, "mean_derivative": score - 0.5,
                        "cav_accuracy": 0.8, "p_value": p, "significant": p < 0.005}
                       for c, score, p in rows]}
  os.makedirs(os.path.join(workdir, "tcav"), exist_ok=True)
  with open(os.path.join(workdir, "tcav", "results.json"), "w") as f:
    json.dump(results, f)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"name": "temporal_classifier", "seed": seed}, f)
  return str(workdir)


def test_tcav_tables_pool_over_seeds_and_count_significant_runs(tmp_path):
  runs = [write_tcav(tmp_path / f"seed={s}", s, rows) for s, rows in enumerate([
      [("low_ef", 1.0, 0.001), ("random", 0.2, 0.5)],
      [("low_ef", 0.8, 0.02), ("random", 0.0, 0.3)],
      [("low_ef", 0.9, 0.004), ("random", 0.1, 0.9)]])]
  result = run_module(["experiments.compare", "--analysis=tcav", *runs,
                       f"--output={tmp_path / 'tcav.md'}"], cwd=tmp_path, timeout=120)
  assert result.returncode == 0, result.stderr
  with open(tmp_path / "tcav.md") as f:
    written = f.read()
  assert written in result.stdout
  assert written.startswith("TCAV over 3 runs (seeds 0,1,2, steps 1200,1200,1200): test AUC "
                            "0.950 ± 0.050; concept pool held_out_negatives")
  header, *cells = table_cells(written.split("\n\n", 1)[1])
  assert header[-2:] == ["p-value per run", "significant in"]
  assert cells[0][0] == "low_ef" and cells[0][1] == "low_ef (a\\|b)"
  assert cells[0][2] == f"0.900 ± {statistics.stdev([1.0, 0.8, 0.9]):.3f}"
  assert cells[0][5:] == ["0.001, 0.02, 0.004", "2 of 3"]
  assert cells[1][6] == "0 of 3"
  with open(tmp_path / "tcav.csv") as f:
    records = list(csv.DictReader(f))
  assert [r["concept"] for r in records] == ["low_ef", "random"]
  assert float(records[1]["tcav_score"]) == pytest.approx(0.1)
  assert records[0]["p_values"] == "0.001;0.02;0.004" and records[0]["significant"] == "2"


@pytest.mark.parametrize("protocol, named", [
    ({"concept_pool": "pooled_train_val", "allow_overlap": True}, "concept_pool"),
    ({"set_size": 50}, "set_size"),
    ({"explain_split": "val"}, "explain_split")])
def test_tcav_tables_of_different_protocols_are_not_pooled(tmp_path, protocol, named):
  rows = [("low_ef", 1.0, 0.001)]
  first = write_tcav(tmp_path / "seed=0", 0, rows)
  other = write_tcav(tmp_path / "seed=1", 1, rows, **protocol)
  with pytest.raises(ValueError, match=f"seed=1: TCAV {named} .* differs"):
    compare.tcav_comparison([first, other])
  renamed = write_tcav(tmp_path / "seed=2", 2, [("high_edv", 1.0, 0.001)])
  with pytest.raises(ValueError, match="seed=2: its TCAV concepts differ"):
    compare.tcav_comparison([first, renamed])
  with pytest.raises(compare.MissingEvaluationError, match="experiments.tcav --workdir="):
    compare.tcav_comparison([first, str(tmp_path)])


# ------------------------------------------------------------------------------------------------
# Sweep.
# ------------------------------------------------------------------------------------------------


def test_dry_run_prints_one_line_per_grid_point(tmp_path):
  root = str(tmp_path / "sweep")
  result = run_module(["experiments.sweep", "--config=ar_sivae:smoke",
                       "--set=config.loss.gamma=0,0.05,0.1",
                       "--set=optimizer.learning_rate=1e-4,2e-4", "--seeds=0,1,2",
                       f"--root={root}", "--dry_run",
                       "--extra=--config.train.num_steps=100"], cwd=tmp_path, timeout=120)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert len(lines) == 3 * 2 * 3
  assert not os.path.exists(root)  # A dry run starts nothing and writes nothing.
  workdirs = set()
  for line in lines:
    train, evaluate = line.split(" && ")
    words = train.split()
    assert words[:4] == ["python", "-m", "experiments.train", "--config=ar_sivae:smoke"]
    workdir = words[4].removeprefix("--workdir=")
    assert evaluate == f"python -m experiments.evaluate --workdir={workdir}"
    assert words[-1] == "--config.train.num_steps=100"
    settings = dict(w.removeprefix("--config.").split("=") for w in words[5:8])
    assert set(settings) == {"seed", "loss.gamma", "optimizer.learning_rate"}
    assert os.path.basename(workdir) == (f"gamma={settings['loss.gamma']},learning_rate="
                                         f"{settings['optimizer.learning_rate']},"
                                         f"seed={settings['seed']}")
    assert os.path.dirname(workdir) == root
    workdirs.add(workdir)
  assert len(workdirs) == 18
  assert "--config.loss.gamma=0.05" in lines[6] and "--config.seed=0" in lines[6]


def test_grid_keeps_bracketed_values_whole():
  axis = sweep.parse_set("config.model.channels=(8,16),(16,32)")
  assert axis == sweep.SweepAxis("model.channels", ("(8,16)", "(16,32)"))
  jobs = sweep.make_jobs([axis, sweep.parse_set("loss.gamma=1")], [3], "r")
  assert [j.name for j in jobs] == ["channels=8-16,gamma=1,seed=3",
                                    "channels=16-32,gamma=1,seed=3"]
  assert jobs[1].overrides == ("--config.seed=3", "--config.model.channels=(16,32)",
                               "--config.loss.gamma=1")
  sweep.validate_sweep("vae:smoke", [axis], [])
  out = io.StringIO()
  sweep.run_sweep("vae:smoke", [axis], [0], "r", dry_run=True, out=out)
  assert "'--config.model.channels=(8,16)'" in out.getvalue()  # Quoted for the shell.


@pytest.mark.parametrize("args, named", [
    (["--set=config.loss.no_such_weight=1,2"], "config.loss.no_such_weight"),
    (["--set=config.model.zdim=2,4"], "nearest: model.latent_dim"),
    (["--set=config.nosection.gamma=1"], "nosection"),
    (["--set=config.loss=1"], "config.loss is a section"),
    (["--set=config.train.batch_size=4,large"], "batch_size=large"),
    (["--set=config.loss.gamma=1", "--extra=--config.train.num_stepz=3"], "num_stepz"),
    (["--set=config.seed=1,2"], "--seeds"),
    # A value of the right type that no run can use, in one grid point only.
    (["--set=config.train.batch_size=4,0"], "train.batch_size=0: must be an integer >= 1"),
    (["--set=config.loss.beta_kl=1", "--extra=--config.optimizer.learning_rate=-1"],
     "optimizer.learning_rate"),
])
def test_bad_settings_are_refused_before_any_job(tmp_path, args, named):
  root = tmp_path / "sweep"
  result = run_module(["experiments.sweep", "--config=vae:smoke", f"--root={root}", *args],
                      cwd=tmp_path, timeout=120)
  assert result.returncode != 0
  assert named in result.stderr
  assert not os.path.exists(root)


FAKE_TRAIN = textwrap.dedent("""
    import json, os, sys
    args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
    workdir, beta = args["--workdir"], args["--config.loss.beta_kl"]
    if beta == "3":
      print("Traceback: beta_kl=3 diverged")
      sys.exit(1)
    os.makedirs(workdir, exist_ok=True)
    json.dump({"name": "vae", "seed": int(args["--config.seed"]),
               "loss": {"beta_kl": float(beta)}, "train": {"num_steps": 2},
               "cache": os.environ.get("CARDIAC_JAX_CACHE")},
              open(os.path.join(workdir, "config.json"), "w"))
    last = 1 if beta == "4" else 2  # beta_kl=4 plays a preempted run.
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps({"step": last, "train/loss": 1.0}) + "\\n")
""")
FAKE_EVALUATE = textwrap.dedent("""
    import json, os, sys
    args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
    workdir = args["--workdir"]
    output = args.get("--output_dir", os.path.join(workdir, "eval"))
    beta = json.load(open(os.path.join(workdir, "config.json")))["loss"]["beta_kl"]
    best = args.get("--step") == "best"  # The best checkpoint plays one with half the error.
    os.makedirs(output, exist_ok=True)
    json.dump({"reconstruction": {"mse": 0.01 * beta * (0.5 if best else 1.0), "psnr": 20.0,
                                  "ssim": 0.5}},
              open(os.path.join(output, "metrics.json"), "w"))
""")


@pytest.fixture
def fake_jobs(monkeypatch):
  """Jobs that are small Python scripts instead of training: the sweep's bookkeeping alone."""
  monkeypatch.setattr(sweep, "train_command", lambda job, spec, extra, python="python": [
      sys.executable, "-c", FAKE_TRAIN, f"--workdir={job.workdir}", *job.overrides, *extra])
  real_evaluate_command = sweep.evaluate_command
  monkeypatch.setattr(sweep, "evaluate_command",
                      lambda job, python="python", selection="latest": [
                          sys.executable, "-c", FAKE_EVALUATE,
                          *real_evaluate_command(job, python, selection)[3:]])


def test_failed_job_is_reported_and_the_sweep_goes_on(fake_jobs, tmp_path):
  root = str(tmp_path / "sweep")
  out = io.StringIO()
  axes = [sweep.parse_set("config.loss.beta_kl=1,3,2")]
  results = sweep.run_sweep("vae:smoke", axes, [0], root, out=out)
  assert [r.status for r in results] == ["done", "failed", "done"]
  failed = results[1]
  assert failed.job.workdir == os.path.join(root, "beta_kl=3,seed=0")
  assert "beta_kl=3 diverged" in failed.message and "train exited with status 1" in failed.message
  report = out.getvalue()
  assert "FAILED" in report and "beta_kl=3 diverged" in report
  with open(os.path.join(failed.job.workdir, "sweep.log")) as f:
    assert "beta_kl=3 diverged" in f.read()
  with open(os.path.join(root, "beta_kl=1,seed=0", "config.json")) as f:
    assert json.load(f)["cache"] == os.environ["CARDIAC_JAX_CACHE"]  # Environment inherited.
  with open(os.path.join(root, "comparison.md")) as f:
    cells = table_cells(f.read())
  assert [c[0] for c in cells[1:]] == ["vae loss.beta_kl=1.0", "vae loss.beta_kl=2.0"]
  assert [c[2] for c in cells[1:]] == ["0.01000", "0.02000"]
  assert os.path.exists(os.path.join(root, "comparison.csv"))
  with open(os.path.join(root, "sweep.json")) as f:
    assert len(json.load(f)["jobs"]) == 3

  # A rerun skips the evaluated jobs and retries the failed one.
  again = sweep.run_sweep("vae:smoke", axes, [0], root, out=io.StringIO())
  assert [r.status for r in again] == ["skipped", "failed", "skipped"]


def test_jobs_are_evaluated_at_the_best_checkpoint_beside_the_final_one(fake_jobs, tmp_path):
  root = str(tmp_path / "sweep")
  axes = [sweep.parse_set("loss.beta_kl=1,2")]
  out = io.StringIO()
  sweep.run_sweep("vae:smoke", axes, [0], root, out=out)
  # The final evaluations exist; asking for the best ones too runs only those.
  results = sweep.run_sweep("vae:smoke", axes, [0], root, out=out,
                            eval_steps=["latest", "best"])
  assert [r.status for r in results] == ["done", "done"]
  job = results[0].job.workdir
  with open(os.path.join(job, "sweep.log")) as f:
    log = f.read()
  # First sweep: train, evaluate; second: train (resumes nothing), evaluate the best only.
  assert log.count("] $ ") == 4 and log.count("--step=") == 1
  assert f"--step=best --output_dir={os.path.join(job, 'eval_best')}" in log
  with open(os.path.join(root, "comparison_best.md")) as f:
    best = [line.split(" | ") for line in f.read().splitlines()[2:]]
  with open(os.path.join(root, "comparison.md")) as f:
    final = [line.split(" | ") for line in f.read().splitlines()[2:]]
  assert [c[2] for c in best] == ["0.00500", "0.01000"]
  assert [c[2] for c in final] == ["0.01000", "0.02000"]
  with open(os.path.join(root, "sweep.json")) as f:
    manifest = json.load(f)
  assert manifest["eval_steps"] == ["latest", "best"]
  assert "--step=best" in manifest["jobs"][0]["command"]
  with pytest.raises(sweep.SweepConfigError, match="'worst'"):
    sweep.run_sweep("vae:smoke", axes, [0], root, out=out, eval_steps=["worst"])
  with pytest.raises(compare.MissingEvaluationError, match="--step=250 --output_dir="):
    compare.load_run(job, "eval_250")


def test_preempted_job_stops_the_sweep_without_evaluating(fake_jobs, tmp_path):
  root = str(tmp_path / "sweep")
  results = sweep.run_sweep("vae:smoke", [sweep.parse_set("loss.beta_kl=4,1")], [0, 1], root,
                            out=io.StringIO())
  assert [r.status for r in results] == ["interrupted"]
  assert not os.path.exists(sweep.metrics_path(results[0].job.workdir))
  assert not os.path.exists(os.path.join(root, "beta_kl=1,seed=0"))


SLOW_TRAIN = textwrap.dedent("""
    import os, signal, sys, time
    workdir = [a for a in sys.argv if a.startswith("--workdir=")][0].split("=", 1)[1]
    os.makedirs(workdir, exist_ok=True)
    def checkpoint_and_stop(signum, frame):
      open(os.path.join(workdir, "stopped_by_signal"), "w").write(str(signum))
      sys.exit(0)  # As the training loop does after saving its checkpoint.
    signal.signal(signal.SIGTERM, checkpoint_and_stop)
    open(os.path.join(workdir, "ready"), "w").close()
    time.sleep(60)
""")


def test_signal_to_the_sweep_reaches_the_job_and_stops_the_sweep(monkeypatch, tmp_path):
  monkeypatch.setattr(sweep, "train_command", lambda job, spec, extra, python="python": [
      sys.executable, "-c", SLOW_TRAIN, f"--workdir={job.workdir}"])
  root = str(tmp_path / "sweep")
  first = os.path.join(root, "beta_kl=1,seed=0")

  def terminate_when_ready():
    deadline = time.monotonic() + 30
    while not os.path.exists(os.path.join(first, "ready")) and time.monotonic() < deadline:
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)

  handler_before = signal.getsignal(signal.SIGTERM)
  killer = threading.Thread(target=terminate_when_ready)
  killer.start()
  start = time.monotonic()
  results = sweep.run_sweep("vae:smoke", [sweep.parse_set("loss.beta_kl=1,2")], [0], root,
                            out=io.StringIO())
  killer.join()
  assert time.monotonic() - start < 30
  assert [r.status for r in results] == ["interrupted"]
  with open(os.path.join(first, "stopped_by_signal")) as f:
    assert f.read() == str(int(signal.SIGTERM))
  assert not os.path.exists(os.path.join(root, "beta_kl=2,seed=0"))
  assert signal.getsignal(signal.SIGTERM) == handler_before  # The sweep's handler is gone.


@pytest.mark.slow
def test_tiny_real_sweep_end_to_end(tmp_path, isolated_cache):
  """A real smoke job (train + evaluate as subprocesses) and its comparison; a rerun skips it.
  (Several grid points and seeds are covered by the fake-job tests above.)"""
  root = tmp_path / "sweep"
  args = ["experiments.sweep", "--config=vae:smoke", "--set=config.loss.beta_kl=2",
          "--seeds=0", f"--root={root}",
          "--extra=--config.train.num_steps=2 --config.train.figure_every=0 "
          "--config.train.eval_every=0"]
  result = run_module(args, cwd=tmp_path)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert os.listdir(os.path.join(isolated_cache, "synthetic"))  # The session's cache was used.
  with open(root / "comparison.md") as f:
    cells = table_cells(f.read())
  assert [c[0] for c in cells[1:]] == ["vae"]  # One run: no setting varies, none is named.
  for row in cells[1:]:
    mse, psnr, ssim = (float(v) for v in row[2:5])
    assert 0 < mse < 1 and psnr > 0 and -1 <= ssim <= 1
  with open(root / "beta_kl=2,seed=0" / "config.json") as f:
    config = json.load(f)
  assert config["loss"]["beta_kl"] == 2 and config["train"]["num_steps"] == 2
  rerun = run_module(args, cwd=tmp_path, timeout=120)
  assert rerun.returncode == 0 and rerun.stdout.count("skipped") == 1


def write_curves(workdir, dtype, records, prepare=None):
  """A run directory as training leaves it (only the files the curves read); `prepare`: its
  data.prepare section."""
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"name": "ar_sivae", "seed": 0, "model": {"compute_dtype": dtype},
               "data": {"prepare": prepare or {"image_size": 128}},
               "train": {"best_metric": "val/mse", "log_every": 25}}, f)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in records))
  return str(workdir)


def test_curves_of_runs_side_by_side_count_a_resumed_step_once(tmp_path):
  from PIL import Image
  from experiments import curves
  val = lambda step, mse: {"step": step, "val/mse": mse, "val/mse_ch0": mse}
  f32 = write_curves(tmp_path / "f32", "float32", [
      {"step": 25, "train/loss": 4.0}, {"step": 50, "train/loss": 3.0}, val(50, 0.5),
      {"step": 75, "train/loss": 2.0}, {"step": 100, "train/loss": 1.0}, val(100, 0.25)])
  # Resumed from step 25: step 50 is logged again (the rerun's 2.5 counts, not the 0.5 the
  # interrupted run logged); a non-finite loss is logged as the string "nan".
  bf16 = write_curves(tmp_path / "bf16", "bfloat16", [
      {"step": 25, "train/loss": 4.0}, {"step": 50, "train/loss": 0.5},
      {"step": 50, "train/loss": 2.5}, val(50, 0.6), {"step": 75, "train/loss": "nan"},
      {"step": 100, "train/loss": 1.5}, val(100, 0.3)],
      # Written after data.prepare.plausibility was added (f32's config predates it): at the
      # value that reproduces the older run, the field names neither run.
      prepare={"image_size": 128, "plausibility": []})
  output = str(tmp_path / "out" / "curves.md")
  markdown = curves.curves_comparison([f32, bf16], [], output)
  rows = {(r[0], r[1]): r[2:] for r in table_cells(markdown.split("\n\n", 1)[1])[1:]}
  assert rows[("ar_sivae model.compute_dtype=bfloat16", "train/loss")] == [
      "100", "1.5", "1.5", "1.5 (100)", "4 (25)"]
  assert rows[("ar_sivae model.compute_dtype=float32", "train/loss")] == [
      "100", "1", "1", "1 (100)", "4 (25)"]
  assert rows[("ar_sivae model.compute_dtype=bfloat16", "val/mse")] == [
      "100", "0.3", "0.3", "0.3 (100)", "0.6 (50)"]
  with open(compare.csv_path(output)) as f:
    points = [(r["run"], r["metric"], r["step"], r["value"]) for r in csv.DictReader(f)
              if r["run"].endswith("bfloat16") and r["metric"] == "train/loss"]
  assert [(p[2], p[3]) for p in points] == [("25", "4.0"), ("50", "2.5"), ("75", "nan"),
                                            ("100", "1.5")]
  with Image.open(curves.png_path(output)) as image:
    assert image.size[0] > 1.8 * image.size[1]  # Two panels side by side.

  with pytest.raises(ValueError) as error:
    curves.curves_comparison([f32, bf16], ["train/loss", "val/psnr"], output)
  message = str(error.value)
  assert f"run {f32} never logged val/psnr; it logged: train/loss, val/mse" in message
  assert "bf16" in message and "mse_ch0" not in message

  result = run_module(["experiments.compare", "--analysis=curves", f32, bf16,
                       "--metrics=val/mse", f"--output={tmp_path / 'cli.md'}"],
                      cwd=tmp_path, timeout=120)
  assert result.returncode == 0, result.stderr
  assert "cli.png" in result.stderr and os.path.getsize(tmp_path / "cli.png") > 5000
  misplaced = run_module(["experiments.compare", "--analysis=curves", "--group_by_config", f32,
                          bf16, f"--output={tmp_path / 'cli.md'}"], cwd=tmp_path, timeout=120)
  assert misplaced.returncode != 0
  assert "--group_by_config applies to --analysis=evaluation only" in misplaced.stderr
  with pytest.raises(ValueError, match="empty metric name"):
    curves.curves_comparison([f32, bf16], ["train/loss", ""], output)
  # A file named as a run: one line, not a traceback (the error class as curves raises it).
  (tmp_path / "afile").write_text("x")
  not_a_run = run_module(["experiments.compare", "--analysis=curves", str(tmp_path / "afile"),
                          f"{f32}/", f32, f"--output={tmp_path / 'cli.md'}"], cwd=tmp_path,
                         timeout=120)
  assert not_a_run.returncode != 0 and "Traceback" not in not_a_run.stderr
  assert f"error: the same run given more than once: {f32}, {f32}/" in not_a_run.stderr
  not_a_run = run_module(["experiments.compare", "--analysis=curves", str(tmp_path / "afile"),
                          f32, f"--output={tmp_path / 'cli.md'}"], cwd=tmp_path, timeout=120)
  assert not_a_run.returncode != 0 and "Traceback" not in not_a_run.stderr
  assert "afile has no" in not_a_run.stderr
  with open(os.path.join(bf16, "metrics.jsonl"), "a") as f:
    f.write("{oops\n{\"step\": 125}\n")
  damaged = run_module(["experiments.compare", "--analysis=curves", f32, bf16,
                        f"--output={tmp_path / 'cli.md'}"], cwd=tmp_path, timeout=120)
  assert damaged.returncode != 0
  assert "metrics.jsonl line 8 is damaged" in damaged.stderr and "bf16" in damaged.stderr
