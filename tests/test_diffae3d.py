"""3D diffusion autoencoder (models.diffae3d, families.diffae3d) on toy volumes, no dataset."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cardiac_jax.families import diffae3d as diffae3d_family
from cardiac_jax import attention
from cardiac_jax import diffusion
from cardiac_jax import families
from cardiac_jax.models import diffae3d
from experiments.configs import get_config


def tiny_config(**model):
  """The smoke config shrunk to one level (attention in the middle block only), so that init,
  train and eval steps compile in seconds on a loaded CPU; resampling levels are covered by
  the abstract shape tests."""
  config = get_config("diffae3d:smoke")
  config.data.num_frames = 3
  config.data.image_size = 8
  config.model.base_channels = 4
  config.model.channel_mult = (1,)
  config.model.num_res_blocks = 1
  config.model.attention_resolutions = ()
  config.model.encoder_channel_mult = (1,)
  config.model.encoder_num_res_blocks = 1
  config.model.encoder_attention_resolutions = ()
  config.model.conv_impl = "xla"                # One convolution op per layer: faster compiles.
  config.optimizer.learning_rate = 3e-3
  config.eval.loss_timesteps = (500,)
  config.eval.inversion_steps = 2
  config.eval.decode_steps = 2
  for key, value in model.items():
    config.model[key] = value
  return config


def toy_volumes(batch: int, frames: int, size: int, seed: int = 0) -> np.ndarray:
  """(B, T, S, S, 1) in [-1, 1]: a bright disc whose radius follows a cosine over the frames."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  centre = (size - 1) / 2
  out = np.full((batch, frames, size, size, 1), -1.0, np.float32)
  for b in range(batch):
    base = size * rng.uniform(0.2, 0.35)
    for t in range(frames):
      radius = base * (1 - 0.3 * (1 - np.cos(2 * np.pi * t / frames)) / 2)
      out[b, t, np.hypot(yy - centre, xx - centre) < radius, 0] = 1.0
  return out + rng.normal(0, 0.05, out.shape).astype(np.float32)


def count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def compiled(fn, *args):
  """`fn` compiled for `args` with XLA's backend optimisation off: the same computation,
  compiled in about half the time on CPU, which dominates these tests."""
  return jax.jit(fn).lower(*args).compile(
      compiler_options={"xla_backend_optimization_level": 0})


@pytest.fixture(scope="module")
def trained():
  """A tiny family, its initial state, the states after each of 4 steps on one batch with one
  fixed key (same timesteps and noise every step) and the eval outputs of the first and last
  state."""
  config = tiny_config()
  family = families.make_family(config)
  key = jax.random.key(0)
  state = compiled(family.init_state, key)(key)
  batch = {"la_image": jnp.asarray(toy_volumes(4, 3, 8))}
  step = compiled(family.train_step, state, batch, key)
  states, metrics = [state], []
  for _ in range(4):
    new, m = step(states[-1], batch, jax.random.key(7))
    states.append(new)
    metrics.append({k: float(v) for k, v in m.items()})
  evaluate = compiled(family.eval_step, state, batch)
  outputs = [jax.device_get(evaluate(s, batch)) for s in (states[0], states[-1])]
  return config, family, batch, states, metrics, outputs


# ------------------------------------------------------------------------------ networks
def test_output_shapes_and_zero_output_at_init(trained):
  config, family, batch, states, _, outputs = trained
  x = batch["la_image"]
  z = outputs[0]["z_sem"]
  assert z.shape == (4, config.model.z_sem_dim) and z.dtype == np.float32
  args = (states[0].params["unet"], x, jnp.array([0, 10, 500, 999]), jnp.asarray(z))
  eps = compiled(family.apply_unet, *args)(*args)
  assert eps.shape == x.shape and eps.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(eps), 0.0)  # Zero-initialised output conv.
  assert set(states[0].params) == {"encoder", "unet", "ema"}
  assert set(states[0].opt_state) == {"model"}


