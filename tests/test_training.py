"""The training loop at toy size: resume equality, non-finite stop, workdir safety, preemption."""

from __future__ import annotations

import json
import os
import signal
import shutil
import threading

import jax
import ml_collections
import numpy as np
import pytest

from cardiac_jax import (checkpointing, config_checks, families, metric_logging, parallel,
                         run_config, training)
from cardiac_jax import workdir as workdir_lib
from data_pipelines import pipeline
from experiments.configs import get_config


def smoke_config(**train):
  config = get_config("vae:smoke")
  config.data.image_size = 16
  config.model.channels = (4, 8)
  config.train.figure_every = 0
  for k, v in train.items():
    config.train[k] = v
  return config


def data_source(config, examples):
  return training.DataSource(
      train_batches=lambda start: pipeline.train_batches(
          examples, config.data, global_batch_size=config.train.batch_size, seed=config.seed,
          start_step=start),
      eval_batches=lambda: pipeline.eval_batches(examples[:6], config.data,
                                                 batch_size=config.train.eval_batch_size))


def params_of(state):
  return jax.tree.map(np.asarray, jax.device_get(state.params))


def assert_trees_equal(a, b):
  flat_a, flat_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, disc_examples):
  config = smoke_config(num_steps=6, checkpoint_every=3, eval_every=3)
  workdir = str(tmp_path_factory.mktemp("full"))
  state = training.train_and_evaluate(config, workdir, data_source(config, disc_examples))
  return config, workdir, state


def test_run_writes_logs_checkpoints_and_config(uninterrupted):
  config, workdir, state = uninterrupted
  assert int(state.step) == 6
  records = metric_logging.read_metrics(workdir)
  train_steps = [r["step"] for r in records if "train/loss" in r]
  assert train_steps == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(r["train/loss"]) for r in records if "train/loss" in r)
  val = [r for r in records if "val/ssim" in r]
  assert [r["step"] for r in val] == [3, 6] and -1 <= val[-1]["val/ssim"] <= 1
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["channels"] == [4, 8]
  assert checkpointing.latest_step(os.path.join(workdir, "checkpoints")) == 6


def test_resume_gives_bitwise_identical_parameters(uninterrupted, tmp_path, disc_examples):
  config, _, full_state = uninterrupted
  workdir = str(tmp_path / "resumed")
  first = smoke_config(num_steps=3, checkpoint_every=3, eval_every=3)
  training.train_and_evaluate(first, workdir, data_source(first, disc_examples))
  # Same config except the step budget: allowed on resume.
  state = training.train_and_evaluate(config, workdir, data_source(config, disc_examples))
  assert int(state.step) == 6
  assert_trees_equal(params_of(state), params_of(full_state))
  assert_trees_equal(jax.device_get(state.batch_stats), jax.device_get(full_state.batch_stats))
  steps_logged = [r["step"] for r in metric_logging.read_metrics(workdir) if "train/loss" in r]
  assert steps_logged == [1, 2, 3, 4, 5, 6]


def test_workdir_of_another_config_is_refused(uninterrupted, disc_examples):
  config, workdir, _ = uninterrupted
  other = smoke_config(num_steps=6)
  other.model.latent_dim = 4
  with pytest.raises(run_config.WorkdirConflictError, match="model.latent_dim"):
    training.train_and_evaluate(other, workdir, data_source(other, disc_examples))


def test_checkpoint_of_another_model_is_refused_with_field_names(uninterrupted, tmp_path,
                                                                 disc_examples):
  _, workdir, _ = uninterrupted
  other = smoke_config()
  other.model.latent_dim = 4
  family = families.make_family(other)
  abstract = jax.eval_shape(family.init_state, jax.random.key(0))
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  with pytest.raises(checkpointing.CheckpointMismatchError, match="to_latent"):
    ckpt.restore(abstract)
  ckpt.close()


def _poisoned(source, at_index: int):
  """Wraps train_batches so that the batch at iterator position `at_index` holds a NaN pixel."""
  original = source.train_batches

  def train_batches(start):
    for i, batch in enumerate(original(start)):
      if i == at_index:
        batch = dict(batch, image=batch["image"].copy())
        batch["image"][0, 0, 0, 0] = np.nan
      yield batch

  source.train_batches = train_batches
  return source


