"""Hostile inputs of the run commands (train on resume, evaluate and the analyses' restore,
infer_latents, sweep local / --slurm / --aggregate, benchmark, check_lowering, step_memory,
compare): hand-edited or hand-made workdir entries, out-of-range seeds, caches and outputs that
name files, flags that every job or the end of a measurement would trip on. Each case ends in
one line naming the input before any work, and leaves what it read as it was, so the corrected
rerun proceeds.

Nothing here trains or compiles: the checks run before a model is built (the two command
lines stop at their first check). Permission cases (a read-only parent) are not covered: the
suite may run as root, which writes anywhere.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from absl import flags

from cardiac_jax import checkpointing, config_checks, training
from cardiac_jax import workdir as workdir_lib
from data_pipelines import cache
from data_pipelines.errors import InvalidArgumentError
from experiments import benchmark, check_lowering, common, infer_latents, sweep, sweep_slurm
from experiments.configs import get_config
from tests.test_sweep_slurm import fake_python, run_task  # pylint: disable=unused-import

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, cwd, env=None):
  env = dict(os.environ, **(env or {}))
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=300)


def _one_line_error(result, message: str) -> None:
  assert result.returncode != 0, result.stdout[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert message in result.stderr, result.stderr[-3000:]


def _listing(path) -> dict:
  """{relative path: bytes or None for a folder} of everything under `path`."""
  found = {}
  for folder, dirs, files in os.walk(path):
    for name in dirs:
      found[os.path.relpath(os.path.join(folder, name), path)] = None
    for name in files:
      with open(os.path.join(folder, name), "rb") as f:
        found[os.path.relpath(os.path.join(folder, name), path)] = f.read()
  return found


def _untrained_run(path, **changes) -> str:
  """A run directory holding only the config.json of vae:smoke (with dotted `changes`), as a
  training stopped before its first checkpoint leaves it."""
  config = json.loads(get_config("vae:smoke").to_json_best_effort())
  for key, value in changes.items():
    *sections, leaf = key.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[leaf] = value
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f)
  return str(path)


# ----------------------------------------------------------------------------- run readers

@pytest.mark.parametrize("step", [None, "best", 3])
def test_reading_a_run_without_checkpoints_creates_nothing_and_says_train_first(tmp_path, step):
  """evaluate (and every analysis) on a run with no checkpoint used to create an empty
  checkpoints/ in the run it only reads, and said "no checkpoint in .../checkpoints"."""
  workdir = _untrained_run(tmp_path / "run")
  before = _listing(workdir)
  with pytest.raises(FileNotFoundError, match=f"{workdir} has no checkpoint yet: train it "
                                              r"first \(python -m experiments.train"):
    common.restore_run(workdir, step)
  assert _listing(workdir) == before
  os.mkdir(os.path.join(workdir, "checkpoints"))  # Left empty by a training that stopped.
  with pytest.raises(FileNotFoundError, match="has no checkpoint yet: train it first"):
    common.restore_run(workdir, step)
  assert os.listdir(os.path.join(workdir, "checkpoints")) == []


def test_latest_step_of_a_missing_folder_creates_nothing(tmp_path):
  assert checkpointing.latest_step(str(tmp_path / "run" / "checkpoints")) is None
  assert not os.path.exists(tmp_path / "run")


def test_a_file_in_place_of_the_checkpoints_folder_is_named(tmp_path):
  """Training used to run its first steps and then die inside orbax (a raw NotADirectoryError,
  and the process hung); a reader said there was no checkpoint."""
  (tmp_path / "checkpoints").write_text("notes")
  for create in (True, False):
    with pytest.raises(NotADirectoryError, match="checkpoints is a file, not the run's "
                                                 "checkpoints folder: move it away"):
      checkpointing.Checkpointer(str(tmp_path / "checkpoints"), create=create)
  assert isinstance(NotADirectoryError(), common.USER_ERRORS)


def test_an_output_holding_another_runs_latents_is_one_line(tmp_path, capsys):
  """infer_latents refused an output or partial store of another run with a FileExistsError
  that no command printed as one line: a traceback for a message that names the fix."""
  from cardiac_jax import latent_store
  store = tmp_path / "latents.csv.partial"
  store.mkdir()
  with pytest.raises(latent_store.LatentStoreConflictError, match="not a partial store"):
    latent_store.open_store(str(store), {"kind": latent_store.STORE_KIND})
  (tmp_path / "file").write_text("x")
  with pytest.raises(latent_store.LatentStoreConflictError, match="is not a directory"):
    latent_store.open_store(str(tmp_path / "file"), {})
  assert issubclass(latent_store.LatentStoreConflictError, common.USER_ERRORS)


def test_a_run_config_edited_to_an_invalid_value_is_named_before_the_model_is_built(tmp_path):
  """model.latent_dim=-3 in config.json ended in a JAX traceback from the initializer."""
  workdir = _untrained_run(tmp_path / "run", **{"model.latent_dim": -3})
  with pytest.raises(config_checks.ConfigError,
                     match=r"config.json holds a value no run can have: .*model.latent_dim=-3"):
    common.load_run_config(workdir)
  workdir = _untrained_run(tmp_path / "run2", **{"train.batch_size": "four"})
  with pytest.raises(config_checks.ConfigError, match="train.batch_size"):
    common.load_run_config(workdir)
  common.load_run_config(_untrained_run(tmp_path / "good"))  # The unedited file passes.


def test_a_folder_named_config_json_and_a_workdir_that_is_a_file_are_named(tmp_path):
  (tmp_path / "run" / "config.json").mkdir(parents=True)
  with pytest.raises(config_checks.ConfigError, match="config.json is not a file"):
    common.load_run_config(str(tmp_path / "run"))
  (tmp_path / "afile").write_text("x")
  with pytest.raises(workdir_lib.WorkdirError, match="afile is a file, not a run directory"):
    common.load_run_config(str(tmp_path / "afile"))


# ----------------------------------------------------------------------------- training

@pytest.mark.parametrize("name,make", [
    ("metrics.jsonl", os.mkdir), ("config.json", os.mkdir), ("best_checkpoint.json", os.mkdir),
    (".lock", os.mkdir),
    ("checkpoints", lambda p: open(p, "w").close()),
    ("figures", lambda p: open(p, "w").close()),
    ("tensorboard", lambda p: open(p, "w").close()),
])
def test_a_workdir_entry_of_the_wrong_kind_is_refused_before_the_run_starts(tmp_path, name,
                                                                              make):
  """A folder named metrics.jsonl or config.json ended in a raw IsADirectoryError after the data
  were prepared (metrics.jsonl: after the resume had emptied nothing yet only by luck); a file
  named checkpoints was found by orbax after the first steps, with metrics.jsonl truncated."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "metrics.jsonl.kept").write_text('{"step": 1}\n')
  make(str(workdir / name))
  before = _listing(workdir)
  with pytest.raises(workdir_lib.WorkdirError, match=f"{name} is not a (file|folder): a run "
                                                     f"keeps its {name} there; move it away"):
    training.check_workdir_entries(str(workdir))
  config = get_config("vae:smoke")
  with pytest.raises(workdir_lib.WorkdirError, match=f"{name} is not a"):
    training.train_and_evaluate(config, str(workdir), data=None)
  assert _listing(workdir) == before