@pytest.mark.parametrize("head", ["pool", "flatten"])
def test_encoder_head_reads_pooled_or_all_features(head):
  """pool: Dense over the C channels averaged over (T, h, w) (reference); flatten: Dense over
  all T h w C features of the last level."""
  config = tiny_config(encoder_head=head)
  family = families.make_family(config)
  state = jax.eval_shape(family.init_state, jax.random.key(0))
  kernel = state.params["encoder"]["out"]["kernel"]
  channels = config.model.base_channels * config.model.encoder_channel_mult[-1]
  size = config.data.image_size // 2 ** (len(config.model.encoder_channel_mult) - 1)
  inputs = channels if head == "pool" else config.data.num_frames * size * size * channels
  assert kernel.shape == (inputs, config.model.z_sem_dim)


def test_time_axis_is_never_downsampled():
  """Every ResBlock and attention block of a 3-level UNet and a 4-level encoder keeps all T
  frames, while the in-plane size halves per level (abstract evaluation: nothing computed)."""
  t, s = 5, 16
  unet = diffae3d.ConditionalUNet(image_size=s, base_channels=4, channel_mult=(1, 2, 2),
                                  num_res_blocks=1, attention_resolutions=(4,))
  encoder = diffae3d.SemanticEncoder(image_size=s, base_channels=4, channel_mult=(1, 1, 2, 2),
                                     num_res_blocks=1, attention_resolutions=(8,), z_sem_dim=6)
  model = diffae3d.DiffAE3D(unet=unet, encoder=encoder)
  x = jnp.zeros((2, t, s, s, 1))
  steps_ = jnp.zeros((2,), jnp.int32)
  blocks = lambda module, name: isinstance(module, (diffae3d.ResBlock,
                                                    diffae3d.AttentionBlock))
  eps, state = jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), x, x, steps_, capture_intermediates=blocks))
  assert eps.shape == x.shape
  shapes = [leaf.shape for leaf in jax.tree.leaves(state["intermediates"])]
  assert len(shapes) > 20
  assert all(shape[1] == t for shape in shapes)
  assert {shape[2] for shape in shapes} == {16, 8, 4, 2}  # Encoder down to 2 px.
  unet_shapes = [leaf.shape for leaf in jax.tree.leaves(state["intermediates"]["unet"])]
  assert {shape[2] for shape in unet_shapes} == {16, 8, 4}


def test_paper_variant_has_about_21m_parameters():
  """Counted with eval_shape (no allocation). The count is every float of the two networks:
  3x3x3 and 1x1x1 conv kernels and biases, GroupNorm scales and offsets, the timestep MLP,
  the per-block time (2C) and z_sem (C) modulation layers, the single-head attention qkv and
  output projections (weights and biases) and the encoder's final dense layer; the EMA copy
  and optimizer moments are not counted. Closed form of the reference structure: UNet
  16,561,441 + encoder 4,276,032 = 20,837,473. The tolerance of +-0.5M around 21M is the
  rounding of the reference's "about 21M" to two significant digits."""
  config = get_config("diffae3d:paper")
  family = families.make_family(config)
  shapes = jax.eval_shape(family.init_state, jax.random.key(0))
  unet, encoder = count(shapes.params["unet"]), count(shapes.params["encoder"])
  assert (unet, encoder) == (16_561_441, 4_276_032)
  assert abs(unet + encoder - 21_000_000) <= 500_000
  assert count(shapes.params["ema"]) == unet + encoder
  assert (config.data.num_frames, config.data.image_size) == (50, 128)
  assert tuple(config.model.channel_mult) == (1, 1, 2, 3, 4)
  assert tuple(config.model.encoder_channel_mult) == (1, 1, 2, 3, 4, 4)
  assert config.model.z_sem_dim == 128 and config.train.batch_size == 9
  assert config.model.remat == "blocks"   # Fits in memory (docs/diffae3d_memory.md).
  assert config.optimizer.learning_rate == 1e-4 and config.model.ema_decay == 0.9999
  assert tuple(config.data.split) == (0.6, 0.1, 0.3) and config.data.augment.flip_prob == 0.5


def test_paper_attention_covers_12800_tokens_in_chunks():
  """At the reference size the 16 px attention sees T*16*16 = 12,800 tokens (abstract)."""
  block = diffae3d.AttentionBlock(num_heads=1, block_size=1024)
  x = jax.ShapeDtypeStruct((1, 50, 16, 16, 96), jnp.float32)
  variables = jax.eval_shape(block.init, jax.random.key(0), x)
  assert variables["params"]["qkv"]["kernel"].shape == (96, 288)
  assert jax.eval_shape(block.apply, variables, x).shape == x.shape