def test_nonfinite_loss_stops_and_names_step_and_subjects(tmp_path, disc_examples):
  config = smoke_config(num_steps=6, checkpoint_every=1, eval_every=0)
  workdir = str(tmp_path / "nan")
  source = _poisoned(data_source(config, disc_examples), at_index=3)
  with pytest.raises(training.NonFiniteError, match=r"at step 4 in .*loss") as excinfo:
    training.train_and_evaluate(config, workdir, source)
  with open(os.path.join(workdir, "nonfinite_step0000004.json")) as f:
    report = json.load(f)
  expected_subjects = list(next(pipeline.train_batches(
      disc_examples, config.data, global_batch_size=4, seed=0, start_step=3))["subject"])
  assert report["subjects"] == expected_subjects
  assert "loss" in report["nonfinite_metrics"] and report["step"] == 4
  assert "nonfinite_step0000004.json" in str(excinfo.value)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ckpt.latest_step() == 3  # The last good state, not the poisoned one.
  restored = ckpt.restore(jax.eval_shape(families.make_family(config).init_state,
                                         jax.random.key(0)))
  ckpt.close()
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(restored.params)))


def test_nonfinite_step_read_one_step_late_is_still_named_and_never_saved(tmp_path,
                                                                          disc_examples):
  """Metrics are read one step late between logging, evaluation and checkpoint steps: a
  non-finite step 5 is found after step 6 was dispatched, and the error still names step 5
  and its subjects, and the last good checkpoint (4) is the latest one."""
  config = smoke_config(num_steps=8, checkpoint_every=4, eval_every=0, log_every=100)
  workdir = str(tmp_path / "late")
  source = _poisoned(data_source(config, disc_examples), at_index=4)
  with pytest.raises(training.NonFiniteError, match=r"at step 5 in .*loss"):
    training.train_and_evaluate(config, workdir, source)
  with open(os.path.join(workdir, "nonfinite_step0000005.json")) as f:
    report = json.load(f)
  assert report["subjects"] == list(next(pipeline.train_batches(
      disc_examples, config.data, global_batch_size=4, seed=0, start_step=4))["subject"])
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ckpt.all_steps() == [4]
  ckpt.close()


def test_skip_nonfinite_counts_and_keeps_parameters_finite(tmp_path, disc_examples):
  config = smoke_config(num_steps=5, eval_every=0, skip_nonfinite=True)
  workdir = str(tmp_path / "skip")
  source = _poisoned(data_source(config, disc_examples), at_index=2)
  state = training.train_and_evaluate(config, workdir, source)
  assert int(state.step) == 5 and int(state.skipped_nonfinite) == 1
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params_of(state)))
  last = metric_logging.read_metrics(workdir)[-1]
  assert last["train/skipped_nonfinite"] == 1


def test_sigterm_saves_checkpoint_and_rerun_resumes(tmp_path, disc_examples):
  config = smoke_config(num_steps=50, checkpoint_every=0, eval_every=0)
  workdir = str(tmp_path / "preempt")
  source = data_source(config, disc_examples)
  original = source.train_batches

  def batches_with_signal(start):
    for i, batch in enumerate(original(start)):
      if i == 2:
        threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGTERM)).start()
      yield batch

  source.train_batches = batches_with_signal
  with pytest.raises(training.Preempted, match="rerun the same command"):
    training.train_and_evaluate(config, workdir, source)
  saved = checkpointing.latest_step(os.path.join(workdir, "checkpoints"))
  assert saved is not None and 2 <= saved < 50
  config.train.num_steps = saved + 2
  state = training.train_and_evaluate(config, workdir, data_source(config, disc_examples))
  assert int(state.step) == saved + 2


