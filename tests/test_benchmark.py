"""experiments.benchmark's train-step measurement on the smoke configs of the cine families
(the slice families are measured through the same function by the README's benchmark runs)."""

from __future__ import annotations

import numpy as np
import pytest

from experiments import benchmark
from experiments.configs import diffae3d, temporal_classifier


@pytest.mark.parametrize("module", [temporal_classifier, diffae3d], ids=lambda m: m.__name__)
def test_cine_family_step_is_measured(module):
  config = module.get_config("smoke")
  batch = benchmark.synthetic_batch(config, 2)
  t, s = config.data.num_frames, config.data.image_size
  assert batch["sa_label"].shape == (2, t, s, s, 3) and batch["la_image"].shape == (2, t, s, s, 1)
  assert batch["sa_label"].max() <= 3 and np.abs(batch["la_image"]).max() <= 1
  result = benchmark.benchmark_train_step(config, num_steps=1)
  assert result["flops_per_step"] > 0 and result["steps_per_sec"] > 0
  assert result["jax_params"] > 0 and len(result["jax_step_seconds"]) == 1