def test_chunked_attention_equals_naive_attention():
  rng = np.random.default_rng(3)
  shape = (2, 37, 2, 5)  # 37 tokens: not a multiple of the block size.
  q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3))
  loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

  def compare(q, k, v):
    chunked = lambda *a: attention.chunked_attention(*a, 8)
    return (attention.naive_attention(q, k, v), chunked(q, k, v),
            attention.chunked_attention(q, k, v, 64),
            jax.grad(loss(attention.naive_attention), (0, 1, 2))(q, k, v),
            jax.grad(loss(chunked), (0, 1, 2))(q, k, v))

  naive, chunked, single_block, naive_grads, chunked_grads = compiled(compare, q, k, v)(q, k, v)
  np.testing.assert_allclose(chunked, naive, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(single_block, naive, atol=1e-5, rtol=1e-5)
  for got, want in zip(chunked_grads, naive_grads):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_chunked_attention_visits_the_heads_in_a_loop_or_at_once_with_one_result():
  """head_loop "map" (the CPU's choice: 2D products per example and head) and "vmap" (batched
  products, the accelerators' choice) compute the same values and gradients; "auto" is "map"
  on this CPU."""
  rng = np.random.default_rng(5)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 21, 3, 4)), jnp.float32) for _ in range(3))
  def value_and_grads(loop):
    loss = lambda q, k, v: jnp.sum(jnp.sin(attention.chunked_attention(q, k, v, 8, loop)))
    return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v)

  results = {loop: value_and_grads(loop) for loop in ("map", "vmap")}
  for got, want in zip(jax.tree.leaves(results["map"]), jax.tree.leaves(results["vmap"])):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  assert attention.resolve_head_loop("auto") == "map"
  with pytest.raises(ValueError, match="head loop"):
    attention.resolve_head_loop("scan")


def test_chunked_attention_in_bfloat16_keeps_the_dtype_and_the_values():
  """bfloat16 queries, keys and values: outputs and gradients in bfloat16, within bfloat16's
  precision of the float32 attention (logits and softmax are float32 inside)."""
  rng = np.random.default_rng(4)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 45, 1, 8)), jnp.float32) for _ in range(3))
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2)
  chunked = lambda *a: attention.chunked_attention(*a, 16)
  low = [a.astype(jnp.bfloat16) for a in (q, k, v)]
  out = jax.jit(chunked)(*low)
  grads = jax.jit(jax.grad(loss(chunked), (0, 1, 2)))(*low)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  np.testing.assert_allclose(np.asarray(out, np.float32), attention.naive_attention(q, k, v),
                             atol=0.05, rtol=0.05)
  for got, want in zip(grads, jax.grad(loss(attention.naive_attention), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.1, rtol=0.05)


def test_chunked_attention_backward_never_holds_the_full_logit_matrix():
  """XLA's compiled memory analysis of value and gradient of a 2,048-token attention: blocks
  of 128 queries need temporaries below one 2,048 x 2,048 float32 logit matrix (16 MiB), the
  plain softmax attention several such matrices."""
  tokens, block = 2048, 128
  shape = jax.ShapeDtypeStruct((1, tokens, 1, 8), jnp.float32)
  full_matrix = tokens * tokens * 4

  def temporaries(attention):
    loss = lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v)))
    grad = jax.grad(loss, (0, 1, 2))
    return jax.jit(grad).lower(shape, shape, shape).compile().memory_analysis().temp_size_in_bytes

  assert temporaries(lambda q, k, v: attention.chunked_attention(q, k, v, block)) < full_matrix / 2
  assert temporaries(attention.naive_attention) > 2 * full_matrix


def test_frames_convolution_equals_3d_convolution():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 4, 6, 6, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 3, 5)), jnp.float32)
  frames, xla = jax.jit(lambda x, k: (diffae3d.conv3d_same(x, k, "frames"),
                                      diffae3d.conv3d_same(x, k, "xla")))(x, kernel)
  np.testing.assert_allclose(frames, xla, atol=1e-4, rtol=1e-4)