@pytest.mark.parametrize("damage", ["flip_bytes_in_one_file", "delete_metadata_and_data"])
def test_damaged_latest_checkpoint_is_moved_aside_and_the_previous_one_restored(
    uninterrupted, tmp_path, disc_examples, damage):
  """A damaged step directory (a flipped byte in one data file, or parts missing) must not be
  restored: training continues from the last good step and ends where the uninterrupted run
  ended. Flipped bytes used to restore silently (the run then stopped as non-finite on every
  rerun); the step's checksum manifest catches them. Every other single-file damage:
  tests/test_hostile_training.py."""
  config, full_workdir, full_state = uninterrupted
  workdir = str(tmp_path / "damaged")
  shutil.copytree(full_workdir, workdir)
  step_dir = os.path.join(workdir, "checkpoints", "6")
  data_files = [os.path.join(root, name) for root, _, names in os.walk(step_dir)
                for name in names if os.sep + "d" + os.sep in os.path.join(root, name)]
  assert data_files
  if damage == "flip_bytes_in_one_file":
    path = max(data_files, key=os.path.getsize)
    with open(path, "r+b") as f:
      f.seek(os.path.getsize(path) // 2)
      byte = f.read(1)
      f.seek(-1, os.SEEK_CUR)
      f.write(bytes([byte[0] ^ 0xFF]))
  else:
    os.remove(os.path.join(step_dir, "_CHECKPOINT_METADATA"))
    shutil.rmtree(os.path.join(step_dir, "default"))
  state = training.train_and_evaluate(config, workdir, data_source(config, disc_examples))
  assert int(state.step) == 6
  assert_trees_equal(params_of(state), params_of(full_state))
  checkpoints = os.listdir(os.path.join(workdir, "checkpoints"))
  assert "6.corrupt-0" in checkpoints and "6" in checkpoints  # Kept aside, then rewritten.
  logged = [r["step"] for r in metric_logging.read_metrics(workdir) if "train/loss" in r]
  assert logged == [1, 2, 3, 4, 5, 6]


def test_interrupted_evaluation_resumes_from_its_finished_batches(uninterrupted, tmp_path,
                                                                  disc_examples):
  config, _, state = uninterrupted
  family = families.make_family(config)
  mesh = parallel.make_mesh(1)
  batches = lambda: pipeline.eval_batches(disc_examples[:10], config.data, batch_size=4)
  keep = ("mu", "subject")
  reference, ref_outputs = training.evaluate(family, state, batches(), mesh, keep=keep)

  def interrupted():
    for i, batch in enumerate(batches()):
      if i == 2:
        raise KeyboardInterrupt
      yield batch

  cache = str(tmp_path / "partial")
  with pytest.raises(KeyboardInterrupt):
    training.evaluate(family, state, interrupted(), mesh, keep=keep, cache_dir=cache)
  assert sorted(os.listdir(cache)) == ["batch_000000.npz", "batch_000001.npz"]
  calls = []
  compiled = jax.jit(family.eval_step)

  def counting_eval(s, batch):
    calls.append(1)
    return compiled(s, batch)

  metrics, outputs = training.evaluate(family, state, batches(), mesh, eval_fn=counting_eval,
                                       keep=keep, cache_dir=cache)
  assert len(calls) == 1  # Only the third (padded) batch was computed again.
  assert metrics.keys() == reference.keys()
  for k, v in reference.items():
    np.testing.assert_allclose(metrics[k], v, rtol=1e-6)
  assert list(outputs["subject"]) == list(ref_outputs["subject"]) and len(outputs["mu"]) == 10


def test_analysis_sections_may_change_when_a_run_resumes(tmp_path):
  """A run written before its config gained a `latent` section (read only by later analyses)
  resumes; a changed training field is still refused."""
  config = smoke_config()
  run_config.check_workdir_config(str(tmp_path), config)
  newer = smoke_config()
  with newer.unlocked():
    newer.latent = ml_collections.ConfigDict({"num_layers": 3})
  run_config.check_workdir_config(str(tmp_path), newer)       # Accepted, and recorded.
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["latent"] == {"num_layers": 3}
  newer.optimizer.learning_rate = 123.0
  with pytest.raises(run_config.WorkdirConflictError, match="optimizer.learning_rate"):
    run_config.check_workdir_config(str(tmp_path), newer)


def test_a_run_saved_before_an_added_field_resumes_at_its_old_value(tmp_path):
  """A diffae3d run written before diffusion.p2_gamma / p2_k existed trained with the plain eps
  loss: it resumes under p2_gamma = 0 and is refused under the P2 weighting."""
  config = get_config("diffae3d:smoke")
  config.diffusion.p2_gamma = 0.0
  saved = json.loads(config.to_json_best_effort())
  del saved["diffusion"]["p2_gamma"], saved["diffusion"]["p2_k"]
  with open(tmp_path / "config.json", "w") as f:
    json.dump(saved, f)
  run_config.check_workdir_config(str(tmp_path), config)
  with open(tmp_path / "config.json", "w") as f:
    json.dump(saved, f)
  config.diffusion.p2_gamma = 1.0
  with pytest.raises(run_config.WorkdirConflictError, match=r"diffusion\.p2_gamma: 0\.0 -> 1\.0"):
    run_config.check_workdir_config(str(tmp_path), config)


def test_a_run_saved_before_plausibility_bounds_were_configurable_resumes(tmp_path):
  """data.prepare.plausibility was added to the configs later: a run saved without it was
  prepared under the default bounds, so it resumes under () and is refused under others."""
  config = smoke_config()
  saved = json.loads(config.to_json_best_effort())
  del saved["data"]["prepare"]["plausibility"]
  with open(tmp_path / "config.json", "w") as f:
    json.dump(saved, f)
  run_config.check_workdir_config(str(tmp_path), config)
  with open(tmp_path / "config.json", "w") as f:
    json.dump(saved, f)
  config.data.prepare.plausibility = ("lv_ef=2:90",)
  with pytest.raises(run_config.WorkdirConflictError, match=r"data\.prepare\.plausibility"):
    run_config.check_workdir_config(str(tmp_path), config)


# ----------------------------------------------------------------------------- best checkpoint

def test_best_checkpoint_survives_rotation_and_resume(tmp_path, disc_examples, monkeypatch):
  """Validation improves until step 3 and then gets worse: with one latest checkpoint kept,
  step 3 is kept as `best` through the rotation, the final save and a resume (which must know
  the best so far: step 5 is worse than step 3, not a first evaluation), and `--step=best`
  restores exactly the parameters evaluated at step 3."""
  from experiments import common
  loss_at = {1: 5.0, 2: 4.0, 3: 3.0, 4: 3.5, 5: 6.0, 6: 3.2}
  evaluated_params = {}

  def scripted_evaluate(family, state, batches, mesh, eval_fn=None, **kwargs):
    step = int(state.step)
    evaluated_params[step] = params_of(state)
    return {"reconstruction_loss": loss_at[step], "kl": 0.0}, {}

  monkeypatch.setattr(training, "evaluate", scripted_evaluate)
  workdir = str(tmp_path / "best")
  first = smoke_config(num_steps=4, checkpoint_every=2, eval_every=1, max_checkpoints=1)
  training.train_and_evaluate(first, workdir, data_source(first, disc_examples))
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    assert ckpt.all_steps() == [3, 4]
  config = smoke_config(num_steps=6, checkpoint_every=2, eval_every=1, max_checkpoints=1)
  training.train_and_evaluate(config, workdir, data_source(config, disc_examples))
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    assert ckpt.all_steps() == [3, 6]
  with open(os.path.join(workdir, training.BEST_FILE)) as f:
    assert json.load(f) == {"metric": "val/reconstruction_loss", "mode": "min", "step": 3,
                            "value": 3.0}
  _, _, state, _ = common.restore_run(workdir, "best")
  assert int(state.step) == 3
  assert_trees_equal(params_of(state), evaluated_params[3])
  assert int(common.restore_run(workdir, "latest")[2].step) == 6


def test_step_choices_and_clear_errors_of_restore_run(uninterrupted, tmp_path, capsys):
  from experiments import common
  _, source, _ = uninterrupted
  assert [common.parse_step(v) for v in (None, "latest", "best", "6", 3)] == [None, None,
                                                                            "best", 6, 3]
  assert [common.step_selection(v) for v in (None, "best", "6")] == ["latest", "best",
                                                                      "explicit"]
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  with pytest.raises(ValueError, match=f"--step='final' for {workdir}: .*'best' or 'latest'"):
    common.restore_run(workdir, "final")
  with pytest.raises(FileNotFoundError, match=r"no checkpoint step 99 .*\[3, 6\]") as excinfo:
    common.restore_run(workdir, 99)
  # `evaluate --step=99` printed a traceback: commands print such errors as one line.
  common._report_user_errors(None)(excinfo.type, excinfo.value, None)  # pylint: disable=protected-access
  assert capsys.readouterr().err == (f"error: no checkpoint step 99 in {workdir}/checkpoints "
                                     "(steps kept: [3, 6])\n")
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    saved = json.load(f)
  for metric, message in (("", "keeps no best checkpoint"),
                          ("val/kl", "has no best checkpoint yet: no saved step carries an "
                                     "evaluation of val/kl")):
    saved["train"]["best_metric"] = metric
    with open(path, "w") as f:
      json.dump(saved, f)
    with pytest.raises(ValueError, match=f"{workdir} {message}"):
      common.restore_run(workdir, "best")


def test_best_metric_is_adopted_by_older_runs_and_may_not_change(tmp_path):
  """A run written before train.best_metric existed resumes and keeps a best from then on; a
  run written with one refuses another (its kept best was ranked by the first)."""
  config = smoke_config()
  saved = json.loads(config.to_json_best_effort())
  del saved["train"]["best_metric"], saved["train"]["best_mode"]
  with open(tmp_path / "config.json", "w") as f:
    json.dump(saved, f)
  run_config.check_workdir_config(str(tmp_path), config)
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["train"]["best_metric"] == "val/reconstruction_loss"
  config.train.best_metric = "val/ssim"
  with pytest.raises(run_config.WorkdirConflictError, match="train.best_metric"):
    run_config.check_workdir_config(str(tmp_path), config)
  config.train.best_metric = "ssim"
  with pytest.raises(ValueError, match="train.best_metric='ssim': must name a validation metric"):
    training.train_and_evaluate(config, str(tmp_path / "other"), None)


def test_analysis_commands_accept_step_best():
  from absl import flags
  from experiments import infer_latents, probe, reproducibility
  for module in (infer_latents, probe, reproducibility):
    values = flags.FlagValues()
    module.define_flags(values)
    values(["program", "--step=best"])
    assert values.step == "best"


# ----------------------------------------------------------------------------- bad input, damage

def _copy_of(workdir, tmp_path, name="run"):
  target = str(tmp_path / name)
  shutil.copytree(workdir, target)
  return target


def _steps_of(workdir):
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    return ckpt.all_steps()


@pytest.mark.parametrize("key, value", [("max_checkpoints", 0), ("num_steps", -5),
                                        ("log_every", 0), ("batch_size", 0)])
def test_bad_training_values_are_refused_before_anything_is_written(uninterrupted, tmp_path,
                                                                    key, value):
  """A zero checkpoint budget used to delete every checkpoint of a resumed run and end "Done";
  num_steps=-5 reported "Done", log_every=0 divided by zero after compiling, batch_size=0 left
  a config.json that refused the corrected config. Now each is one error naming the key, and a
  fresh or existing workdir is left as it was."""
  _, source, _ = uninterrupted
  workdir = _copy_of(source, tmp_path)
  before = sorted(os.listdir(workdir))
  config = smoke_config(num_steps=6, checkpoint_every=3, eval_every=3)
  config.train[key] = value
  for target in (workdir, str(tmp_path / "fresh")):
    with pytest.raises(config_checks.ConfigError, match=f"train.{key}={value}"):
      training.train_and_evaluate(config, target, None)
  assert sorted(os.listdir(workdir)) == before and _steps_of(workdir) == [3, 6]
  assert not os.path.exists(tmp_path / "fresh")


def test_a_workdir_without_checkpoints_takes_the_corrected_config(tmp_path):
  """A start that failed before its first checkpoint (e.g. batch_size=0 before values were
  checked) left a config.json that refused the corrected config forever; a workdir without
  checkpoints holds no run to protect, so the corrected config replaces it."""
  workdir = str(tmp_path / "run")
  failed = smoke_config()
  failed.train.batch_size = 0
  run_config.check_workdir_config(workdir, failed)  # What the failed start left behind.
  corrected = smoke_config()
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    run_config.check_workdir_config(workdir, corrected, ckpt)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["train"]["batch_size"] == 4


def test_negative_learning_rate_is_refused(tmp_path):
  config = smoke_config()
  config.optimizer.learning_rate = -2e-4
  with pytest.raises(config_checks.ConfigError, match=r"optimizer.learning_rate=-0.0002: must "
                                                       r"be > 0"):
    training.train_and_evaluate(config, str(tmp_path / "run"), None)
  assert not os.path.exists(tmp_path / "run")


def test_workdir_naming_a_file_is_refused(tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("mine")
  for workdir in (path, path / "run"):
    with pytest.raises(workdir_lib.WorkdirError, match="notes.txt"):
      training.train_and_evaluate(smoke_config(), str(workdir), None)
  assert path.read_text() == "mine"


def test_deleted_config_json_resumes_only_under_the_config_that_wrote_the_checkpoints(
    uninterrupted, tmp_path):
  """Without config.json another config used to resume the checkpoints under other losses. The
  checkpoints record their config: another one is refused naming the keys, the same one
  resumes and gets its config.json back."""
  config, source, full_state = uninterrupted
  workdir = _copy_of(source, tmp_path)
  os.remove(os.path.join(workdir, "config.json"))
  other = smoke_config(num_steps=6, checkpoint_every=3, eval_every=3)
  other.loss.beta_kl = 4.0
  with pytest.raises(run_config.WorkdirConflictError,
                     match=r"loss.beta_kl: 1.0 -> 4.0; from the config recorded with the "
                           r"checkpoints"):
    training.train_and_evaluate(other, workdir, None)
  assert not os.path.exists(os.path.join(workdir, "config.json"))
  state = training.train_and_evaluate(config, workdir, None)  # Nothing left to train.
  assert_trees_equal(params_of(state), params_of(full_state))
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f) == json.loads(config.to_json_best_effort())


def test_checkpoints_without_a_recorded_config_and_no_config_json_are_refused(uninterrupted,
                                                                               tmp_path):
  """Checkpoints written before configs were recorded with them: without config.json nothing
  says which config wrote them, so no config may resume them."""
  config, source, _ = uninterrupted
  workdir = _copy_of(source, tmp_path)
  os.remove(os.path.join(workdir, "config.json"))
  for step in ("3", "6"):
    path = os.path.join(workdir, "checkpoints", step, "_CHECKPOINT_METADATA")
    with open(path) as f:
      metadata = json.load(f)
    metadata.pop("custom_metadata", None)
    with open(path, "w") as f:
      json.dump(metadata, f)
    os.remove(os.path.join(workdir, "checkpoints", step, checkpointing.MANIFEST_FILE))
  with pytest.raises(run_config.WorkdirConflictError, match="no config.json, and the checkpoints "
                                                          "do not record"):
    training.train_and_evaluate(config, workdir, None)


def test_damaged_config_json_is_named_with_the_fix(uninterrupted, tmp_path):
  from experiments import common
  config, source, _ = uninterrupted
  workdir = _copy_of(source, tmp_path)
  path = os.path.join(workdir, "config.json")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(run_config.WorkdirConflictError,
                     match=f"{path} is damaged: not valid JSON .*delete it and rerun"):
    training.train_and_evaluate(config, workdir, None)
  with pytest.raises(config_checks.ConfigError, match=f"{path} is damaged"):
    common.load_run_config(workdir)
  os.remove(path)  # The fix: the config recorded with the checkpoints takes its place.
  training.train_and_evaluate(config, workdir, None)
  assert common.load_run_config(workdir).to_dict() == json.loads(config.to_json_best_effort())


def test_partial_last_metrics_line_is_dropped_and_a_missing_validation_line_recomputed(
    uninterrupted, tmp_path, disc_examples):
  """A run killed while writing metrics.jsonl left a partial last line that blocked every
  resume; a log that lost the validation line of the restored step keeps that gap. Now the
  partial line is dropped and the restored step is evaluated again."""
  config, source, _ = uninterrupted
  workdir = _copy_of(source, tmp_path)
  path = os.path.join(workdir, "metrics.jsonl")
  records = metric_logging.read_metrics(workdir)
  val6 = [r for r in records if r["step"] == 6 and "val/ssim" in r]
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records if r not in val6)
    f.write('{"step": 7, "train/lo')
  training.train_and_evaluate(config, workdir, data_source(config, disc_examples))
  again = metric_logging.read_metrics(workdir)
  assert again[:-1] == [r for r in records if r not in val6]
  assert again[-1].keys() == val6[0].keys()
  for k, v in val6[0].items():
    assert again[-1][k] == pytest.approx(v, rel=1e-5)
  with open(path, "a") as f:  # A damaged line elsewhere is named, with the fix.
    f.write("{not json}\n" + json.dumps(records[0]) + "\n")
  with pytest.raises(metric_logging.MetricsFileError,
                     match=f"{path} line {len(again) + 1} is damaged.*Delete that line"):
    training.train_and_evaluate(config, workdir, None)