def test_seeds_beyond_the_32_bit_keys_are_refused():
  """jax.random.key takes the seed modulo 2**32: --config.seed=4294967296 trained seed 0's run
  again and reported it as another seed."""
  config = get_config("vae:smoke")
  for seed in (2**32, 2**40, -1):
    with config.unlocked():
      config.seed = seed
    with pytest.raises(config_checks.ConfigError, match=f"seed={seed}: must be an integer"):
      config_checks.validate(config)
  with config.unlocked():
    config.seed = config_checks.MAX_SEED
  config_checks.validate(config)


def test_a_data_cache_that_is_a_file_is_named_with_its_source(tmp_path, monkeypatch):
  """CARDIAC_JAX_CACHE naming a file ended in "[Errno 20] Not a directory: .../synthetic"."""
  a_file = tmp_path / "cache"
  a_file.write_text("x")
  config = get_config("vae:smoke")
  monkeypatch.setenv(cache.CACHE_ENV, str(a_file))
  with pytest.raises(InvalidArgumentError, match=r"\$CARDIAC_JAX_CACHE=.*cache is a file, not a "
                                                 "folder: the data cache must be a folder"):
    common.make_data_source(config)
  with config.unlocked():
    config.data.cache_dir = str(a_file / "sub")
  with pytest.raises(InvalidArgumentError, match="data.cache_dir=.*sub lies under .*cache, "
                                                 "which is a file"):
    common.make_data_source(config)
  assert a_file.read_text() == "x"