def test_remat_and_bfloat16_keep_the_parameter_tree():
  """remat="blocks" and bfloat16 compute change neither the parameter names nor their float32
  dtype; the bfloat16 network still returns float32 eps_hat."""
  trees = {}
  for remat, dtype in (("none", "float32"), ("blocks", "float32"), ("blocks", "bfloat16")):
    family = families.make_family(tiny_config(remat=remat, compute_dtype=dtype))
    x = jnp.zeros((2, 3, 8, 8, 1))
    eps, variables = jax.eval_shape(lambda: family.model.init_with_output(
        jax.random.key(0), x, x, jnp.zeros((2,), jnp.int32)))
    trees[remat, dtype] = jax.tree.map(lambda a: (a.shape, a.dtype), variables["params"])
    assert eps.dtype == jnp.float32 and eps.shape == x.shape
  first = trees["none", "float32"]
  assert all(tree == first for tree in trees.values())
  assert {leaf[1] for leaf in jax.tree.leaves(first, is_leaf=lambda a: isinstance(a, tuple))
          } == {jnp.dtype(jnp.float32)}


# ------------------------------------------------------------------------------ training
def test_train_steps_on_a_fixed_batch_decrease_the_loss(trained):
  _, _, _, states, metrics, _ = trained
  losses = [m["loss"] for m in metrics]
  assert all(m["finite"] == 1.0 for m in metrics)
  assert losses[-1] < 0.9 * losses[0], losses
  assert int(states[-1].step) == 4
  # z_sem enters only through the modulations before the zero-initialised second conv of
  # every ResBlock, behind the zero-initialised output conv: step 0 updates the output conv
  # alone, step 1 the inner zero convs, and from step 2 on the encoder receives gradients.
  assert metrics[0]["grad_norm_encoder"] == metrics[1]["grad_norm_encoder"] == 0.0
  assert metrics[2]["grad_norm_encoder"] > 0.0


def test_training_loss_is_the_p2_weighted_eps_loss(trained):
  config, family, batch, states, metrics, _ = trained
  assert config.diffusion.p2_gamma == 1.0
  np.testing.assert_allclose(np.asarray(family.loss_weights),
                             np.asarray(diffusion.p2_weights(family.schedule, 1.0, 1.0)))
  # The first step's loss from its own timesteps and noise (key 7, see the fixture).
  x = family.model_input(batch)
  t, noise, dropout_key = family.sample_step_noise(jax.random.key(7), x.shape)
  args = (family.trainable(states[0].params), x, t, noise, dropout_key)
  eps_loss = np.asarray(compiled(family.loss_terms, *args)(*args)["eps_loss"], np.float64)
  weights = np.asarray(family.loss_weights, np.float64)[np.asarray(t)]
  np.testing.assert_allclose(metrics[0]["loss"], np.mean(weights * eps_loss), rtol=1e-5)
  np.testing.assert_allclose(metrics[0]["eps_loss"], np.mean(eps_loss), rtol=1e-5)
  assert metrics[0]["loss"] < metrics[0]["eps_loss"]   # Weights below 1.


def test_ema_moves_toward_the_parameters_by_the_decay_formula(trained):
  config, family, _, states, _, _ = trained
  d = config.model.ema_decay
  leaves = lambda tree: [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(tree)]
  expected = leaves(states[0].params["ema"])
  np.testing.assert_array_equal(np.concatenate([e.ravel() for e in expected]),
                                np.concatenate([p.ravel() for p in leaves(
                                    family.trainable(states[0].params))]))
  for state in states[1:]:
    expected = [d * e + (1 - d) * p
                for e, p in zip(expected, leaves(family.trainable(state.params)))]
    for got, want in zip(leaves(state.params["ema"]), expected):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # The EMA lies between the initial and the current parameters.
  start, now = leaves(states[0].params["unet"]), leaves(states[-1].params["unet"])
  ema = leaves(states[-1].params["ema"]["unet"])
  assert sum(np.abs(e - s).sum() for e, s in zip(ema, start)) > 0
  assert sum(np.abs(e - n).sum() for e, n in zip(ema, now)) < sum(
      np.abs(s - n).sum() for s, n in zip(start, now))