def test_a_second_run_on_a_workdir_is_refused_naming_the_holder(uninterrupted, tmp_path):
  """Two trainings on one workdir used to run together, one dying inside orbax and both
  interleaving metrics.jsonl. A held lock refuses the second before it writes anything; the
  record a dead holder left behind is taken over."""
  import socket
  config, source, _ = uninterrupted
  workdir = _copy_of(source, tmp_path)
  before = {name: os.path.getmtime(os.path.join(workdir, name)) for name in os.listdir(workdir)
            if name != workdir_lib.LOCK_FILE}
  with workdir_lib.WorkdirLock(workdir):
    with pytest.raises(workdir_lib.WorkdirLockedError,
                       match=f"in use by process {os.getpid()} on {socket.gethostname()}"):
      training.train_and_evaluate(config, workdir, None)
  after = {name: os.path.getmtime(os.path.join(workdir, name)) for name in before}
  assert after == before
  with open(os.path.join(workdir, workdir_lib.LOCK_FILE), "w") as f:
    json.dump({"pid": 999999, "host": "gone", "started": 0}, f)  # No one holds it.
  lock = workdir_lib.WorkdirLock(workdir)
  with lock:
    assert lock.recovered["pid"] == 999999
  assert lock.read_holder() is None


def test_mismatch_describer_reports_real_mismatches_only(uninterrupted):
  """An intact checkpoint of the same model used to be described as mismatching ("rng:
  checkpoint shape (2,) != model shape ()"), so a damaged step was refused as another model's
  instead of being moved aside."""
  config, workdir, _ = uninterrupted
  abstract = jax.eval_shape(families.make_family(config).init_state, jax.random.key(0))
  other = smoke_config()
  other.model.latent_dim = 4
  other_abstract = jax.eval_shape(families.make_family(other).init_state, jax.random.key(0))
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    ckpt.restore(abstract, 6)  # What restore() reads after a failure: orbax's metadata.
    saved = ckpt._manager.item_metadata(6)  # pylint: disable=protected-access
  assert checkpointing._describe_mismatch(saved, abstract) == ""  # pylint: disable=protected-access
  assert "to_latent" in checkpointing._describe_mismatch(saved, other_abstract)  # pylint: disable=protected-access


