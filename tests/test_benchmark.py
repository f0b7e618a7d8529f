"""experiments.benchmark's train-step measurement on a cine family (the slice families are
measured through the same function by the README's benchmark runs). The config is the one of
the shared smoke DiffAE run, so the compiled step comes from the session's compilation cache."""

from __future__ import annotations

import numpy as np

from experiments import benchmark
from tests.conftest import diffae_smoke_config


def test_cine_family_step_is_measured():
  # The DiffAE config of the shared smoke run (the temporal classifier reads the same batch
  # layout; its step is timed by the README's benchmark runs).
  config = diffae_smoke_config("unused")
  batch = benchmark.synthetic_batch(config, 2)
  t, s = config.data.num_frames, config.data.image_size
  assert batch["sa_label"].shape == (2, t, s, s, 3) and batch["la_image"].shape == (2, t, s, s, 1)
  assert batch["sa_label"].max() <= 3 and np.abs(batch["la_image"]).max() <= 1
  result = benchmark.benchmark_train_step(config, num_steps=1)
  assert result["flops_per_step"] > 0 and result["steps_per_sec"] > 0
  assert result["jax_params"] > 0 and len(result["jax_step_seconds"]) == 1
