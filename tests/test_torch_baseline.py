"""The PyTorch baselines of the benchmark (AR-SIVAE; the ImLatent 3D DiffAE): same parameter
counts as the JAX models (and, for the DiffAE, the same function), wired to the config.

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
import numpy as np
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


def _baseline_flags(config, script: str) -> dict[str, str]:
  """The --name=value flags of the 2-step baseline command of `config`, once checked to run
  `script` with the given interpreter."""
  command = benchmark.torch_baseline_command(config, "/usr/bin/python3", num_steps=2)
  assert command[:2] == ["/usr/bin/python3", script]
  return dict(arg[2:].split("=", 1) for arg in command[2:])


def test_baseline_command_follows_the_config():
  flags = _baseline_flags(get_config("ar_sivae:paper"), benchmark.TORCH_BASELINE)
  assert flags["image_size"] == "128" and flags["batch_size"] == "16"
  assert flags["channels"] == "64,128,256,512,512" and flags["latent_dim"] == "256"
  assert flags["image_channels"] == "1" and flags["num_attributes"] == "3"
  assert float(flags["beta_neg"]) == 1024.0 and float(flags["gamma"]) == 0.1
  assert flags["steps"] == "2"


def test_baseline_command_rejects_objectives_it_does_not_implement():
  with pytest.raises(ValueError, match="Soft-IntroVAE"):
    benchmark.torch_baseline_command(get_config("vae:smoke"), "/usr/bin/python3", num_steps=1)
  # A bfloat16 step against the float32 baseline is no like-for-like ratio.
  config = get_config("ar_sivae:smoke")
  config.model.compute_dtype = "bfloat16"
  with pytest.raises(ValueError, match="float32 only"):
    benchmark.torch_baseline_command(config, "/usr/bin/python3", num_steps=1)


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None,
                    reason="this interpreter has PyTorch")
@pytest.mark.parametrize("script", [benchmark.TORCH_BASELINE, benchmark.IMLATENT_BASELINE],
                         ids=["torch_baseline", "imlatent_baseline"])
def test_baseline_without_torch_says_how_to_install_it(script):
  completed = subprocess.run([sys.executable, script, "--count_params"],
                             capture_output=True, text=True, timeout=60, check=False)
  assert completed.returncode != 0
  assert "not a project dependency" in completed.stderr
  assert "pip install torch" in completed.stderr


# ---------------------------------------------------------------------------- ImLatent DiffAE
def diffae_config(spec: str, num_frames: int | None = None, image_size: int | None = None):
  config = get_config(spec)
  if num_frames:
    config.data.num_frames = num_frames
  if image_size:
    config.data.image_size = image_size
  return config


def diffae_parameter_leaves(config) -> list[tuple[str, tuple[int, ...]]]:
  """(path, shape) of every trained DiffAE parameter in creation order (encoder, then UNet;
  the order in which the PyTorch modules register theirs), from an abstract init."""
  from cardiac_jax.families import diffae3d as diffae3d_family
  family = diffae3d_family.DiffAEFamily(config)
  shape = (1, config.data.num_frames, config.data.image_size, config.data.image_size, 1)
  leaves = []

  def walk(tree, prefix):
    for name, value in tree.items():  # Insertion order at trace time (flattening sorts).
      if isinstance(value, dict):
        walk(value, f"{prefix}{name}/")
      else:
        leaves.append((f"{prefix}{name}", tuple(value.shape)))

  def init(key):
    x = jnp.zeros(shape, jnp.float32)
    params = family.model.init(key, x, x, jnp.zeros((1,), jnp.int32))["params"]
    walk(params, "")
    return params

  jax.eval_shape(init, jax.random.key(0))
  return leaves


def imlatent_count(config) -> dict:
  command = benchmark.torch_baseline_command(config, TORCH_PYTHON, num_steps=1)
  completed = subprocess.run(command + ["--count_params"], capture_output=True, text=True,
                             timeout=300, check=False)
  assert completed.returncode == 0, completed.stderr
  return json.loads(completed.stdout.strip().splitlines()[-1])


@needs_torch
@pytest.mark.parametrize("spec,num_frames,image_size", [
    ("diffae3d:paper", 50, 128),   # The reference size.
    ("diffae3d:paper", 16, 64),    # Attention at 16 px is one level higher: other counts.
    ("diffae3d", None, None),      # Default: flattened encoder head, 8 x 32 x 32.
    ("diffae3d:smoke", None, None),
])
def test_imlatent_parameter_counts_match_jax(spec, num_frames, image_size):
  config = diffae_config(spec, num_frames, image_size)
  expected = {}
  for path, shape in diffae_parameter_leaves(config):
    part = path.split("/", 1)[0]
    expected[part] = expected.get(part, 0) + math.prod(shape)
  counts = imlatent_count(config)
  assert counts["encoder_params"] == expected["encoder"]
  assert counts["unet_params"] == expected["unet"]
  if (num_frames, image_size) == (50, 128):
    assert counts["total_params"] == 20_837_473


# Runs with the baseline's interpreter: builds its networks from the given flags, loads the
# parameters (PyTorch layout, registration order) and writes z_sem and eps_hat of the inputs.
_FORWARD_SCRIPT = """
import importlib.util, sys
import numpy as np, torch
spec = importlib.util.spec_from_file_location("imlatent_baseline", sys.argv[1])
baseline = importlib.util.module_from_spec(spec)
spec.loader.exec_module(baseline)
args = baseline.parse_args(sys.argv[4:])
encoder, unet = baseline.build(args)
data = np.load(sys.argv[2])
params = list(encoder.parameters()) + list(unet.parameters())
assert len(params) == len([k for k in data.files if k.startswith("p")]), "parameter lists differ"
with torch.no_grad():
  for i, p in enumerate(params):
    value = torch.from_numpy(data[f"p{i:04d}"])
    assert value.numel() == p.numel(), (i, tuple(value.shape), tuple(p.shape))
    p.copy_(value.reshape(p.shape))
  encoder.eval(); unet.eval()
  x0, x_t = (torch.from_numpy(data[k]) for k in ("x0", "x_t"))
  z = encoder(x0)
  eps = unet(x_t, torch.from_numpy(data["t"]), z)
