"""The PyTorch baseline of the benchmark: same model size as the JAX model, wired to the config.

PyTorch is not a project dependency. The tests that run the baseline need an interpreter with
PyTorch: this one if it imports torch, else the one named by $CARDIAC_JAX_TORCH_PYTHON (e.g.
/work/torch-venv/bin/python); without either they are skipped (as in CI). The command-line
wiring and the message without PyTorch are checked everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from cardiac_jax.models import vae as vae_lib
from experiments import benchmark
from experiments.configs import get_config


def _torch_python() -> str | None:
  if importlib.util.find_spec("torch") is not None:
    return sys.executable
  candidate = os.environ.get("CARDIAC_JAX_TORCH_PYTHON", "")
  return candidate if candidate and os.path.exists(candidate) else None


TORCH_PYTHON = _torch_python()
needs_torch = pytest.mark.skipif(
    TORCH_PYTHON is None,
    reason="PyTorch not importable and $CARDIAC_JAX_TORCH_PYTHON not set (not a dependency)")


def jax_parameter_counts(channels, latent_dim, image_size, image_channels=1) -> dict:
  model = vae_lib.VAE(channels=tuple(channels), latent_dim=latent_dim, image_size=image_size,
                      image_channels=image_channels)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, image_size, image_size, image_channels)), train=False))
  return {part: sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables["params"][part]))
          for part in ("encoder", "decoder")}


def run_baseline(*args: str) -> dict:
  completed = subprocess.run([TORCH_PYTHON, benchmark.TORCH_BASELINE, *args],
                             capture_output=True, text=True, timeout=300, check=False)
  assert completed.returncode == 0, completed.stderr
  return json.loads(completed.stdout.strip().splitlines()[-1])


@needs_torch
@pytest.mark.parametrize("image_size,channels,latent_dim,image_channels", [
    (128, (64, 128, 256, 512, 512), 256, 1),   # The paper's ACDC model.
    (64, (32, 64, 128, 256), 64, 1),           # The default ar_sivae config.
    (32, (8, 16), 8, 2),                       # Smoke size, ED + ES channels.
])
def test_parameter_counts_match_jax(image_size, channels, latent_dim, image_channels):
  counts = run_baseline(f"--image_size={image_size}", f"--channels={','.join(map(str, channels))}",
                        f"--latent_dim={latent_dim}", f"--image_channels={image_channels}",
                        "--count_params")
  expected = jax_parameter_counts(channels, latent_dim, image_size, image_channels)
  assert counts["encoder_params"] == expected["encoder"]
  assert counts["decoder_params"] == expected["decoder"]


@needs_torch
def test_baseline_times_finite_steps():
  result = run_baseline("--image_size=16", "--channels=4,8", "--latent_dim=4", "--batch_size=4",
                        "--steps=2", "--warmup_steps=1", "--threads=1")
  assert len(result["step_seconds"]) == 2 and result["s_per_step"] > 0
  assert math.isfinite(result["encoder_loss"]) and math.isfinite(result["decoder_loss"])
  assert result["samples_per_sec"] == pytest.approx(4 / result["s_per_step"])
  assert result["threads"] == 1 and result["torch_version"]


def test_baseline_command_follows_the_config():
  config = get_config("ar_sivae:paper")
  command = benchmark.torch_baseline_command(config, "/usr/bin/python3", num_steps=2)
  assert command[:2] == ["/usr/bin/python3", benchmark.TORCH_BASELINE]
  flags = dict(arg[2:].split("=", 1) for arg in command[2:])
  assert flags["image_size"] == "128" and flags["batch_size"] == "16"
  assert flags["channels"] == "64,128,256,512,512" and flags["latent_dim"] == "256"
  assert flags["image_channels"] == "1" and flags["num_attributes"] == "3"
  assert float(flags["beta_neg"]) == 1024.0 and float(flags["gamma"]) == 0.1
  assert flags["steps"] == "2"


def test_baseline_command_rejects_objectives_it_does_not_implement():
  with pytest.raises(ValueError, match="Soft-IntroVAE"):
    benchmark.torch_baseline_command(get_config("vae:smoke"), "/usr/bin/python3", num_steps=1)


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None,
                    reason="this interpreter has PyTorch")
def test_baseline_without_torch_says_how_to_install_it():
  completed = subprocess.run([sys.executable, benchmark.TORCH_BASELINE, "--count_params"],
                             capture_output=True, text=True, timeout=60, check=False)
  assert completed.returncode != 0
  assert "not a project dependency" in completed.stderr
  assert "pip install torch" in completed.stderr