# ----------------------------------------------------------------------------- damaged checkpoints
# Every file of the latest step of the trained run, damaged four ways: cut to nothing, cut in
# half, one bit flipped, deleted; and the whole step at once.
DAMAGE_KINDS = ("truncate_to_zero", "truncate_to_half", "flip_a_bit", "delete")


def _damage(path: str, kind: str, rng: np.random.Generator) -> None:
  size = os.path.getsize(path)
  if kind == "delete":
    os.remove(path)
  elif kind == "truncate_to_zero" or (kind == "truncate_to_half" and size < 2):
    os.truncate(path, 0)
  elif kind == "truncate_to_half":
    os.truncate(path, size // 2)
  else:
    with open(path, "r+b") as f:
      f.seek(int(rng.integers(size)))
      byte = f.read(1)[0]
      f.seek(-1, os.SEEK_CUR)
      f.write(bytes([byte ^ (1 << int(rng.integers(8)))]))


def _step_files(step_dir: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(root, name), step_dir)
                for root, _, names in os.walk(step_dir) for name in names)


@pytest.fixture(scope="module")
def continuation(uninterrupted, disc_examples):
  """(abstract state, finish): what a run resumed at step 3 computes, without the loop:
  finish(state) applies the loop's compiled step to the batches and keys of steps 4 to 6."""
  config, _, _ = uninterrupted
  mesh = parallel.make_mesh(config.parallel.num_devices)
  family = families.make_family(config)
  root = jax.random.key(config.seed)
  train_step = parallel.compile_train_step(
      lambda axis: families.make_family(config, axis_name=axis).train_step, mesh,
      config.parallel.backend)
  batches = data_source(config, disc_examples).train_batches(3)
  batches = [next(batches) for _ in range(3)]
  step_keys = jax.random.fold_in(root, 1)

  def finish(state):
    for i, batch in enumerate(batches):
      state, _ = train_step(state, batch, jax.random.fold_in(step_keys, 3 + i))
    return state

  return parallel.abstract_state(family.init_state, root, mesh), finish


