"""experiments.benchmark's train-step measurement on the cine families (the slice families are
measured through the same function by the README's benchmark runs). The configs are the small
ones other tests train, so the compiled steps come from the session's compilation cache."""

from __future__ import annotations

import numpy as np
import pytest

from experiments import benchmark
from tests.conftest import diffae_smoke_config
from tests.test_temporal_classifier import tiny_config


@pytest.mark.parametrize("make_config", [tiny_config, lambda: diffae_smoke_config("unused")],
                         ids=["temporal_classifier", "diffae3d"])
def test_cine_family_step_is_measured(make_config):
  config = make_config()
  batch = benchmark.synthetic_batch(config, 2)
  t, s = config.data.num_frames, config.data.image_size
  assert batch["sa_label"].shape == (2, t, s, s, 3) and batch["la_image"].shape == (2, t, s, s, 1)
  assert batch["sa_label"].max() <= 3 and np.abs(batch["la_image"]).max() <= 1
  result = benchmark.benchmark_train_step(config, num_steps=1)
  assert result["flops_per_step"] > 0 and result["steps_per_sec"] > 0
  assert result["jax_params"] > 0 and len(result["jax_step_seconds"]) == 1
