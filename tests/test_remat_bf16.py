"""Rematerialisation changes memory, not results; bfloat16 compute still trains.

Toy size (16 px, channels (4, 8)). Rematerialisation: the residual VAE with `remat="blocks"`
gives the same Soft-IntroVAE (AR-SIVAE) encoder and decoder losses and gradients as without,
and every residual block (and only those) becomes one rematerialised region. (The memory it
saves is measured by `experiments.benchmark --remat=...`, see benchmarks/README.md.) bfloat16: a smoke VAE and a smoke AR-SIVAE
trained on one fixed toy batch with model.compute_dtype="bfloat16" run their convolutions in
bfloat16, reduce the reconstruction loss by a stated margin, and keep parameters and optimizer
state in float32.

3D DiffAE (docs/diffae3d_memory.md): `layers.recompute_in_backward` has the values and
gradients of the function it wraps; remat="blocks" gives the same eps loss and gradients of
encoder and UNet (dropout on, the same masks) and XLA's compiled memory analysis of the
gradient needs well under the temporaries of remat="none"; `experiments.benchmark` builds the
DiffAE with the remat it is given; a bfloat16 train step runs with float32 parameters and
optimizer state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cardiac_jax import attention as attention_lib
from cardiac_jax import layers
from cardiac_jax import families
from cardiac_jax.models import vae as vae_lib
from experiments import benchmark
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
  family = families.make_family(config)
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
  family = families.make_family(config)
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


# --------------------------------------------------------------------------- 3D DiffAE remat
def test_recompute_in_backward_keeps_values_and_gradients():
  def block(params, x, key):
    h = jnp.tanh(x @ params["w"]) + params["b"]
    return h * jax.random.bernoulli(key, 0.7, h.shape)

  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(6, 6)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(6,)), jnp.float32)}
  x = jnp.asarray(rng.normal(size=(5, 6)), jnp.float32)
  key = jax.random.key(2)
  loss = lambda f: lambda p, x: jnp.sum(jnp.sin(f(p, x, key)))
  recomputed = layers.recompute_in_backward(block)
  np.testing.assert_array_equal(recomputed(params, x, key), block(params, x, key))
  want = jax.jit(jax.grad(loss(block), (0, 1)))(params, x)
  got = jax.jit(jax.grad(loss(recomputed), (0, 1)))(params, x)
  assert_trees_close(got, want, rtol=1e-6, atol=1e-7)
  # A non-finite output cotangent gives NaN gradients (as the plain VJP would, mostly).
  nan_grads = jax.grad(lambda p: jnp.nan * jnp.sum(recomputed(p, x, key)))(params)
  assert all(np.isnan(np.asarray(g)).all() for g in jax.tree.leaves(nan_grads))


def diffae_remat_config(remat: str):
  """Two UNet and encoder levels at 16 px, attention at 8 px and in the middle blocks,
  dropout on; attention blocks of 32 queries, so activations and not logits dominate."""
  config = get_config("diffae3d:smoke")
  config.data.num_frames, config.data.image_size = 2, 16
  config.model.update(base_channels=4, channel_mult=(1, 2), encoder_channel_mult=(1, 2),
                      attention_resolutions=(8,), encoder_attention_resolutions=(8,),
                      attention_block_size=32, dropout=0.1, remat=remat, conv_impl="xla")
  return config


@pytest.fixture(scope="module")
def diffae_remat_pair():
  """Per remat mode: the compiled (eps loss, gradients) of encoder and UNet at random
  parameters (no zero-initialised layer, so gradients reach the encoder) and the compiled
  function's temporaries (bytes)."""
  x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 2, 16, 16, 1)), jnp.float32)
  out = {}
  for remat in ("none", "blocks"):
    family = families.make_family(diffae_remat_config(remat))
    # Random parameters of the right shapes (no zero layers); no initialisation to compile.
    shapes = family.trainable(jax.eval_shape(family.init_state, jax.random.key(0)).params)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.normal(size=a.shape), a.dtype),
                          shapes)

    def loss(trainable, x, key, family=family):
      t, noise, dropout_key = family.sample_step_noise(key, x.shape)
      return jnp.mean(family.loss_terms(trainable, x, t, noise, dropout_key)["eps_loss"])

    args = (params, x, jax.random.key(3))
    compiled = jax.jit(jax.value_and_grad(loss)).lower(*args).compile()
    out[remat] = (compiled(*args), compiled.memory_analysis().temp_size_in_bytes)
  return out