def test_any_damage_to_any_file_of_a_step_fails_its_manifest(uninterrupted, tmp_path):
  """Each file of a saved step, damaged each way, is named by the step's checksum manifest;
  deleting the manifest alone leaves the intact step restorable as it is (below)."""
  _, workdir, _ = uninterrupted
  source = os.path.join(workdir, "checkpoints", "6")
  files = _step_files(source)
  assert checkpointing.MANIFEST_FILE in files and len(files) > 8
  rng = np.random.default_rng(0)
  cases = 0
  for name in files:
    for kind in DAMAGE_KINDS:
      step_dir = str(tmp_path / f"case{cases}")
      shutil.copytree(source, step_dir)
      _damage(os.path.join(step_dir, name), kind, rng)
      problem = checkpointing.manifest_problem(step_dir)
      if name == checkpointing.MANIFEST_FILE:
        assert (problem is None) == (kind == "delete"), (name, kind, problem)
      else:
        assert problem is not None and name in problem, (name, kind, problem)
      shutil.rmtree(step_dir)
      cases += 1
  assert cases == len(files) * len(DAMAGE_KINDS)


@pytest.mark.parametrize("seed", range(3))
def test_damaged_latest_step_restores_the_previous_one_with_the_same_final_result(
    uninterrupted, continuation, tmp_path, seed):
  """Random damage to one file or all files of the latest step (with or without its manifest:
  steps written before manifests existed) restores the previous step, moved aside and never
  misreported as another model's checkpoint, and continuing from it ends where the undisturbed
  run ended; a step whose damage touched nothing restored is restored as it is."""
  _, workdir, full_state = uninterrupted
  abstract, finish = continuation
  rng = np.random.default_rng(seed)
  files = _step_files(os.path.join(workdir, "checkpoints", "6"))
  data_files = [f for f in files if os.sep + "d" + os.sep in os.sep + f]
  cases = [([checkpointing.MANIFEST_FILE], "delete", True)]
  cases += [([str(rng.choice(files))], str(rng.choice(DAMAGE_KINDS)), True)]
  cases += [(files, str(rng.choice(DAMAGE_KINDS[:3])), True)]
  # Without a manifest (an older step): one data file cut short.
  cases += [([str(rng.choice(data_files))], "truncate_to_half", False)]
  for i, (names, kind, manifest) in enumerate(cases):
    directory = str(tmp_path / f"case{i}")
    shutil.copytree(os.path.join(workdir, "checkpoints"), directory)
    step_dir = os.path.join(directory, "6")
    if not manifest:
      os.remove(os.path.join(step_dir, checkpointing.MANIFEST_FILE))
    for name in names:
      if os.path.exists(os.path.join(step_dir, name)):
        _damage(os.path.join(step_dir, name), kind, rng)
    with checkpointing.Checkpointer(directory) as ckpt:
      state, step = ckpt.restore_latest(abstract)
    if step == 3:
      assert "6.corrupt-0" in os.listdir(directory), (names, kind)
      state = finish(state)
    else:  # Only a step without a (readable) manifest can be restored, and only if intact.
      assert step == 6 and (not manifest or names == [checkpointing.MANIFEST_FILE]), (names,
                                                                                      kind)
    for part in ("params", "batch_stats", "opt_state"):
      assert_trees_equal(jax.device_get(getattr(state, part)),
                         jax.device_get(getattr(full_state, part)))


