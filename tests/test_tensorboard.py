"""TensorBoard as the place to watch a run: the loop's figures as images at their steps, the
validation metrics under val/, the resolved config as text, and a sweep's HParams summaries;
all read back from the event files."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from cardiac_jax import metric_logging, training
from experiments import sweep
from tests.test_compare_sweep import fake_jobs  # pylint: disable=unused-import
from tests.test_training import data_source, smoke_config


def read_events(directory: str):
  """The event files of one TensorBoard run directory, every value kept."""
  from tensorboard.backend.event_processing import event_accumulator
  accumulator = event_accumulator.EventAccumulator(directory, size_guidance={
      event_accumulator.TENSORS: 0, event_accumulator.IMAGES: 0,
      event_accumulator.SCALARS: 0})
  accumulator.Reload()
  return accumulator


@pytest.fixture(scope="module")
def figure_run(tmp_path_factory, disc_examples):
  """A toy VAE run of 2 steps drawing figures and evaluating at every step."""
  config = smoke_config(num_steps=2, figure_every=1, eval_every=1, checkpoint_every=2)
  workdir = str(tmp_path_factory.mktemp("tensorboard_run"))
  training.train_and_evaluate(config, workdir, data_source(config, disc_examples))
  return config, workdir, read_events(os.path.join(workdir, "tensorboard"))


def test_every_figure_is_an_image_at_its_step_with_the_png_bytes(figure_run):
  _, workdir, events = figure_run
  tags = set(events.Tags()["tensors"])
  figures = sorted(os.listdir(os.path.join(workdir, "figures")))
  assert figures == ["reconstructions_0000001.png", "reconstructions_0000002.png",
                     "samples_0000001.png", "samples_0000002.png"]
  for name in ("reconstructions", "samples"):
    tag = training.FIGURE_TAG_PREFIX + name
    assert tag in tags, sorted(tags)
    logged = events.Tensors(tag)
    assert [e.step for e in logged] == [1, 2]
    for event in logged:
      width, height, png = event.tensor_proto.string_val
      with open(os.path.join(workdir, "figures", f"{name}_{event.step:07d}.png"), "rb") as f:
        assert png == f.read()
      image = np.asarray(Image.open(io.BytesIO(png)))
      assert image.shape[:2] == (int(height), int(width)) and image.shape[0] > 50
    metadata = events.SummaryMetadata(tag)
    assert metadata.plugin_data.plugin_name == "images"


def test_validation_metrics_have_their_own_prefix(figure_run):
  _, workdir, events = figure_run
  tags = set(events.Tags()["tensors"])
  assert "val/ssim" in tags and "train/loss" in tags
  assert [e.step for e in events.Tensors("val/ssim")] == [1, 2]
  assert not any(t.startswith("val/") for t in tags if t.startswith("train/"))
  assert {r["step"] for r in metric_logging.read_metrics(workdir) if "val/ssim" in r} == {1, 2}


def test_the_resolved_config_is_logged_once_as_markdown_json(figure_run):
  config, workdir, events = figure_run
  logged = events.Tensors(training.CONFIG_TAG)
  assert [e.step for e in logged] == [0]
  text = logged[0].tensor_proto.string_val[0].decode()
  assert text.startswith("```json\n") and text.endswith("\n```")
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.loads(text[len("```json\n"):-len("\n```")]) == json.load(f)
  assert events.SummaryMetadata(training.CONFIG_TAG).plugin_data.plugin_name == "text"
  assert config.train.num_steps == 2


def test_png_size_reads_the_header_and_refuses_other_bytes():
  buffer = io.BytesIO()
  Image.fromarray(np.zeros((7, 13, 3), np.uint8)).save(buffer, format="PNG")
  assert metric_logging.png_size(buffer.getvalue()) == (13, 7)
  with pytest.raises(ValueError, match="not a PNG"):
    metric_logging.png_size(b"GIF89a" + bytes(30))


def test_sweep_writes_hparams_of_the_grid_and_of_each_run(fake_jobs, tmp_path):
  from tensorboard.plugins.hparams import metadata as hparams_metadata
  root = str(tmp_path / "sweep")
  axes = [sweep.parse_set("loss.beta_kl=1,2")]
  results = sweep.run_sweep("vae:smoke", axes, [0], root, out=io.StringIO())
  assert [r.status for r in results] == ["done", "done"]

  experiment_content = read_events(root).PluginTagToContent("hparams")[
      hparams_metadata.EXPERIMENT_TAG]
  experiment = hparams_metadata.parse_experiment_plugin_data(experiment_content)
  domains = {h.name: [v.number_value for v in h.domain_discrete.values]
             for h in experiment.hparam_infos}
  assert domains == {"loss.beta_kl": [1.0, 2.0], "seed": [0.0]}
  assert [m.name.tag for m in experiment.metric_infos] == ["train/loss"]

  for job, beta in zip(sweep.make_jobs(axes, [0], root), (1.0, 2.0)):
    run = read_events(os.path.join(job.workdir, metric_logging.TENSORBOARD_DIR))
    info = hparams_metadata.parse_session_start_info_plugin_data(
        run.PluginTagToContent("hparams")[hparams_metadata.SESSION_START_INFO_TAG])
    assert info.group_name == job.name
    assert {k: v.number_value for k, v in info.hparams.items()} == {"loss.beta_kl": beta,
                                                                    "seed": 0.0}

  # A rerun replaces the summaries instead of adding a second experiment.
  sweep.run_sweep("vae:smoke", axes, [0], root, out=io.StringIO())
  assert len([f for f in os.listdir(root) if f.startswith("events.out.tfevents")]) == 1


def test_hparam_values_keep_numbers_and_booleans():
  assert metric_logging.hparam_value("0.05") == 0.05
  assert metric_logging.hparam_value("True") is True
  assert metric_logging.hparam_value("(8,16)") == "(8,16)"
  assert metric_logging.hparam_value("nan") == "nan"
