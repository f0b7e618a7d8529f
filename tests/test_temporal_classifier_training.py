"""End to end: training.train_and_evaluate of temporal_classifier:smoke on in-memory cine batches."""

from __future__ import annotations

import json
import os

import numpy as np

from cardiac_jax import training
from tests.conftest import in_memory_source
from tests.test_temporal_classifier import tiny_config, toy_cine_batch


def test_smoke_config_trains_both_stages_and_evaluates(tmp_path):
  config = tiny_config(num_steps=4, stage1_steps=2, checkpoint_every=0, eval_every=4,
                       figure_every=4)
  b, t, s = config.train.batch_size, config.data.num_frames, config.data.image_size
  train = [toy_cine_batch(b, t, s, seed=k) for k in range(4)]
  evaluation = toy_cine_batch(6, t, s, seed=99)
  evaluation["group"][:2] = 0          # Both classes present: an AUC exists.
  evaluation["mask"] = np.array([True] * 5 + [False])

  data = in_memory_source(train, [evaluation])
  state = training.train_and_evaluate(config, str(tmp_path), data)
  assert int(state.step) == 4
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  train_lines = [l for l in lines if "train/loss" in l]
  assert [l["train/stage"] for l in train_lines] == [1.0, 1.0, 2.0, 2.0]
  val = [l for l in lines if "val/auc" in l][-1]
  for key in ("val/dice_ch0", "val/dice_ch1", "val/dice_ch2", "val/accuracy", "val/bce",
              "val/reconstruction_loss", "val/kl"):
    assert np.isfinite(val[key]), key
  assert 0.0 <= val["val/auc"] <= 1.0 and 0.0 <= val["val/dice"] <= 1.0
  assert os.path.exists(os.path.join(tmp_path, "figures", "reconstructions_0000004.png"))