# ----------------------------------------------------------------------------- sweep

@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_sweep_seeds_a_run_cannot_take_are_refused_before_any_job(seed):
  """--seeds=-1 was printed (and run) as jobs that all failed at their config check."""
  with pytest.raises(sweep.SweepConfigError, match=f"--seeds: {seed} must be an integer in"):
    sweep.parse_seeds(["0", seed])


def test_sweep_root_naming_a_file_is_refused(tmp_path):
  a_file = tmp_path / "notes"
  a_file.write_text("x")
  for root in (a_file, a_file / "sub"):
    with pytest.raises(sweep.SweepConfigError, match="--root=.*notes"):
      sweep.run_sweep("vae:smoke", [], [0], str(root), dry_run=True)
    with pytest.raises(sweep.SweepConfigError, match="--root=.*notes"):
      sweep_slurm.write_slurm_sweep("vae:smoke", [], [0], str(root),
                                    str(tmp_path / "array.sh"))
  assert not (tmp_path / "array.sh").exists()


def test_aggregate_of_a_missing_root_is_refused_and_creates_nothing(tmp_path):
  """A mistyped --root was created, with TensorBoard files, and reported "0 of 1 jobs"."""
  root = tmp_path / "sweeps" / "typo"
  with pytest.raises(sweep.SweepConfigError, match="--root=.*typo does not exist"):
    sweep_slurm.aggregate_sweep("vae:smoke", [], [0], str(root))
  assert not (tmp_path / "sweeps").exists()


def test_slurm_script_path_naming_a_folder_or_under_a_file_is_refused_first(tmp_path):
  (tmp_path / "afile").write_text("x")
  for path, message in ((tmp_path, "is a folder: name a file"),
                        (tmp_path / "afile" / "array.sh", "lies under .*afile, which is a file")):
    with pytest.raises(InvalidArgumentError, match=f"--slurm=.*{message}"):
      sweep_slurm.write_slurm_sweep("vae:smoke", [], [0], str(tmp_path / "root"), str(path))
  assert not (tmp_path / "root").exists()  # Refused before the sweep's folders were made.


@pytest.mark.parametrize("settings,message", [
    (dict(gpus=-1), "--slurm_gpus=-1: must be >= 0"),
    (dict(cpus=0), "--slurm_cpus=0: must be >= 1"),
    (dict(max_running=-2), "--slurm_max_running=-2"),
    (dict(time="1 day"), "--slurm_time='1 day': not a SLURM time limit"),
    (dict(time="24h"), "not a SLURM time limit"),
    (dict(time="4:00"), "--slurm_time=4:00: a task is told to checkpoint and requeue 300 s"),
    (dict(partition="gpu\n#SBATCH --mem=1"), "--slurm_partition="),
])
def test_slurm_settings_sbatch_would_refuse_are_refused_when_given(settings, message):
  """Each was written into the array script and reported as success; sbatch refused it later
  (or, for a time limit under the requeue signal's lead, every task requeued itself before
  training, forever)."""
  with pytest.raises(sweep.SweepConfigError, match=message):
    sweep_slurm.SlurmSettings(**settings)


def test_slurm_time_limits_in_every_sbatch_format_are_read():
  assert [sweep_slurm.time_limit_seconds(t) for t in
          ("10", "10:30", "24:00:00", "2-0", "2-03:04", "2-03:04:05")] == [
              600, 630, 86400, 172800, 183840, 183845]
  sweep_slurm.SlurmSettings(time="1-0")


# ----------------------------------------------------------------------------- infer_latents

