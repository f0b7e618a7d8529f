"""Hostile command lines of the analysis commands: every mistake ends in one line naming the flag
or file (an error of `experiments.common.USER_ERRORS`, or absl's flag error) before any work,
never a traceback after minutes of work, and never a result written from a wrong value. Also:
every command's --help starts with what it does and an example.

The library calls below fail on their arguments before a run is restored or a latent computed;
the few command lines run in a subprocess stop at flag parsing or at the first check.
"""

from __future__ import annotations

import ast
import glob
import os
import subprocess
import sys

import pytest

from cardiac_jax import config_checks
from cardiac_jax import workdir as workdir_lib
from data_pipelines import cache, plausibility
from data_pipelines.cine import config as cine_config
from data_pipelines.errors import InvalidArgumentError
from experiments import associate, common, compare, directions, manipulate, probe
from experiments import reproducibility, sample
from experiments.configs import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command_modules() -> dict[str, str]:
  """{module name: docstring} of every module run as a command (`app.run` or
  `run_config_command` in it)."""
  modules = {}
  for path in sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py"))
                     + glob.glob(os.path.join(ROOT, "data_pipelines", "*.py"))):
    with open(path, encoding="utf-8") as f:
      source = f.read()
    if "app.run(" in source or "configs.run_config_command(" in source:
      name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
      modules[name] = ast.get_docstring(ast.parse(source)) or ""
  return modules


def _run(args, cwd):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=300)


def test_every_command_describes_itself_with_an_example():
  """absl's --help prints the __main__ module's docstring: each command's must say what the
  command does (a first line) and show how it is run (`python -m <module>`)."""
  modules = _command_modules()
  assert {"experiments.evaluate", "experiments.tcav", "experiments.sample", "experiments.probe",
          "experiments.associate", "experiments.manipulate", "experiments.directions",
          "experiments.reproducibility", "experiments.compare", "experiments.sweep",
          "experiments.benchmark", "experiments.infer_latents", "experiments.train",
          "data_pipelines.prepare", "data_pipelines.synthesize"} <= set(modules)
  for name, doc in modules.items():
    lines = doc.splitlines()
    assert lines and len(lines[0].split()) >= 4, (name, lines[:1])
    assert f"python -m {name}" in doc, f"{name}: no example `python -m {name} ...`"


@pytest.mark.parametrize("command,shared", [
    ("experiments.evaluate", ("--workdir", "--step", "--output_dir", "--split")),
    ("experiments.tcav", ("--workdir", "--step", "--seed", "--explain_split")),
    ("experiments.infer_latents", ("--workdir", "--step", "--splits")),
])
def test_help_prints_the_description_and_the_shared_flags(tmp_path, command, shared):
  """--help lists the main module's flags only: those defined by experiments.common's helpers
  (--workdir, --step, ...) were missing until the commands adopted them."""
  result = _run([command, "--help"], tmp_path)  # absl exits with 1 after the help.
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  first = _command_modules()[command].splitlines()[0]
  assert first in result.stdout
  for flag in shared:
    assert flag in result.stdout, flag


@pytest.mark.parametrize("args,message", [
    (["--traversal_range=-1"], "--traversal_range must be a finite number > 0"),
    (["--traversal_steps=0"], "flag --traversal_steps=0"),
    (["--output_dir=AFILE"], "--output_dir=AFILE is a file, not a folder"),
])
def test_evaluate_refuses_bad_flags_in_one_line_before_restoring(tmp_path, args, message):
  """Before: a negative range drew a reversed traversal reported as success, 0 steps failed
  with a traceback after the whole evaluation, a file as --output_dir after the restore."""
  (tmp_path / "AFILE").write_text("x")
  result = _run(["experiments.evaluate", "--workdir=nowhere", *args], tmp_path)
  assert result.returncode != 0
  assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert not os.path.exists(tmp_path / "nowhere")


def test_output_folder_flags_naming_a_file_are_refused(tmp_path):
  a_file = tmp_path / "notes.txt"
  a_file.write_text("x")
  with pytest.raises(workdir_lib.WorkdirError, match="--output_dir=.* is a file, not a folder"):
    workdir_lib.check_output_dir(str(a_file))
  with pytest.raises(workdir_lib.WorkdirError, match="--latent_dir=.* lies under .*notes.txt"):
    workdir_lib.check_output_dir(str(a_file / "sub"), "latent_dir")
  workdir_lib.check_output_dir(str(tmp_path / "new" / "folder"))
  workdir_lib.check_output_dir(None)
  with pytest.raises(workdir_lib.WorkdirError, match="--workdir=.* is a file, not a run "
                                                     "directory"):
    workdir_lib.check_path(str(a_file))


def _user_error(call, match: str):
  """The error of `call`: one of the commands' one-line errors, matching `match`."""
  with pytest.raises(common.USER_ERRORS, match=match) as error:
    call()
  return error.value


