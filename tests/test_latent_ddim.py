"""Latent DDIM: the MLP-with-skips network, normalisation, the L1 eps training, DDIM sampling of
codes against an analytic Gaussian target, checkpoint resume, and experiments.sample end to end
on the smoke DiffAE run of the shared fixture."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from cardiac_jax import diffusion
from cardiac_jax import latent_diffusion as ld
from cardiac_jax.models.latent_ddim import MLPSkipNet
from experiments import sample as sample_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(num_layers=3, hidden_units=32, time_embed_dim=8, batch_size=64,
            learning_rate=1e-3, ema_decay=0.0, num_steps=20, log_every=10, checkpoint_every=10,
            sample_steps=10)


NUM_CODES = 256   # The loss and resume tests share their compiled steps (same shapes).


def _init(net: MLPSkipNet, batch: int = 3):
  return jax.jit(net.init)(jax.random.key(0), jnp.zeros((batch, net.dim)),
                           jnp.zeros((batch,), jnp.int32))["params"]


def test_network_shapes_and_skip_structure():
  net = MLPSkipNet(dim=5, num_layers=4, hidden_units=16, time_embed_dim=8)
  params = _init(net)
  # Layer 0 sees z_t alone; every later layer, the output one included, sees [h, z_t].
  assert params["layer_0"]["kernel"].shape == (5, 16)
  assert params["layer_1"]["kernel"].shape == (16 + 5, 16)
  assert params["layer_2"]["kernel"].shape == (16 + 5, 16)
  assert params["layer_3"]["kernel"].shape == (16 + 5, 5)
  # Timestep scales and LayerNorms on the hidden layers only; time MLP of width D.
  assert {f"time_scale_{i}" for i in range(3)} | {f"norm_{i}" for i in range(3)} <= set(params)
  assert "time_scale_3" not in params and "norm_3" not in params
  assert params["time_dense_0"]["kernel"].shape == (8, 5)
  assert params["time_scale_0"]["kernel"].shape == (5, 16)
  z = jax.random.normal(jax.random.key(1), (3, 5))
  t = jnp.array([0, 500, 999])
  apply = jax.jit(lambda p, z_t, t: net.apply({"params": p}, z_t, t))
  out = apply(params, z, t)
  assert out.shape == (3, 5) and out.dtype == jnp.float32
  # The timestep conditions the output.
  assert not np.allclose(out, apply(params, z, jnp.array([10, 10, 10])))
  # Skip into the output layer: with its kernel [0; I] and zero bias the output is z_t itself,
  # whatever the hidden layers compute.
  last = {"kernel": jnp.concatenate([jnp.zeros((16, 5)), jnp.eye(5)]), "bias": jnp.zeros(5)}
  np.testing.assert_allclose(apply({**params, "layer_3": last}, z, t), z, atol=1e-6)
  with pytest.raises(ValueError, match="num_layers must be >= 2"):
    _init(MLPSkipNet(dim=5, num_layers=1))
  with pytest.raises(ValueError, match=r"z_t must be \(B, 5\)"):
    net.apply({"params": params}, jnp.zeros((3, 4)), t)


def test_normalize_round_trip_and_std_floor():
  rng = np.random.default_rng(0)
  z = rng.normal(3.0, 2.0, (50, 4)).astype(np.float32)
  z[:, 2] = 7.0                                            # A dimension the encoder ignores.
  stats = ld.normalization_stats(z, std_floor=1e-3)
  np.testing.assert_allclose(stats["mean"], z.mean(0), rtol=1e-5)
  assert stats["std"][2] == pytest.approx(1e-3)
  u = ld.normalize(z, stats)
  assert u.dtype == np.float32 and np.all(np.isfinite(u))
  np.testing.assert_allclose(u.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(u.std(0)[[0, 1, 3]], 1.0, rtol=1e-4)
  np.testing.assert_allclose(u[:, 2], 0.0, atol=1e-6)
  np.testing.assert_allclose(ld.denormalize(u, stats), z, rtol=1e-5, atol=1e-5)
  back = ld.denormalize(ld.normalize(jnp.asarray(z), stats), stats)
  assert isinstance(back, jax.Array)
  np.testing.assert_allclose(np.asarray(back), z, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"\(N, D\)"):
    ld.normalization_stats(np.zeros((5,)))
  with pytest.raises(ValueError, match="non-finite"):
    ld.normalization_stats(np.array([[1.0, np.nan]]))


def test_l1_loss_decreases_on_gaussian_mixture_codes():
  rng = np.random.default_rng(1)
  centres = np.array([[2.0, -1.0, 0.5, 0.0], [-2.0, 1.0, -0.5, 1.0]])
  z = centres[rng.integers(0, 2, NUM_CODES)] + 0.1 * rng.standard_normal((NUM_CODES, 4))
  u = jnp.asarray(ld.normalize(z.astype(np.float32), ld.normalization_stats(z)))
  settings = ld.LatentSettings(**TINY).step_settings()
  # Committed to the device as in train_latent_ddim: the resume test reuses the compiled step.
  state = jax.device_put(ld.init_state(settings, 4, jax.random.key(0)),
                         jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  key_t, key_eps = jax.random.split(jax.random.key(2))
  t = jax.random.randint(key_t, (NUM_CODES,), 0, 1000)
  noise = jax.random.normal(key_eps, u.shape)

  fixed_loss = jax.jit(lambda params: ld.eps_loss(settings, params, u, t, noise))

  before = float(fixed_loss(state.params["net"]))
  state, first = ld.train_steps(settings, state, u, 10)
  for _ in range(14):
    state, last = ld.train_steps(settings, state, u, 10)
  assert int(state.step) == 150
  after = float(fixed_loss(state.params["net"]))
  assert after < 0.75 * before, (before, after)
  assert float(last["loss"]) < float(first["loss"])
  # ema_decay = 0: the EMA is the parameters.
  jax.tree.map(np.testing.assert_array_equal, state.params["ema"], state.params["net"])


MEAN, STD = 2.5, 0.5       # Target N(MEAN, STD^2 I), outside [-1, 1]: clipping would break it.
SCHEDULE = diffusion.linear_schedule(1000, 1e-4, 0.02)


def _gaussian_oracle(u_t, t, cond):
  """E[eps | u_t] for data ~ N(MEAN, STD^2 I):
  sqrt(1 - a) (u_t - sqrt(a) MEAN) / (a STD^2 + 1 - a), a = abar_t."""
  del cond
  a = SCHEDULE.alphas_cumprod[t][:, None]
  return jnp.sqrt(1.0 - a) * (u_t - jnp.sqrt(a) * MEAN) / (a * STD ** 2 + 1.0 - a)


def test_ddim_sampling_with_an_exact_eps_reproduces_a_gaussian_target():
  # Deterministic DDIM under-disperses with few steps even with the exact eps (the std of a
  # unit Gaussian comes out 0.92 with 20 steps, 0.97 with 50): 250 steps are within 1%.
  schedule = diffusion.ddim_schedule(1000, 250)
  u = np.asarray(ld.ddim_sample(_gaussian_oracle, None, jax.random.key(0), 4000, 3, schedule))
  assert u.shape == (4000, 3)
  np.testing.assert_allclose(u.mean(0), MEAN, atol=0.03)
  np.testing.assert_allclose(u.std(0), STD, rtol=0.04)
  # Independent draws per row and dimension.
  assert abs(np.corrcoef(u.T)[0, 1]) < 0.1
  # Clipped x0_hat (the image sampler's default) would confine the codes to [-1, 1].
  clipped = diffusion.ddim_decode(_gaussian_oracle, jax.random.normal(jax.random.key(0),
                                                                      (100, 3)), None, schedule)
  assert float(jnp.max(clipped)) <= 1.0 + 1e-6


def test_train_resumes_and_reuses_a_finished_checkpoint(tmp_path):
  rng = np.random.default_rng(3)
  z = rng.normal(1.0, 3.0, (NUM_CODES, 4)).astype(np.float32)
  key = jax.random.key(7)
  directory = str(tmp_path / "latent")
  first = ld.train_latent_ddim(z, TINY, key, directory, log=lambda m: None)
  assert (first.step, first.trained_steps) == (20, 20)
  assert first.final_loss is not None and np.isfinite(first.final_loss)
  with open(os.path.join(directory, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [10, 20]
  with open(os.path.join(directory, ld.NORMALIZATION_FILE)) as f:
    saved = json.load(f)
  np.testing.assert_allclose(saved["mean"], z.mean(0), rtol=1e-5)
  assert saved["num_codes"] == NUM_CODES and saved["dim"] == 4

  again = ld.train_latent_ddim(z, TINY, key, directory, log=lambda m: None)
  assert (again.step, again.trained_steps) == (20, 0)
  assert again.final_loss == pytest.approx(first.final_loss)
  jax.tree.map(np.testing.assert_array_equal, again.params, first.params)
  samples = again.sample(jax.random.key(0), 5)
  np.testing.assert_array_equal(samples, first.sample(jax.random.key(0), 5))
  assert samples.shape == (5, 4) and np.all(np.isfinite(samples))

  # Resuming 20 -> 30 steps equals 30 uninterrupted steps.
  longer = {**TINY, "num_steps": 30}
  resumed = ld.train_latent_ddim(z, longer, key, directory, log=lambda m: None)
  assert (resumed.step, resumed.trained_steps) == (30, 10)
  straight = ld.train_latent_ddim(z, longer, key, str(tmp_path / "straight"),
                                  log=lambda m: None)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               resumed.params, straight.params)

  with pytest.raises(ValueError, match="other statistics"):
    ld.train_latent_ddim(z + 1.0, TINY, key, directory, log=lambda m: None)
  with pytest.raises(ValueError, match="latent.loss"):
    ld.LatentSettings.from_config({"loss": "huber"})
  with pytest.raises(ValueError, match="unknown latent config fields"):
    ld.LatentSettings.from_config({"layers": 3})


def test_nearest_distances():
  reference = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])
  distance, index = ld.nearest_distances(np.array([[3.0, 3.0], [0.1, 0.0]]), reference)
  np.testing.assert_allclose(distance, [1.0, 0.1], atol=1e-9)
  np.testing.assert_array_equal(index, [1, 0])
  loo, loo_index = ld.nearest_distances(reference, reference, exclude_self=True)
  np.testing.assert_allclose(loo, [1.0, np.hypot(3.0, 3.0), 1.0], atol=1e-9)
  np.testing.assert_array_equal(loo_index, [2, 2, 0])


def test_sample_rejects_a_run_that_is_not_a_diffae(tmp_path):
  with pytest.raises(ValueError, match="no config.json"):
    sample_experiment.check_diffae_run(str(tmp_path))
  from experiments.configs import get_config
  (tmp_path / "config.json").write_text(get_config("vae:smoke").to_json())
  with pytest.raises(ValueError, match="model.family is 'vae'.*diffae3d"):
    sample_experiment.check_diffae_run(str(tmp_path))
  result = subprocess.run([sys.executable, "-m", "experiments.sample", f"--workdir={tmp_path}",
                           "--num=2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "model.family is 'vae'" in result.stderr


def test_sample_end_to_end_on_the_smoke_diffae_run(diffae_run, tmp_path):
  from data_pipelines import prepare
  output, latent_dir = str(tmp_path / "samples"), str(tmp_path / "latent")
  result = sample_experiment.run(diffae_run, 3, seed=1, output=output, latent_dir=latent_dir,
                                 log=lambda m: None)
  config = sample_experiment.check_diffae_run(diffae_run)
  frames, size = config.data.num_frames, config.data.image_size
  spacing = config.data.prepare.spacing_mm * config.data.prepare.image_size / size
  with open(os.path.join(output, "samples.json")) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(result))
  assert saved["num"] == 3 and saved["checkpoint_step"] == config.train.num_steps
  assert saved["latent_ddim"]["step"] == config.latent.num_steps
  assert saved["latent_ddim"]["trained_steps_this_run"] == config.latent.num_steps
  assert saved["decode_steps"] == config.latent.image_decode_steps
  assert saved["latent_steps"] == config.latent.sample_steps
  source = prepare.load_split(config.data.prepared_dir, "train")
  train_subjects = {source[i]["subject"] for i in range(len(source))}
  train_subjects = {s.decode() if isinstance(s, bytes) else s for s in train_subjects}
  assert saved["training_codes"]["num_subjects"] == len(train_subjects)
  quality = saved["quality"]
  assert quality["train_nearest_median"] > 0 and quality["sample_nearest_median"] > 0
  assert quality["nearest_ratio_median"] == pytest.approx(
      quality["sample_nearest_median"] / quality["train_nearest_median"])
  # 20 steps of a tiny latent DDIM on 6 codes: samples far from them, and said so.
  assert (quality["warning"] is not None) == (quality["nearest_ratio_median"] > 2.0)

  codes = np.load(os.path.join(output, "samples.npz"))
  with open(os.path.join(latent_dir, ld.NORMALIZATION_FILE)) as f:
    stats = json.load(f)
  assert codes["z_sem"].shape == codes["u"].shape == (3, config.model.z_sem_dim)
  np.testing.assert_allclose(codes["z_sem"], ld.denormalize(codes["u"], stats), rtol=1e-5,
                             atol=1e-6)
  assert len(saved["samples"]) == 3
  for record in saved["samples"]:
    assert record["nearest_train_subject"] in train_subjects
    assert record["nearest_train_distance"] >= quality["sample_nearest_min"]
    image = nib.load(os.path.join(output, record["nifti"]))
    data = np.asarray(image.dataobj)
    assert data.shape == (size, size, 1, frames) and data.dtype == np.float32
    assert data.min() >= 0.0 and data.max() <= 1.0 and data.std() > 0
    np.testing.assert_allclose(image.header.get_zooms(), (spacing, spacing, 1.0, 1.0))
    np.testing.assert_allclose(np.diag(image.affine), (spacing, spacing, 1.0, 1.0))
    # The GIF's first frame is the NIfTI's frame 0 (rows x, columns y), upscaled.
    gif = Image.open(os.path.join(output, record["gif"]))
    scale = gif.size[0] // size
    assert gif.size == (size * scale, size * scale) and scale >= 1
    first = np.asarray(gif.convert("L"), np.float64)[::scale, ::scale]
    np.testing.assert_allclose(first, np.round(data[:, :, 0, 0] * 255.0), atol=1.0)
  assert sorted(os.listdir(output)) == sorted(
      ["overview.png", "samples.json", "samples.npz"]
      + [f"sample_{i:03d}.{ext}" for i in range(3) for ext in ("gif", "nii.gz")])
  overview = Image.open(os.path.join(output, "overview.png"))
  assert overview.size[0] > overview.size[1] > 0          # 3 rows of up to 8 frames.
  assert saved["overview"]["rows"] == 3
  assert saved["overview"]["frames"] == list(
      np.unique(np.linspace(0, frames - 1, min(8, frames)).astype(int)))