def test_diffae_remat_gives_the_same_loss_and_gradients(diffae_remat_pair):
  (loss, grads), _ = diffae_remat_pair["none"]
  (remat_loss, remat_grads), _ = diffae_remat_pair["blocks"]
  assert float(loss) > 0.0
  # Gradients reach both networks, so equality below covers them.
  for part in ("encoder", "unet"):
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads[part])) > 1e-4
  np.testing.assert_allclose(float(remat_loss), float(loss), rtol=1e-6)
  # The same sums in another order (other fusions): float32 rounding, within 1e-6 of the
  # largest gradient.
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads))
  assert jax.tree.structure(remat_grads) == jax.tree.structure(grads)
  for got, want in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * scale)


def test_diffae_remat_never_recomputes_an_attention_block(monkeypatch):
  """The blockwise attention keeps O(N) residuals by itself: under remat="blocks" a UNet
  attention block is traced once for value and gradient, as without remat, and an encoder one
  twice (the semantic encoder is recomputed as a whole). Recomputing the blocks themselves
  repeated their products: 14 traces here instead of 8."""
  from cardiac_jax.models import diffae3d as diffae_lib
  x = jnp.zeros((2, 2, 16, 16, 1), jnp.float32)
  calls = {}
  for remat in ("none", "blocks"):
    family = families.make_family(diffae_remat_config(remat))
    trainable = family.trainable(jax.eval_shape(family.init_state, jax.random.key(0)).params)
    count = [0]

    def counted(*args, count=count, **kwargs):
      count[0] += 1
      return attention_lib.chunked_attention(*args, **kwargs)

    monkeypatch.setattr(diffae_lib, "chunked_attention", counted)

    def loss(trainable, family=family):
      t, noise, dropout_key = family.sample_step_noise(jax.random.key(3), x.shape)
      return jnp.mean(family.loss_terms(trainable, x, t, noise, dropout_key)["eps_loss"])

    jax.eval_shape(jax.grad(loss), trainable)
    calls[remat] = count[0]
  # Encoder: a down-path and a middle attention block; UNet: the same and two on the up path.
  assert calls == {"none": 6, "blocks": 6 + 2}, calls


def test_diffae_remat_lowers_the_compiled_memory(diffae_remat_pair):
  """XLA:CPU schedules a plain jax.checkpoint's recomputation into the forward pass, which
  leaves the temporaries where they are without remat (nn.remat: 99 % of them); recomputing
  once the cotangent exists cuts them to about 40 % here."""
  _, plain = diffae_remat_pair["none"]
  _, remat = diffae_remat_pair["blocks"]
  assert remat < 0.5 * plain, (remat, plain)


def test_benchmark_builds_the_diffae_with_the_requested_remat():
  config = get_config("diffae3d:smoke")
  assert config.model.remat == "none"
  family = benchmark.make_family(config, "blocks")
  assert family.model.unet.remat == family.model.encoder.remat == "blocks"
  assert config.model.remat == "none"  # The caller's config is left alone.
  with pytest.raises(ValueError, match="model.remat"):
    benchmark.make_family(config, "everything")
  with pytest.raises(ValueError, match="no rematerialisation option"):
    benchmark.make_family(get_config("dcgan:smoke"), "blocks")


def test_diffae_bfloat16_train_step_keeps_float32_parameters():
  """One rematerialised bfloat16 step of a one-level toy DiffAE."""
  config = diffae_remat_config("blocks")
  config.data.image_size = 8
  config.model.update(compute_dtype="bfloat16", channel_mult=(1,), encoder_channel_mult=(1,),
                      attention_resolutions=(), encoder_attention_resolutions=())
  family = families.make_family(config)
  state = jax.jit(family.init_state)(jax.random.key(0))
  batch = {"la_image": jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (2, 2, 8, 8, 1)),
                                   jnp.float32)}
  lowered = jax.jit(family.train_step).lower(state, batch, jax.random.key(1))
  assert any("bf16>" in line for line in lowered.as_text().splitlines()
             if "stablehlo.convolution" in line)
  state, metrics = lowered.compile()(state, batch, jax.random.key(1))
  assert np.isfinite(float(metrics["loss"])) and float(metrics["finite"]) == 1.0
  assert _float_dtypes(state.params) == {jnp.dtype(jnp.float32)}
  assert _float_dtypes(state.opt_state) == {jnp.dtype(jnp.float32)}
