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

from cardiac_jax import checkpointing, metric_logging, parallel, steps, training
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
  with pytest.raises(training.WorkdirConflictError, match="model.latent_dim"):
    training.train_and_evaluate(other, workdir, data_source(other, disc_examples))


def test_checkpoint_of_another_model_is_refused_with_field_names(uninterrupted, tmp_path,
                                                                 disc_examples):
  _, workdir, _ = uninterrupted
  other = smoke_config()
  other.model.latent_dim = 4
  family = steps.make_family(other)
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
  restored = ckpt.restore(jax.eval_shape(steps.make_family(config).init_state,
                                         jax.random.key(0)))
  ckpt.close()
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(restored.params)))


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


@pytest.mark.parametrize("damage", ["truncate_data", "delete_metadata_and_data"])
def test_damaged_latest_checkpoint_is_moved_aside_and_the_previous_one_restored(
    uninterrupted, tmp_path, disc_examples, damage):
  """A half-written step directory (files cut short, or parts missing) must not be restored:
  training continues from the last good step and ends where the uninterrupted run ended."""
  config, full_workdir, full_state = uninterrupted
  workdir = str(tmp_path / "damaged")
  shutil.copytree(full_workdir, workdir)
  step_dir = os.path.join(workdir, "checkpoints", "6")
  data_files = [os.path.join(root, name) for root, _, names in os.walk(step_dir)
                for name in names if os.sep + "d" + os.sep in os.path.join(root, name)]
  assert data_files
  if damage == "truncate_data":
    for path in data_files:
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
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
  family = steps.make_family(config)
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
  training.check_workdir_config(str(tmp_path), config)
  newer = smoke_config()
  with newer.unlocked():
    newer.latent = ml_collections.ConfigDict({"num_layers": 3})
  training.check_workdir_config(str(tmp_path), newer)       # Accepted, and recorded.
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["latent"] == {"num_layers": 3}
  newer.optimizer.learning_rate = 123.0
  with pytest.raises(training.WorkdirConflictError, match="optimizer.learning_rate"):
    training.check_workdir_config(str(tmp_path), newer)


def test_a_run_saved_before_an_added_field_resumes_at_its_old_value(tmp_path):
  """A diffae3d run written before diffusion.p2_gamma / p2_k existed trained with the plain eps
  loss: it resumes under p2_gamma = 0 and is refused under the P2 weighting."""
  config = get_config("diffae3d:smoke")
  config.diffusion.p2_gamma = 0.0
  saved = json.loads(config.to_json_best_effort())
  del saved["diffusion"]["p2_gamma"], saved["diffusion"]["p2_k"]
  with open(tmp_path / "config.json", "w") as f:
    json.dump(saved, f)
  training.check_workdir_config(str(tmp_path), config)
  with open(tmp_path / "config.json", "w") as f:
    json.dump(saved, f)
  config.diffusion.p2_gamma = 1.0
  with pytest.raises(training.WorkdirConflictError, match=r"diffusion\.p2_gamma: 0\.0 -> 1\.0"):
    training.check_workdir_config(str(tmp_path), config)


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


def test_step_choices_and_clear_errors_of_restore_run(uninterrupted, tmp_path):
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
  with pytest.raises(FileNotFoundError, match=r"no checkpoint step 5 .*\[3, 6\]"):
    common.restore_run(workdir, 5)
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
  training.check_workdir_config(str(tmp_path), config)
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["train"]["best_metric"] == "val/reconstruction_loss"
  config.train.best_metric = "val/ssim"
  with pytest.raises(training.WorkdirConflictError, match="train.best_metric"):
    training.check_workdir_config(str(tmp_path), config)
  config.train.best_metric = "ssim"
  with pytest.raises(ValueError, match="train.best_metric must name a validation metric"):
    training.train_and_evaluate(config, str(tmp_path / "other"), None)


def test_analysis_commands_accept_step_best():
  from absl import flags
  from experiments import infer_latents, probe, reproducibility
  for module in (infer_latents, probe, reproducibility):
    values = flags.FlagValues()
    module.define_flags(values)
    values(["program", "--step=best"])
    assert values.step == "best"
