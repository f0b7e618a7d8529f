"""experiments.step_memory: the compiled step's memory analysis and the per-device batch fit."""

from __future__ import annotations

import pytest

from experiments import step_memory
from experiments.configs import get_config


def test_fit_recovers_fixed_and_per_sample_memory_and_the_batch_per_capacity():
  fit = step_memory.fit_batch_memory([1, 2, 9], [600.0, 1100.0, 4600.0], [4.0, 16.0], 0.9)
  assert fit["fixed_mb"] == pytest.approx(100.0)
  assert fit["per_sample_mb"] == pytest.approx(500.0)
  assert fit["max_fit_error_mb"] == pytest.approx(0.0, abs=1e-6)
  # floor((0.9 * 4 * 1024 - 100) / 500) = 7, floor((0.9 * 16 * 1024 - 100) / 500) = 29.
  assert fit["max_batch_per_device"] == {"4": 7, "16": 29}
  with pytest.raises(ValueError, match="two different batch sizes"):
    step_memory.fit_batch_memory([2, 2], [1.0, 1.0], [16.0], 0.9)


def test_step_memory_of_a_toy_diffae_step():
  config = get_config("diffae3d:smoke")
  config.data.num_frames, config.data.image_size = 2, 8
  config.model.update(channel_mult=(1,), encoder_channel_mult=(1,), attention_resolutions=(),
                      encoder_attention_resolutions=(), conv_impl="xla")
  result = step_memory.step_memory(config, 2)
  assert result["temp_mb"] > 0 and result["argument_mb"] > 0
  assert result["step_buffers_mb"] == pytest.approx(
      result["argument_mb"] + result["output_mb"] + result["temp_mb"] - result["alias_mb"])
  # The donated state is aliased to the new state: most of the arguments.
  assert result["alias_mb"] > 0.5 * result["argument_mb"]


def test_batch_size_flag_errors_name_the_flag():
  with pytest.raises(ValueError, match="--batch_sizes"):
    step_memory._positive_ints(["1", "x"], "batch_sizes")
  with pytest.raises(ValueError, match="--batch_sizes"):
    step_memory._positive_ints(["0"], "batch_sizes")