def test_analysis_arguments_are_refused_before_the_run_is_read(tmp_path):
  """Each of these used to end in a ValueError traceback (some after the latents were
  computed); the workdir does not exist, so reaching it would raise FileNotFoundError."""
  nowhere = str(tmp_path / "nowhere")
  cases = [
      (lambda: associate.associate(nowhere, splits=["train", "tset"]), "--splits: unknown"),
      (lambda: associate.associate(nowhere, splits=[]), "--splits is empty"),
      (lambda: associate.associate(nowhere, alpha=1.5), "--alpha must be in"),
      (lambda: associate.associate(nowhere, binary_traits=["group"]), "column:value"),
      (lambda: probe.run(nowhere, traits=[]), "--traits is empty"),
      (lambda: probe.run(nowhere, train_split="test"), "two different splits"),
      (lambda: reproducibility.run([nowhere, nowhere], threshold=1.5), "--threshold"),
      (lambda: reproducibility.run([nowhere, nowhere], splits=["tst"]), "unknown splits"),
      (lambda: reproducibility.run([nowhere]), "at least 2 runs"),
      (lambda: manipulate.manipulate(nowhere, steps=[]), "--steps needs"),
      (lambda: manipulate.manipulate(nowhere, steps=[float("nan")]), "finite"),
      (lambda: manipulate.manipulate(nowhere, blood_threshold=1.5), "--blood_threshold"),
      (lambda: manipulate.manipulate(nowhere, trait="lv_ef", kind="logistic"), "continuous"),
      (lambda: sample.run(nowhere, 0), "--num must be >= 1"),
      (lambda: directions.Settings(num_shifts=2), "num_shifts >= 3"),
      (lambda: directions.Settings(shift_range=float("inf")), "shift_range"),
  ]
  for call, match in cases:
    assert isinstance(_user_error(call, match), InvalidArgumentError), match


def test_reproducibility_checks_every_run_before_encoding_any(tmp_path):
  """A missing second run used to be found after the first run's latents were computed (and
  the log said it was encoding the missing one)."""
  logged = []
  _user_error(lambda: reproducibility.run([str(tmp_path / "a"), str(tmp_path / "b")],
                                          log=logged.append), "not a training run directory")
  assert not logged


def test_compare_names_a_missing_run_directory(tmp_path):
  with pytest.raises(compare.MissingEvaluationError, match="does not exist"):
    compare.load_run(str(tmp_path / "typo"))
  (tmp_path / "afile").write_text("x")
  with pytest.raises(compare.MissingEvaluationError, match="is a file"):
    compare.load_run(str(tmp_path / "afile"))


def test_plausibility_bounds_of_a_training_config_are_checked_and_name_the_cache():
  """data.prepare.plausibility: the prepare flag's entries in a config; checked with the
  config, and only bounds other than the defaults change where the data is cached."""
  config = get_config("vae:smoke")
  default_key = cache.preparation_key(config.data.prepare)
  assert default_key == "s64_sp2.6_mid_acdc_split0"  # Cached datasets keep their names.
  with config.unlocked():
    config.data.prepare.plausibility = ("lv_ef=1:95",)
  config_checks.validate(config)
  wider = cache.preparation_key(config.data.prepare)
  assert wider.startswith(default_key) and wider != default_key
  assert plausibility.bounds_of(config.data.prepare).lv_ef == (1.0, 95.0)
  with config.unlocked():
    config.data.prepare.plausibility = ("lv_ef=2:90",)  # The default, written out.
  assert cache.preparation_key(config.data.prepare) == default_key
  for bad, message in ((("lv_ef=abc",), "not name=low:high"), (("nope=1:2",), "unknown bound"),
                       (("lv_ef=95:1",), "low < high"), ((3,), "tuple of 'name=low:high'")):
    with config.unlocked():
      config.data.prepare.plausibility = bad
    with pytest.raises(config_checks.ConfigError,
                       match=f"data.prepare.plausibility=.*{message}"):
      config_checks.validate(config)


def test_plausibility_bounds_reach_the_cine_preparation():
  data = get_config("diffae3d:smoke").data
  default = cine_config.cine_config_from(data)
  assert default.bounds == plausibility.PlausibilityBounds()
  with data.unlocked():
    data.prepare.plausibility = ("rv_ef=1:95",)
  assert cine_config.cine_config_from(data).bounds.rv_ef == (1.0, 95.0)


def test_partial_batches_of_another_checkpoint_are_never_resumed(tmp_path):
  """The partial folders of an interrupted evaluation are named by split and step only: a
  second run evaluated into the same --output_dir at the same step, or the run trained again
  to that step, read the first one's batches back and reported their metrics. They are now
  kept only for the run, checkpoint and split that wrote them."""
  from cardiac_jax import checkpointing
  from experiments import evaluate
  out = tmp_path / "eval"
  step = tmp_path / "run" / "checkpoints" / "3"
  step.mkdir(parents=True)
  (step / "_CHECKPOINT_METADATA").write_text('{"init_timestamp_nsecs": 1}')
  owner = {"workdir": str(tmp_path / "run"), "step": 3, "split": "test",
           "checkpoint": checkpointing.step_identity(str(step))}
  partial = out / "partial_test_step3"
  partial.mkdir(parents=True)
  (partial / "batch_000000.npz").write_bytes(b"rows of an unknown model")
  assert evaluate.clear_stale_partials(str(out), owner) == ["partial_test_step3"]
  assert not partial.exists()
  partial.mkdir()  # The interrupted evaluation of this checkpoint: resumed.
  assert evaluate.clear_stale_partials(str(out), owner) == [] and partial.exists()
  (step / "_CHECKPOINT_METADATA").write_text('{"init_timestamp_nsecs": 2}')  # Trained again.
  retrained = {**owner, "checkpoint": checkpointing.step_identity(str(step))}
  assert retrained != owner
  assert evaluate.clear_stale_partials(str(out), retrained) == ["partial_test_step3"]
  partial.mkdir()
  other_run = {**retrained, "workdir": str(tmp_path / "other")}
  assert evaluate.clear_stale_partials(str(out), other_run) == ["partial_test_step3"]
