"""Loss terms and the Soft-IntroVAE updates against direct numpy evaluations of the formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cardiac_jax import families, losses
from cardiac_jax.families import vae as vae_family
from experiments import benchmark
from experiments.configs import get_config

RNG = np.random.default_rng(1234)
MU = RNG.normal(size=(5, 4)).astype(np.float32)
LOGVAR = (0.3 * RNG.normal(size=(5, 4))).astype(np.float32)
X = RNG.uniform(size=(5, 6, 6, 2)).astype(np.float32)
Y = RNG.uniform(0.01, 0.99, size=(5, 6, 6, 2)).astype(np.float32)


def np_kl(mu, logvar):
  return -0.5 * np.sum(1 + logvar - mu ** 2 - np.exp(logvar), axis=-1)


def np_rec(x, y):
  return np.sum((x - y) ** 2, axis=(1, 2, 3))


def np_ar(z, a, delta):
  m = len(z)
  total = 0.0
  for i in range(m):
    for j in range(m):
      total += abs(np.tanh(delta * (z[i] - z[j])) - np.sign(a[i] - a[j]))
  return total / m ** 2


def test_kl_matches_formula():
  np.testing.assert_allclose(losses.kl_per_sample(MU, LOGVAR), np_kl(MU, LOGVAR), rtol=1e-5)
  assert np.allclose(losses.kl_per_sample(np.zeros((2, 3)), np.zeros((2, 3))), 0.0)


def test_reconstruction_mse_and_bce_match_formula():
  np.testing.assert_allclose(losses.reconstruction_per_sample(X, Y), np_rec(X, Y), rtol=1e-5)
  bce = -np.sum(X * np.log(Y) + (1 - X) * np.log(1 - Y), axis=(1, 2, 3))
  np.testing.assert_allclose(losses.reconstruction_per_sample(X, Y, "bce"), bce, rtol=1e-4)
  with pytest.raises(ValueError, match="unknown reconstruction"):
    losses.reconstruction_per_sample(X, Y, "l1")


@pytest.mark.parametrize("delta", [1.0, 10.0])
def test_attribute_regularization_matches_pairwise_formula(delta):
  z = RNG.normal(size=(7, 5)).astype(np.float32)
  a = RNG.normal(size=(7, 2)).astype(np.float32)
  a[3, 1] = a[4, 1]  # A tie: sign(0) = 0.
  expected = np_ar(z[:, 2], a[:, 0], delta) + np_ar(z[:, 0], a[:, 1], delta)
  got = losses.attribute_regularization(jnp.asarray(z), jnp.asarray(a), (2, 0), delta)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # A latent that orders the batch exactly like the attribute (large delta) costs ~0 per pair
  # beyond the diagonal-free terms.
  ordered = losses.attribute_regularization_pair(jnp.asarray(a[:, 0] * 100), jnp.asarray(a[:, 0]),
                                                 10.0)
  assert float(ordered) < 1e-3


def test_exp_elbo_matches_formula():
  energy = np.array([10.0, 200.0, 3000.0], np.float32)
  s = 1.0 / 72
  np.testing.assert_allclose(losses.soft_intro_exp_elbo(energy, s),
                             np.mean(np.exp(-2 * s * energy)), rtol=1e-6)


@pytest.fixture(scope="module")
def sivae():
  config = get_config("vae:smoke")
  config.data.channels = ("ed", "es")
  config.data.image_size, config.model.channels = 16, (4, 8)
  config.loss.objective = "soft_intro"
  config.loss.reconstruction = "mse"  # The reference's loss, which np_rec evaluates.
  config.loss.beta_rec, config.loss.beta_kl, config.loss.beta_neg = 0.8, 1.0, 64.0
  config.loss.gamma_r = 1e-3  # Large enough to be visible in the check.
  config.loss.gamma, config.loss.delta, config.loss.regularized_dims = 0.1, 1.0, (0, 1, 2)
  family = families.make_family(config)
  state = family.init_state(jax.random.key(0))
  x = jnp.asarray(RNG.uniform(size=(4, 16, 16, 2)).astype(np.float32))
  attributes = jnp.asarray(RNG.normal(size=(4, 3)).astype(np.float32))
  return config, family, state, x, attributes


def test_soft_intro_encoder_loss_matches_formula(sivae):
  config, family, state, x, attributes = sivae
  cfg = config.loss
  z_prior = jax.random.normal(jax.random.key(5), (4, family.latent_dim))
  keys = tuple(jax.random.split(jax.random.key(6), 3))
  loss, aux = family.soft_intro_encoder_loss(state.params["encoder"], state, x, attributes,
                                             z_prior, keys)
  t = {k: np.asarray(v, np.float64) for k, v in aux["tensors"].items()}
  xn, s = np.asarray(x, np.float64), 1.0 / (16 * 16 * 2)
  loss_real = s * (cfg.beta_rec * np_rec(xn, t["recon"]).mean()
                   + cfg.beta_kl * np_kl(t["mu"], t["logvar"]).mean())
  e_r = cfg.beta_rec * np_rec(t["recon"], t["recon_rec"]) + cfg.beta_neg * np_kl(t["mu_r"],
                                                                               t["logvar_r"])
  e_f = cfg.beta_rec * np_rec(t["fake"], t["fake_rec"]) + cfg.beta_neg * np_kl(t["mu_f"],
                                                                             t["logvar_f"])
  loss_fake = 0.25 * (np.exp(-2 * s * e_r).mean() + np.exp(-2 * s * e_f).mean())
  an = np.asarray(attributes, np.float64)
  ar = sum(np_ar(t["z"][:, d], an[:, k], cfg.delta) for k, d in enumerate((0, 1, 2)))
  np.testing.assert_allclose(float(aux["metrics"]["loss_real"]), loss_real, rtol=1e-4)
  np.testing.assert_allclose(float(aux["metrics"]["loss_fake"]), loss_fake, rtol=1e-4)
  np.testing.assert_allclose(float(aux["metrics"]["ar_loss"]), ar, rtol=1e-4)
  np.testing.assert_allclose(float(loss), loss_real + loss_fake + cfg.gamma * ar, rtol=1e-4)
  # z is the reparameterised sample of the posterior of x.
  eps = (t["z"] - t["mu"]) / np.exp(0.5 * t["logvar"])
  assert 0.3 < eps.std() < 2.0


def test_soft_intro_decoder_loss_matches_formula(sivae):
  config, family, state, x, _ = sivae
  cfg = config.loss
  z = jax.random.normal(jax.random.key(7), (4, family.latent_dim))
  z_prior = jax.random.normal(jax.random.key(8), (4, family.latent_dim))
  keys = tuple(jax.random.split(jax.random.key(9), 2))
  loss, aux = family.soft_intro_decoder_loss(state.params["decoder"], state.params["encoder"],
                                             state, x, z, z_prior, keys)
  t = {k: np.asarray(v, np.float64) for k, v in aux["tensors"].items()}
  xn, s = np.asarray(x, np.float64), 1.0 / (16 * 16 * 2)
  expected = s * (cfg.beta_rec * np_rec(xn, t["recon"]).mean()
                  + 0.5 * cfg.beta_kl * (np_kl(t["mu_r"], t["logvar_r"]).mean()
                                         + np_kl(t["mu_f"], t["logvar_f"]).mean())
                  + 0.5 * cfg.gamma_r * cfg.beta_rec * (np_rec(t["recon"], t["recon_rec"]).mean()
                                                        + np_rec(t["fake"], t["fake_rec"]).mean()))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-4)


def test_decoder_gradient_ignores_reencoded_codes(sivae):
  """z_r, z_f enter the decoder loss through a stop-gradient: the gradient wrt the decoder is
  unchanged when the re-encoding is replaced by its (constant) value."""
  _, family, state, x, _ = sivae
  z = jax.random.normal(jax.random.key(7), (4, family.latent_dim))
  z_prior = jax.random.normal(jax.random.key(8), (4, family.latent_dim))
  keys = tuple(jax.random.split(jax.random.key(9), 2))
  grad = jax.grad(lambda d: family.soft_intro_decoder_loss(
      d, state.params["encoder"], state, x, z, z_prior, keys)[0])(state.params["decoder"])
  norm = optax.global_norm(grad)
  assert np.isfinite(float(norm)) and float(norm) > 0


@pytest.mark.parametrize("frozen", ["encoder", "decoder"])
def test_each_update_leaves_the_other_part_unchanged(sivae, frozen):
  config, family, state, x, attributes = sivae
  family.tx = dict(family.tx)
  family.tx[frozen] = optax.set_to_zero()
  try:
    state0 = family.init_state(jax.random.key(0))
    new, metrics = jax.jit(family.train_step)(state0, {"image": x, "attributes": attributes},
                                              jax.random.key(3))
  finally:
    family.tx = {part: vae_family.make_optimizer(config.optimizer) for part in vae_family.PARTS}
  other = "decoder" if frozen == "encoder" else "encoder"
  same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), new.params[frozen],
                      state0.params[frozen])
  assert all(jax.tree.leaves(same)), f"{frozen} parameters changed without its optimizer"
  changed = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), new.params[other],
                         state0.params[other])
  assert not all(jax.tree.leaves(changed)), f"{other} parameters did not change"
  assert float(metrics["finite"]) == 1.0 and int(new.step) == 1


def _separate_updates(family, state, x, attributes, key):
  """(encoder, decoder, encoder gradient, decoder gradient) of one step written as its
  definition: jax.grad of L_E, an encoder update, then jax.grad of L_D with the new encoder."""
  k_prior, k_real, k_rec, k_fake, k_drec, k_dfake = jax.random.split(key, 6)
  z_prior = jax.random.normal(k_prior, (x.shape[0], family.latent_dim))
  g_enc, aux = jax.grad(family.soft_intro_encoder_loss, has_aux=True)(
      state.params["encoder"], state, x, attributes, z_prior, (k_real, k_rec, k_fake))
  updates, _ = family.tx["encoder"].update(g_enc, state.opt_state["encoder"],
                                           state.params["encoder"])
  encoder = optax.apply_updates(state.params["encoder"], updates)
  g_dec, _ = jax.grad(family.soft_intro_decoder_loss, has_aux=True)(
      state.params["decoder"], encoder, state, x, aux["z"], z_prior, (k_drec, k_dfake))
  updates, _ = family.tx["decoder"].update(g_dec, state.opt_state["decoder"],
                                           state.params["decoder"])
  return encoder, optax.apply_updates(state.params["decoder"], updates), g_enc, g_dec


def test_soft_intro_step_matches_separate_updates(sivae):
  """The fused step (which shares D(z) and D(z_p) between its updates) = encoder update from
  L_E, then decoder update from L_D with the new encoder: neither update touches the other
  part's parameters."""
  _, family, state, x, attributes = sivae
  key = jax.random.key(11)
  new, metrics = jax.jit(family.train_step)(family.init_state(jax.random.key(0)),
                                            {"image": x, "attributes": attributes}, key)
  encoder, decoder, g_enc, g_dec = _separate_updates(family, state, x, attributes, key)
  for got, want in ((new.params["encoder"], encoder), (new.params["decoder"], decoder)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), got, want)
  # Adam's first update is nearly sign(g): compare the gradients' norms too.
  for part, grads in (("encoder", g_enc), ("decoder", g_dec)):
    np.testing.assert_allclose(float(metrics[f"grad_norm_{part}"]),
                               float(optax.global_norm(grads)), rtol=1e-4)


def test_soft_intro_step_decodes_real_codes_and_prior_once(sivae):
  """D(z) and D(z_p) are computed once for both updates: the compiled step needs at least 1.5
  decoder passes' FLOPs fewer than the same update written as its two losses' gradients."""
  _, family, state, x, attributes = sivae
  key = jax.random.key(11)
  flops = lambda fn, *args: benchmark._flops(jax.jit(fn).lower(*args).compile())
  z = jnp.zeros((x.shape[0], family.latent_dim))
  decoder_pass = flops(lambda p: family._decode(p, state.batch_stats, z, True), state.params)
  fused = flops(family.train_step, state, {"image": x, "attributes": attributes}, key)
  separate = flops(lambda s: _separate_updates(family, s, x, attributes, key), state)
  assert fused <= separate - 0.75 * decoder_pass, (fused, separate, decoder_pass)