np.savez(sys.argv[3], z_sem=z.numpy(), eps_hat=eps.numpy())
"""


def to_torch_layout(path: str, value: np.ndarray) -> np.ndarray:
  """A JAX parameter in the PyTorch layout: conv kernels (k, k, k, I, O) -> (O, I, k, k, k),
  dense kernels (I, O) -> (O, I); scales and biases unchanged."""
  if value.ndim == 5:
    return np.ascontiguousarray(value.transpose(4, 3, 0, 1, 2))
  if value.ndim == 2:
    assert path.endswith("kernel"), path
    return np.ascontiguousarray(value.T)
  return value


@needs_torch
def test_imlatent_network_computes_the_jax_function(tmp_path):
  # Smoke sizes with the reference's pooled encoder head (the flattened head orders its input
  # features channels-last in JAX and channels-first in PyTorch).
  config = diffae_config("diffae3d:smoke")
  config.model.encoder_head = "pool"
  leaves = diffae_parameter_leaves(config)
  rng = np.random.default_rng(0)
  # Every parameter random (the zero-initialised output layers too), so that every path counts.
  values = [rng.normal(0.0, 0.2, shape).astype(np.float32) for _, shape in leaves]
  params = {}
  for (path, _), value in zip(leaves, values):
    node = params
    *parents, name = path.split("/")
    for parent in parents:
      node = node.setdefault(parent, {})
    node[name] = value
  t_frames, size = config.data.num_frames, config.data.image_size
  x0 = rng.uniform(-1, 1, (2, t_frames, size, size, 1)).astype(np.float32)
  x_t = rng.normal(size=x0.shape).astype(np.float32)
  t = np.array([17, 640], np.int32)

  from cardiac_jax.families import diffae3d as diffae3d_family
  model = diffae3d_family.DiffAEFamily(config).model

  @jax.jit
  def forward(params, x0, x_t, t):
    variables = {"params": params}
    z_sem = model.apply(variables, x0, method=model.encode)
    return z_sem, model.apply(variables, x_t, t, z_sem, method=model.eps)

  z_jax, eps_jax = (np.asarray(a) for a in forward(params, x0, x_t, t))
  inputs = tmp_path / "inputs.npz"
  channels_first = lambda a: np.ascontiguousarray(a.transpose(0, 4, 1, 2, 3))
  np.savez(inputs, x0=channels_first(x0), x_t=channels_first(x_t), t=t.astype(np.int64),
           **{f"p{i:04d}": to_torch_layout(path, value)
              for i, ((path, _), value) in enumerate(zip(leaves, values))})
  outputs = tmp_path / "outputs.npz"
  baseline_args = benchmark.torch_baseline_command(config, TORCH_PYTHON, num_steps=1)[2:]
  completed = subprocess.run(
      [TORCH_PYTHON, "-c", _FORWARD_SCRIPT, benchmark.IMLATENT_BASELINE, str(inputs),
       str(outputs), *baseline_args], capture_output=True, text=True, timeout=300, check=False)
  assert completed.returncode == 0, completed.stderr
  torch_out = np.load(outputs)
  np.testing.assert_allclose(torch_out["z_sem"], z_jax, rtol=1e-4, atol=1e-4)
  eps_torch = torch_out["eps_hat"].transpose(0, 2, 3, 4, 1)
  assert np.abs(eps_jax).mean() > 0.1  # Not a trivially zero output.
  np.testing.assert_allclose(eps_torch, eps_jax, rtol=1e-4, atol=1e-4 * np.abs(eps_jax).max())


@needs_torch
def test_imlatent_baseline_times_finite_steps():
  config = diffae_config("diffae3d:smoke")
  command = benchmark.torch_baseline_command(config, TORCH_PYTHON, num_steps=2, threads=1)
  completed = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
  assert completed.returncode == 0, completed.stderr
  result = json.loads(completed.stdout.strip().splitlines()[-1])
  assert len(result["step_seconds"]) == 2 and result["s_per_step"] > 0
  assert result["samples_per_sec"] == pytest.approx(4 / result["s_per_step"])
  assert math.isfinite(result["loss"]) and result["grad_norm"] > 0
  assert result["threads"] == 1 and result["torch_version"]


def test_baseline_command_follows_the_diffae_config():
  config = diffae_config("diffae3d:paper", 16, 64)
  config.train.batch_size = 1
  flags = _baseline_flags(config, benchmark.IMLATENT_BASELINE)
  assert flags["num_frames"] == "16" and flags["image_size"] == "64"
  assert flags["batch_size"] == "1" and flags["steps"] == "2"
  assert flags["base_channels"] == "32" and flags["channel_mult"] == "1,1,2,3,4"
  assert flags["encoder_channel_mult"] == "1,1,2,3,4,4" and flags["encoder_head"] == "pool"
  assert flags["attention_resolutions"] == "16" and flags["z_sem_dim"] == "128"
  assert float(flags["dropout"]) == 0.1 and float(flags["p2_gamma"]) == 0.0
  assert float(flags["learning_rate"]) == 1e-4 and float(flags["grad_clip_norm"]) == 1.0
  assert float(flags["ema_decay"]) == 0.9999 and flags["optimizer"] == "adam"
  smoke = benchmark.torch_baseline_command(get_config("diffae3d:smoke"), "python", 1)
  assert "--encoder_attention_resolutions=" in smoke  # None: an empty list.


def test_baseline_command_rejects_what_the_diffae_baseline_does_not_run():
  config = get_config("diffae3d:smoke")
  config.model.compute_dtype = "bfloat16"
  with pytest.raises(ValueError, match="float32"):
    benchmark.torch_baseline_command(config, "python", num_steps=1)
  with pytest.raises(ValueError, match="no PyTorch baseline for model.family='dcgan'"):
    benchmark.torch_baseline_command(get_config("dcgan:smoke"), "python", num_steps=1)