def test_infer_latents_arguments_are_refused_before_the_run_is_read(tmp_path):
  """--splits=bogus ended in a ValueError traceback after the restore, --batch_size=0 fell
  back to the run's batch silently, an --output under a file or naming a folder ended in a raw
  OSError (or asked for --overwrite of the folder). The workdir does not exist: reaching it
  would raise FileNotFoundError."""
  nowhere = str(tmp_path / "nowhere")
  (tmp_path / "afile").write_text("x")
  cases = [
      (dict(splits=["train", "tset"]), "--splits: unknown split 'tset'"),
      (dict(batch_size=0), "--batch_size=0: must be >= 1"),
      (dict(output=str(tmp_path / "afile" / "z.csv")), "--output=.* lies under .*afile"),
      (dict(output=str(tmp_path)), "--output=.* is a folder: name a file"),
      (dict(num_processes=2, process_id=0, merge_timeout_s=-1.0), "--merge_timeout=-1.0"),
  ]
  for kwargs, message in cases:
    with pytest.raises(InvalidArgumentError, match=message):
      infer_latents.run(nowhere, **kwargs)
  flag_values = flags.FlagValues()
  infer_latents.define_flags(flag_values)
  with pytest.raises(flags.IllegalFlagValueError):
    flag_values(["infer_latents", "--batch_size=0"])


def test_infer_latents_process_slot_out_of_range_is_one_line(tmp_path):
  result = _run(["experiments.infer_latents", "--workdir=nowhere", "--num_processes=2",
                 "--process_id=5"], tmp_path)
  _one_line_error(result, "error: --num_processes/--process_id: process_id=5 is outside")


# ----------------------------------------------------------------------------- benchmark, lowering

@pytest.mark.parametrize("name,value", [("peak_matmul_size", "0"), ("peak_repeats", "0"),
                                        ("input_batches", "-1"), ("torch_threads", "-2")])
def test_benchmark_counts_are_bounded_when_parsed(name, value):
  """--peak_matmul_size=0 measured a peak of 0 FLOP/s and ended in a ZeroDivisionError after
  the whole benchmark."""
  assert benchmark  # The module defines the flags.
  with pytest.raises(flags.IllegalFlagValueError):
    flags.FLAGS[name].parse(value)


def test_benchmark_profile_dir_naming_a_file_is_refused_before_measuring(tmp_path):
  """It ended in a raw JaxRuntimeError after the timed steps."""
  (tmp_path / "afile").write_text("x")
  result = _run(["experiments.benchmark", "--config=vae:smoke", "--steps=1",
                 "--profile_dir=afile"], tmp_path)
  _one_line_error(result, "error: --profile_dir=afile is a file, not a folder")
  assert "steps_per_sec" not in result.stdout


def test_lowering_platforms_are_checked():
  """jax.export lowers for any platform name: --platforms=gpux reported every program "ok"."""
  from absl import app
  assert check_lowering.check_platforms([" cuda", "tpu "]) == ["cuda", "tpu"]
  for values, message in ((["gpux"], "unknown gpux"), (["cuda", "cuda"], "twice"),
                          (["", " "], "empty")):
    with pytest.raises(app.UsageError, match=message):
      check_lowering.check_platforms(values)


@pytest.mark.parametrize("command,override,message", [
    ("experiments.check_lowering", "--config.model.latent_dim=0",
     "error: config model.latent_dim=0: must be an integer >= 1"),
    ("experiments.benchmark", "--config.train.batch_size=0",
     "error: config train.batch_size=0: must be an integer >= 1"),
])
def test_benchmark_and_lowering_check_their_config_as_training_does(tmp_path, command, override,
                                                                    message):
  """Both ended in a ZeroDivisionError traceback from inside the model or JAX."""
  result = _run([command, "--config=vae:smoke", override, "--steps=1"
                 if command.endswith("benchmark") else "--platforms=cuda"], tmp_path)
  _one_line_error(result, message)


def test_infer_latents_refuses_a_prepared_slice_dataset_as_data_dir(tmp_path):
  """It was restored and planned, then failed with a ValueError traceback from the batch
  reader."""
  slices = tmp_path / "slices"
  slices.mkdir()
  (slices / "splits.json").write_text('{"train": ["patient001"]}')
  (slices / "report.json").write_text(json.dumps({"config": {
      "format_version": 2, "dataset": "acdc", "preprocess": {"image_size": 64}}}))
  with pytest.raises(InvalidArgumentError, match="--data_dir=.*slices is a prepared slice "
                                                 "dataset, not a prepared cine dataset"):
    infer_latents.run(str(tmp_path / "nowhere"), data_dir=str(slices))
  cine = tmp_path / "cine"
  cine.mkdir()
  (cine / "splits.json").write_text('{"train": ["patient001"]}')
  (cine / "report.json").write_text(json.dumps({"config": {"format": "cine", "cine": {}}}))
  with pytest.raises(FileNotFoundError, match="nowhere"):  # Accepted: the run is read next.
    infer_latents.run(str(tmp_path / "nowhere"), data_dir=str(cine))