def test_eval_step_metrics_and_finalize(trained):
  _, family, _, _, _, outputs = trained
  assert family.eval_metric_keys == ("eps_loss", "eps_loss_t500", "eps_loss_other_z", "ssim",
                                     "nrmse", "psnr")
  for out in outputs:
    for key in family.eval_metric_keys:
      assert out[key].shape == (4,) and np.all(np.isfinite(out[key])), key
    assert np.all(np.abs(out["ssim"]) <= 1.0) and np.all(out["nrmse"] >= 0.0)
    np.testing.assert_allclose(out["eps_loss"], out["eps_loss_t500"])
    assert out["z_sem"].shape == (4, 8)
  # At initialisation eps_hat = 0, so the eps loss is the mean square of the fixed noise.
  assert abs(np.mean(outputs[0]["eps_loss"]) - 1.0) < 0.2
  # ... whatever the code: another example's z_sem gives the same loss.
  np.testing.assert_array_equal(outputs[0]["eps_loss_other_z"], outputs[0]["eps_loss"])
  assert not np.array_equal(outputs[1]["eps_loss_other_z"], outputs[1]["eps_loss"])
  assert np.mean(outputs[1]["eps_loss"]) < np.mean(outputs[0]["eps_loss"])
  assert set(family.finalize_eval({"z_sem": outputs[1]["z_sem"]})) == {"z_sem_std"}
  assert family.finalize_eval({"z_sem": outputs[1]["z_sem"][:1]}) == {}


def test_volume_metrics_of_a_perfect_and_a_noisy_reconstruction():
  x = (toy_volumes(2, 4, 16) + 1.0) / 2.0
  metrics_fn = jax.jit(diffae3d_family.volume_metrics)
  perfect = metrics_fn(jnp.asarray(x), jnp.asarray(x))
  np.testing.assert_allclose(perfect["ssim"], 1.0, atol=1e-5)
  np.testing.assert_allclose(perfect["nrmse"], 0.0, atol=1e-6)
  noisy = x + np.random.default_rng(0).normal(0, 0.3, x.shape).astype(np.float32)
  metrics = metrics_fn(jnp.asarray(x), jnp.asarray(noisy))
  expected_nrmse = np.sqrt(((x - noisy) ** 2).sum((1, 2, 3, 4)) / (x ** 2).sum((1, 2, 3, 4)))
  np.testing.assert_allclose(metrics["nrmse"], expected_nrmse, rtol=1e-4)
  mse = ((x - noisy) ** 2).mean((1, 2, 3, 4))
  np.testing.assert_allclose(metrics["psnr"], 10 * np.log10(1 / mse), rtol=1e-4)
  assert np.all(np.asarray(metrics["ssim"]) < 0.9)
  assert diffae3d_family.ssim_window(4) == 3 and diffae3d_family.ssim_window(50) == 11


# ------------------------------------------------------------------------------ config errors
@pytest.mark.parametrize("section, field, value, message", [
    ("model", "attention_resolutions", (5,), "model.attention_resolutions"),
    ("model", "encoder_channel_mult", (1, 2, 2, 2, 2), "model.encoder_channel_mult"),
    ("model", "remat", "all", "model.remat"),
    ("model", "encoder_head", "max", "model.encoder_head"),
    ("model", "conv_impl", "im2col", "model.conv_impl"),
    ("model", "ema_decay", 1.0, "model.ema_decay"),
    ("data", "view", "sa_stack", "data.view"),
    ("eval", "loss_timesteps", (1000,), "eval.loss_timesteps"),
    ("eval", "decode_steps", 0, "eval.decode_steps"),
    ("diffusion", "p2_gamma", -1.0, "diffusion.p2_gamma"),
])
def test_bad_config_values_are_clear_errors(section, field, value, message):
  config = tiny_config()
  config[section][field] = value
  with pytest.raises(ValueError, match=message.replace(".", r"\.")):
    family = families.make_family(config)
    jax.eval_shape(family.init_state, jax.random.key(0))


def test_batch_field_and_shape_are_checked(trained):
  _, family, batch, _, _, _ = trained
  with pytest.raises(ValueError, match="la_image"):
    family.model_input({"sa_mid_image": batch["la_image"]})
  with pytest.raises(ValueError, match="data.num_frames"):
    family.model_input({"la_image": batch["la_image"][:, :2]})


def test_group_norm_groups_must_divide_channels():
  with pytest.raises(ValueError, match="GroupNorm"):
    diffae3d.num_groups(24, 16)
  assert diffae3d.num_groups(96, 32) == 32 and diffae3d.num_groups(8, 32) == 8