EIGHT_DEVICE_EVAL = r"""
import numpy as np
import jax
from cardiac_jax import parallel, training
assert jax.device_count() == 8

class Family:  # The evaluation side of a model family, at no compile cost.
  eval_metric_keys, eval_keep_keys = ("total",), ("subject",)
  def eval_step(self, state, batch):
    return {"total": state * batch["image"].sum(axis=(1, 2, 3))}
  def finalize_eval(self, outputs):
    return {"count": float(len(outputs["subject"]))}

images = np.arange(7 * 2 * 2 * 1, dtype=np.float32).reshape(7, 2, 2, 1)
batches = [{"image": images[i:i + 4], "subject": np.array([f"s{j}" for j in range(i, i + 4)]),
            "mask": np.ones(4, bool)} for i in (0, 4)]
batches[1]["image"] = np.concatenate([images[4:], np.zeros((1, 2, 2, 1), np.float32)])
batches[1]["mask"][3] = False  # The split's 7 examples in eval batches of 4, as the pipeline pads.
metrics, outputs = training.evaluate(Family(), np.float32(2.0), batches, parallel.make_mesh(8))
expected = 2.0 * images.sum(axis=(1, 2, 3)).mean()
assert abs(metrics["total"] - expected) < 1e-4 and metrics["count"] == 7, metrics
assert list(outputs["subject"]) == [f"s{j}" for j in range(7)], outputs
print("EVAL OK")
"""


def test_eval_batch_smaller_than_the_device_count_is_padded():
  """On 8 devices with train.eval_batch_size 4 (the smoke value) a run trained, then died at its
  first evaluation with a raw IndivisibleError; evaluation batches are now padded to the device
  count with masked rows, which the metrics leave out."""
  import subprocess
  import sys
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", EIGHT_DEVICE_EVAL], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and "EVAL OK" in result.stdout, result.stderr[-3000:]