def test_resuming_under_a_config_json_edited_to_an_invalid_value_names_the_edit(tmp_path):
  """It said "holds a run with a different config (model.latent_dim: -3 -> 8) ... or the same
  config to resume", which no run can follow; the fix is to delete the file."""
  import numpy as np
  workdir = _untrained_run(tmp_path / "run", **{"model.latent_dim": -3})
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")) as checkpointer:
    checkpointer.save(2, {"step": np.int32(2)})  # The run's checkpoint (its content unread).
  before = _listing(workdir)
  with pytest.raises(config_checks.ConfigError,
                     match=r"config.json holds a value no run can have \(.*model.latent_dim=-3"
                           r".*\): it was edited. Delete it and rerun"):
    training.train_and_evaluate(get_config("vae:smoke"), workdir, data=None)
  before.pop(".lock", None)
  after = _listing(workdir)
  after.pop(".lock", None)
  assert after == before


def test_a_damaged_evaluation_of_a_sweep_job_counts_as_missing(tmp_path):
  """A metrics.json cut short counted as evaluated: the sweep skipped the job and its
  comparison (and --aggregate) failed with a traceback on every rerun."""
  root = tmp_path / "sweep"
  job = sweep.make_jobs([], [0], str(root))[0]
  os.makedirs(os.path.join(job.workdir, "eval"))
  with open(sweep.metrics_path(job.workdir), "w") as f:
    f.write('{"split": "te')
  assert not sweep.is_evaluated(job.workdir)
  with open(sweep.metrics_path(job.workdir), "w") as f:
    f.write("[]")
  assert not sweep.is_evaluated(job.workdir)
  out = io.StringIO()
  assert sweep_slurm.aggregate_sweep("vae:smoke", [], [0], str(root), out=out) == [job]
  assert "0 of 1 jobs evaluated" in out.getvalue()
  with open(sweep.metrics_path(job.workdir), "w") as f:
    f.write("{}")
  assert sweep.is_evaluated(job.workdir)


def test_a_sweep_job_workdir_that_is_a_file_is_refused_before_any_job(tmp_path):
  root = tmp_path / "sweep"
  root.mkdir()
  (root / "seed=1").write_text("x")
  with pytest.raises(sweep.SweepConfigError, match="job seed=1: --workdir=.*seed=1 is a file"):
    sweep.run_sweep("vae:smoke", [], [0, 1], str(root))
  with pytest.raises(sweep.SweepConfigError, match="job seed=1"):
    sweep_slurm.write_slurm_sweep("vae:smoke", [], [0, 1], str(root), str(tmp_path / "a.sh"))
  assert sorted(os.listdir(root)) == ["seed=1"]


# ----------------------------------------------------------------------------- later leftovers

def test_step_memory_checks_its_config_where_every_config_command_starts(tmp_path):
  """model.latent_dim=0 ended in a ZeroDivisionError traceback: the check now runs in
  configs.run_config_command, the start of every command whose --config names a config."""
  result = _run(["experiments.step_memory", "--config=vae:smoke", "--config.model.latent_dim=0",
                 "--batch_sizes=1"], tmp_path)
  _one_line_error(result, "error: config model.latent_dim=0: must be an integer >= 1")
  assert "step_buffers_mb" not in result.stdout


def test_the_workdir_check_names_a_config_json_edited_to_an_invalid_value(tmp_path):
  """run_config.check_workdir_config itself (every caller, not only training) said "or the same
  config to resume", which no run can do; the fix is to delete the file."""
  from cardiac_jax import run_config
  workdir = _untrained_run(tmp_path / "run", **{"model.latent_dim": -3})
  before = _listing(workdir)
  with pytest.raises(config_checks.ConfigError,
                     match=r"config.json holds a value no run can have \(.*model.latent_dim=-3"
                           r".*\): it was edited. Delete it and rerun") as raised:
    run_config.check_workdir_config(workdir, get_config("vae:smoke"))
  assert "the same config to resume" not in str(raised.value)
  assert _listing(workdir) == before


