"""experiments.benchmark's train-step measurement on a cine family (the slice families are
measured through the same function by the README's benchmark runs). The config is the one of
the shared smoke DiffAE run, so the compiled step comes from the session's compilation cache."""

from __future__ import annotations

import math

import jax
import numpy as np

from cardiac_jax.families import diffae3d as diffae3d_family
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
  assert len(result["jax_step_seconds"]) == 1
  # The model's parameters (what a PyTorch baseline's count is checked against), not the EMA.
  state = jax.eval_shape(diffae3d_family.DiffAEFamily(config).init_state, jax.random.key(0))
  assert result["jax_params"] == sum(
      math.prod(leaf.shape) for part in ("encoder", "unet")
      for leaf in jax.tree.leaves(state.params[part]))


def test_categories_of_compiled_instructions():
  from experiments import step_profile
  hlo = "\n".join([
      '  %convolution.3 = f32[16,64,64,32]{3,2,1,0} convolution(%a, %b), window={size=3x3}, '
      'metadata={op_name="jit(step)/jvp(decoder)/head/conv1/conv_general_dilated"}',
      '  %ynn_fusion.12 = f32[32,3,3,32]{3,2,1,0} fusion(%c, %d), kind=kCustom, '
      'metadata={op_name="jit(step)/transpose(jvp(decoder))/head/conv1/conv_general_dilated"}',
      '  %convolution.4 = f32[16,64,64,32]{3,2,1,0} convolution(%e, %f), '
      'metadata={op_name="jit(step)/transpose(jvp(decoder))/head/conv1/conv_general_dilated"}',
      '  ROOT %dot.2 = f32[16,256]{1,0} dot(%g, %h), '
      'metadata={op_name="jit(step)/jvp(encoder)/to_latent/dot_general"}',
      '  %multiply_add_fusion.7 = f32[16,64,64,32]{3,2,1,0} fusion(%i), kind=kLoop, '
      'metadata={op_name="jit(step)/jvp(decoder)/head/bn/add"}',
      '  %param.1 = f32[3]{0} parameter(0)',
  ])
  table = step_profile.instruction_table(hlo)
  assert set(table) == {"convolution.3", "ynn_fusion.12", "convolution.4", "dot.2",
                        "multiply_add_fusion.7"}
  assert table["ynn_fusion.12"][0] == (32, 3, 3, 32)
  categories = {n: step_profile.categorize(n, *table[n]) for n in table}
  assert categories == {"convolution.3": "conv forward", "ynn_fusion.12": "conv kernel gradient",
                        "convolution.4": "conv input gradient", "dot.2": "dot",
                        "multiply_add_fusion.7": "multiply_add_fusion"}
  summary = step_profile.summarize(
      [("convolution.3", 2.0), ("ynn_fusion.12", 6.0), ("ThunkExecutor::Execute", 99.0),
       ("multiply_add_fusion.7", 1.0), ("ynn_fusion.12", 1.0)], table, top=2)
  assert summary["total_ms"] == 10.0
  assert summary["categories"][0] == {"category": "conv kernel gradient", "ms": 7.0,
                                      "count": 2, "share": 0.7}
  assert [row["instruction"] for row in summary["slowest"]] == ["ynn_fusion.12", "convolution.3"]


def test_benchmark_cli_profiles_the_step(tmp_path):
  import json
  import subprocess
  import sys
  trace_dir = tmp_path / "trace"
  completed = subprocess.run(
      # A cine family: its batches carry subject ids, which the compiled step never sees.
      [sys.executable, "-m", "experiments.benchmark", "--config=temporal_classifier:smoke",
       "--steps=1", "--input_batches=0", "--peak_matmul_size=128", "--peak_repeats=1",
       f"--profile_dir={trace_dir}"], capture_output=True, text=True, timeout=600)
  assert completed.returncode == 0, completed.stderr[-3000:]
  result = json.loads(completed.stdout.strip().splitlines()[-1])
  profile = result["op_profile"]
  by_category = {row["category"]: row for row in profile["categories"]}
  for category in ("conv forward", "conv input gradient", "conv kernel gradient", "dot"):
    assert by_category[category]["ms"] > 0 and by_category[category]["count"] > 0, category
  assert abs(sum(row["share"] for row in profile["categories"]) - 1.0) < 0.01
  assert profile["wall_ms"] > 0
  assert list(trace_dir.glob("**/*.xplane.pb"))
