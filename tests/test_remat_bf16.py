"""Rematerialisation changes memory, not results; bfloat16 compute still trains.

Toy size (16 px, channels (4, 8)). Rematerialisation: the residual VAE with `remat="blocks"`
gives the same Soft-IntroVAE (AR-SIVAE) encoder and decoder losses and gradients as without,
and every residual block (and only those) becomes one rematerialised region. (The memory it
saves is measured by `experiments.benchmark --remat=...`, see benchmarks/README.md.) bfloat16: a smoke VAE and a smoke AR-SIVAE
trained on one fixed toy batch with model.compute_dtype="bfloat16" run their convolutions in
bfloat16, reduce the reconstruction loss by a stated margin, and keep parameters and optimizer
state in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cardiac_jax import steps
from cardiac_jax.models import vae as vae_lib
from experiments.configs import get_config


def toy_config(name: str, compute_dtype: str = "float32", learning_rate: float = 2e-4):
  config = get_config(f"{name}:smoke")
  config.data.image_size = 16
  config.model.channels = (4, 8)
  config.model.latent_dim = 4
  config.model.compute_dtype = compute_dtype
  config.optimizer.learning_rate = learning_rate
  return config


def family_with_remat(config, remat: str):
  """The config's VAE family with its model's `remat` field set (the field the family would
  read from config.model.remat)."""
  family = steps.make_family(config)
  family.model = family.model.clone(remat=remat)
  return family


def toy_batch(batch_size: int = 4, size: int = 16, num_attributes: int = 3) -> dict:
  """Fixed images: bright discs of different radii on a dark background, in [0, 1]."""
  yy, xx = np.mgrid[:size, :size]
  radii = np.linspace(0.2, 0.4, batch_size) * size
  distance = np.hypot(yy - size / 2 + 0.5, xx - size / 2 + 0.5)
  images = np.stack([(distance < r).astype(np.float32) * 0.9 for r in radii])[..., None]
  attributes = np.stack([radii * (k + 1) for k in range(num_attributes)], axis=1)
  return {"image": jnp.asarray(images), "attributes": jnp.asarray(attributes, jnp.float32)}


def assert_trees_close(a, b, rtol=1e-4, atol=1e-6):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------- rematerialisation
@pytest.fixture(scope="module")
def remat_pair():
  config = toy_config("ar_sivae")
  config.loss.gamma = 1.0  # Make the attribute term matter in the gradients.
  plain, remat = family_with_remat(config, "none"), family_with_remat(config, "blocks")
  state = jax.jit(plain.init_state)(jax.random.key(0))
  return plain, remat, state, toy_batch()


def _soft_intro_losses_and_grads(family, state, batch):
  key = jax.random.key(1)
  keys = list(jax.random.split(key, 6))
  z_prior = jax.random.normal(keys[0], (batch["image"].shape[0], family.latent_dim))
  enc = jax.value_and_grad(family.soft_intro_encoder_loss, has_aux=True)(
      state.params["encoder"], state, batch["image"], batch["attributes"], z_prior,
      tuple(keys[1:4]))
  (enc_loss, enc_aux), enc_grads = enc
  dec = jax.value_and_grad(family.soft_intro_decoder_loss, has_aux=True)(
      state.params["decoder"], state.params["encoder"], state, batch["image"],
      jax.lax.stop_gradient(enc_aux["z"]), z_prior, tuple(keys[4:6]))
  (dec_loss, _), dec_grads = dec
  return enc_loss, enc_grads, dec_loss, dec_grads, enc_aux["stats"]


def test_remat_gives_same_soft_intro_losses_and_gradients(remat_pair):
  plain, remat, state, batch = remat_pair
  expected = jax.jit(lambda s, b: _soft_intro_losses_and_grads(plain, s, b))(state, batch)
  actual = jax.jit(lambda s, b: _soft_intro_losses_and_grads(remat, s, b))(state, batch)
  enc_loss, enc_grads, dec_loss, dec_grads, stats = expected
  assert float(enc_loss) > 0 and float(dec_loss) > 0
  # Gradients are not trivially zero, so equality below means something.
  assert float(jnp.max(jnp.abs(enc_grads["down0"]["conv1"]["kernel"]))) > 1e-6
  assert float(jnp.max(jnp.abs(dec_grads["up0"]["conv1"]["kernel"]))) > 1e-8
  np.testing.assert_allclose(float(actual[0]), float(enc_loss), rtol=1e-5)
  np.testing.assert_allclose(float(actual[2]), float(dec_loss), rtol=1e-5)
  assert_trees_close(actual[1], enc_grads)
  assert_trees_close(actual[3], dec_grads)
  assert_trees_close(actual[4], stats)  # BatchNorm statistics updated identically.


def test_remat_keeps_parameter_names_and_rejects_unknown_modes():
  model = vae_lib.VAE(channels=(4, 8), latent_dim=4, image_size=16, image_channels=1)
  x = jnp.zeros((1, 16, 16, 1))
  shapes = lambda m: jax.tree.map(lambda a: a.shape, jax.eval_shape(
      lambda: m.init(jax.random.key(0), x, train=False)))
  assert shapes(model) == shapes(model.clone(remat="blocks"))
  with pytest.raises(ValueError, match="model.remat"):
    model.clone(remat="everything").init(jax.random.key(0), x, train=False)


def test_remat_wraps_every_residual_block_and_nothing_else():
  """One rematerialised region per ResBlock: 2 in the toy encoder, 3 in the toy decoder."""
  x = jnp.zeros((2, 16, 16, 1))

  def remat_regions(remat: str) -> int:
    model = vae_lib.VAE(channels=(4, 8), latent_dim=4, image_size=16, image_channels=1,
                        remat=remat)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    forward = lambda v: model.apply(v, x, train=True, mutable=["batch_stats"])[0]
    eqns = jax.make_jaxpr(forward)(variables).jaxpr.eqns
    return sum(1 for e in eqns if e.primitive.name in ("remat2", "checkpoint"))

  assert remat_regions("none") == 0
  assert remat_regions("blocks") == 5


# ----------------------------------------------------------------------------------- bfloat16
def _train(config, batch, num_steps: int):
  family = steps.make_family(config)
  state = jax.jit(family.init_state)(jax.random.key(0))
  train_step = jax.jit(family.train_step)
  reconstruction = []
  for step in range(num_steps):
    state, metrics = train_step(state, batch, jax.random.fold_in(jax.random.key(3), step))
    reconstruction.append(float(metrics["reconstruction_loss"]))
  return family, state, np.asarray(reconstruction)


def _float_dtypes(tree) -> set:
  return {jnp.dtype(leaf.dtype) for leaf in jax.tree.leaves(tree)
          if jnp.issubdtype(leaf.dtype, jnp.floating)}


# (config, steps, bound on the last five steps' mean reconstruction loss as a fraction of the
# first step's; measured here: about 0.45 (vae) and 0.50 (ar_sivae) after 20 steps).
BF16_CASES = [("vae", 20, 0.6), ("ar_sivae", 20, 0.7)]


@pytest.mark.parametrize("name,num_steps,max_fraction", BF16_CASES)
def test_bfloat16_training_decreases_reconstruction_loss(name, num_steps, max_fraction):
  config = toy_config(name, compute_dtype="bfloat16", learning_rate=2e-3)
  batch = toy_batch()
  family, state, reconstruction = _train(config, batch, num_steps)
  assert np.all(np.isfinite(reconstruction))
  # Mean of the last five steps against the first: robust to one noisy step.
  final = reconstruction[-5:].mean()
  assert final < max_fraction * reconstruction[0], reconstruction
  # Master weights and Adam moments stay float32.
  assert _float_dtypes(state.params) == {jnp.dtype(jnp.float32)}
  assert _float_dtypes(state.opt_state) == {jnp.dtype(jnp.float32)}
  # The convolutions really run in bfloat16.
  jaxpr = str(jax.make_jaxpr(family.train_step)(state, batch, jax.random.key(0)))
  assert "bf16" in jaxpr and "conv_general_dilated" in jaxpr
  conv_lines = [l for l in jaxpr.splitlines() if "conv_general_dilated" in l]
  assert any("bf16[" in l for l in conv_lines)