@pytest.mark.parametrize("blank", ["   ", "\t "])
def test_a_workdir_of_only_spaces_is_refused(tmp_path, monkeypatch, blank):
  """It was taken as a folder named with spaces in the working directory."""
  monkeypatch.chdir(tmp_path)
  with pytest.raises(workdir_lib.WorkdirError, match="is blank: name a run directory"):
    workdir_lib.check_path(blank)
  with pytest.raises(workdir_lib.WorkdirError, match="--root=.* is blank: name a folder"):
    workdir_lib.check_path(blank, "root", "folder")
  with pytest.raises(workdir_lib.WorkdirError, match="is blank"):
    training.train_and_evaluate(get_config("vae:smoke"), blank, data=None)
  assert not os.listdir(tmp_path)


def test_a_latents_output_that_is_a_folder_or_under_a_file_is_one_line(tmp_path):
  """Under a file: a raw FileExistsError from makedirs; a folder: "pass --overwrite", which
  could not help. Both passes (one process, and one process's share) check the path before the
  run or the data are touched, so no run is needed here."""
  from cardiac_jax import latent_store, phenotypes
  (tmp_path / "afile").write_text("x")
  (tmp_path / "folder").mkdir()
  for output, message in ((tmp_path / "folder", "folder is a folder: name a file"),
                          (tmp_path / "afile" / "z.csv",
                           "z.csv lies under .*afile, which is a file")):
    with pytest.raises(phenotypes.LatentsFileError, match=message):
      latent_store.write_latents(None, None, str(output), make_batches=None, overwrite=True)
    with pytest.raises(phenotypes.LatentsFileError, match=message):
      latent_store.write_latents_part(None, None, str(output), process_id=0, num_processes=2,
                                      make_batches=None)
  assert sorted(os.listdir(tmp_path)) == ["afile", "folder"]
  assert not os.listdir(tmp_path / "folder")


@pytest.mark.parametrize("content", [b'{"reconstruction": {"mse": 0.', b"\xff\xfe{}"])
def test_compare_of_a_damaged_metrics_json_is_one_line_naming_it(tmp_path, content):
  """Bytes that are not UTF-8 were reported as "'utf-8' codec can't decode ...", without the
  file; a file cut short is named with the fix."""
  (tmp_path / "run" / "eval").mkdir(parents=True)
  (tmp_path / "run" / "eval" / "metrics.json").write_bytes(content)
  result = _run(["experiments.compare", "run", "--output=table.md"], tmp_path)
  _one_line_error(result, f"error: {os.path.join('run', 'eval', 'metrics.json')} is not valid "
                          "JSON (")
  assert "rerun the job that writes it" in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert not (tmp_path / "table.md").exists()


def test_a_slurm_task_evaluates_again_where_a_metrics_json_is_damaged(fake_python, tmp_path):
  """The array's script took any existing metrics.json as evaluated (`[ -e ]`): a file cut
  short was skipped on every attempt and the aggregation failed. Now the rule of the local
  sweep (a JSON object), both when the task starts and per evaluation after training."""
  _, env = fake_python
  root = str(tmp_path / "sweep")
  path = str(tmp_path / "array.sh")
  axes = [sweep.parse_set("loss.beta_kl=1")]
  sweep_slurm.write_slurm_sweep("vae:smoke", axes, [0], root, path,
                                eval_steps=["latest", "best"], out=io.StringIO())
  workdir = os.path.join(root, "beta_kl=1,seed=0")
  os.makedirs(os.path.join(workdir, "eval"))
  os.makedirs(os.path.join(workdir, "eval_best"))
  with open(sweep.metrics_path(workdir), "w") as f:
    f.write('{"kept": 1}')  # A valid evaluation: not run again.
  with open(sweep.metrics_path(workdir, "best"), "w") as f:
    f.write('{"reconstruction": {"mse": 0.')
  done = run_task(path, 0, env=env)
  assert done.returncode == 0, done.stdout + done.stderr
  assert "already evaluated" not in done.stdout and "task 0 done" in done.stdout
  with open(sweep.metrics_path(workdir)) as f:
    assert json.load(f) == {"kept": 1}
  assert sweep.is_evaluated(workdir, "best")
  again = run_task(path, 0, env=env)
  assert again.returncode == 0 and "already evaluated" in again.stdout
