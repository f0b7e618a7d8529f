"""Pure train and eval steps of the VAE family: VAE, beta-VAE, AR-VAE, Attri-VAE, Soft-IntroVAE,
AR-SIVAE.

Every step is a pure function `(state, batch, key) -> (state, metrics)`, compiled by the caller
(see `cardiac_jax.parallel`). A batch is a dict with "image" (B, H, W, C) float32 in [0, 1] and
"attributes" (B, A) float32.

Objectives (config.loss.objective):
- "vae": L = mean_i[Rec_i] + beta_kl * mean_i[KL_i] + gamma * AR(z, a) + weight_l1 * sum|theta|.
  With beta_kl = 1 the VAE, with beta_kl > 1 the beta-VAE (Higgins et al. 2017), with gamma > 0
  the AR-VAE (Pati & Lerch 2021); the L1 penalty on every parameter is Attri-VAE's. Encoder and
  decoder are updated together from the same loss.
- "soft_intro": Soft-IntroVAE (Daniel & Tamar, CVPR 2021), with gamma > 0 AR-SIVAE (Di Folco et
  al., MICCAI 2024). Per batch, the encoder is updated first (decoder frozen) with
    L_E = s (beta_rec Rec(x, x_r) + beta_kl KL(x)) + 1/4 (expELBO(x_r) + expELBO(x_f)) + gamma AR,
  where x_r = D(z), x_f = D(z_p), z_p ~ N(0, I), and the reconstructions and fakes are re-encoded
  through a stop-gradient; then the decoder (encoder frozen, already updated) with
    L_D = s (beta_rec Rec(x, x_r) + beta_kl/2 (KL(x_r) + KL(x_f))
             + gamma_r beta_rec/2 (Rec(sg x_r, x_rr) + Rec(sg x_f, x_fr))).
  s = 1 / (C H W). Each part has its own Adam optimizer. The AR term is not scaled by s.
  During the first `loss.vae_warmup_steps` steps the VAE objective (with beta_rec/beta_kl
  weights) is used instead, as the reference's `num_vae` epochs.

Networks (config.model.architecture): "soft_intro_resnet" (`cardiac_jax.models.vae`, the default)
or "attri_vae_conv" (`cardiac_jax.models.attri_vae`, Attri-VAE's convolutional beta-VAE).

BatchNorm statistics: the encoder keeps the statistics of its pass over real images, the decoder
those of its pass decoding real codes; passes over fakes never update running statistics.

Per-replica execution (the pmap backend, `axis_name` set): each replica holds B/R rows of the
global batch. Gradients are averaged over the replicas before every optimizer update, scalar
metrics are averaged, BatchNorm uses global batch statistics, the attribute-regularisation
pairs span the global batch, and every replica draws the global batch's noise and keeps its own
rows, so the update equals the one the jit backend computes on the whole batch.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from cardiac_jax import losses
from cardiac_jax.families.base import FamilyBase
from cardiac_jax.metrics import reconstruction as recon_metrics
from cardiac_jax.models import attri_vae as attri_vae_lib
from cardiac_jax.models import vae as vae_lib
from cardiac_jax.train_state import (TrainState, finish_step, make_optimizer, optimizer_step,
                                     replica_rows)

PARTS = ("encoder", "decoder")
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Plain, hashable copy of config.loss (see experiments/configs/base.py for meanings)."""
  objective: str = "vae"
  reconstruction: str = "mse"
  beta_kl: float = 1.0
  beta_rec: float = 1.0
  beta_neg: float = 256.0
  gamma_r: float = 1e-8
  scale: str = "chw"
  gamma: float = 0.0
  delta: float = 1.0
  regularized_dims: tuple[int, ...] = ()
  vae_warmup_steps: int = 0
  weight_l1: float = 0.0

  @classmethod
  def from_config(cls, loss_config) -> "LossConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in loss_config.to_dict().items() if k in fields}
    if "regularized_dims" in values:
      values["regularized_dims"] = tuple(int(d) for d in values["regularized_dims"])
    return cls(**values)


def _split(key: jax.Array, n: int) -> list[jax.Array]:
  return list(jax.random.split(key, n))


class VAEFamily(FamilyBase):
  """The VAE family for one config: model, optimizers and pure steps (`base.ModelFamily`), with
  `encode`, `decode`, `reconstruct`, `evaluate_run` and the generator hooks for analyses."""

  eval_metric_keys = ("reconstruction_loss", "kl", "mse", "psnr", "ssim")

  def __init__(self, config, bn_axis_name: str | None = None, axis_name: str | None = None):
    model_config = config.model
    self.config = config
    # Name of the replica axis when the steps run per replica (pmap); None under jit.
    self.axis_name = axis_name
    bn_axis_name = bn_axis_name or axis_name
    self.loss = LossConfig.from_config(config.loss)
    self.image_size = int(config.data.image_size)
    self.image_channels = len(config.data.channels)
    self.latent_dim = int(model_config.latent_dim)
    self.model = build_network(model_config, self.image_size, self.image_channels, bn_axis_name)
    self.tx = {part: make_optimizer(config.optimizer) for part in PARTS}
    self.skip_nonfinite = bool(config.train.skip_nonfinite)
    if self.loss.objective not in ("vae", "soft_intro"):
      raise ValueError(f"unknown loss.objective {self.loss.objective!r} (vae or soft_intro)")
    if self.loss.weight_l1 and self.loss.objective != "vae":
      raise ValueError(f"loss.weight_l1 is a term of the vae objective; loss.objective is "
                       f"{self.loss.objective!r}")
    if self.loss.gamma and not self.loss.regularized_dims:
      raise ValueError("loss.gamma > 0 needs loss.regularized_dims (one latent dimension per "
                       "entry of data.attributes)")
    if self.loss.regularized_dims:
      if len(self.loss.regularized_dims) != len(config.data.attributes):
        raise ValueError(
            f"loss.regularized_dims {self.loss.regularized_dims} must have one dimension per "
            f"data.attributes entry {tuple(config.data.attributes)}")
      if max(self.loss.regularized_dims) >= self.latent_dim:
        raise ValueError(f"loss.regularized_dims {self.loss.regularized_dims} exceed "
                         f"model.latent_dim {self.latent_dim}")
    chw = self.image_size * self.image_size * self.image_channels
    hw = self.image_size * self.image_size
    self.scale = {"chw": 1.0 / chw, "hw": 1.0 / hw, "none": 1.0}[self.loss.scale]
    self.warmup_steps = self.loss.vae_warmup_steps

  # ----------------------------------------------------------------------- model application
  def _apply(self, part: str, params, batch_stats, inputs, train: bool,
             update_stats: bool = False):
    """Runs the encoder or decoder alone; with `update_stats` also returns its new BN stats."""
    variables = {"params": {part: params[part]}, "batch_stats": {part: batch_stats[part]}}
    fn = lambda module, inp: getattr(module, part)(inp, train)
    if not train:
      return self.model.apply(variables, inputs, method=fn)
    out, updates = self.model.apply(variables, inputs, method=fn, mutable=["batch_stats"])
    return (out, updates["batch_stats"][part]) if update_stats else out

  def _encode(self, params, batch_stats, x, train: bool, update_stats: bool = False):
    return self._apply("encoder", params, batch_stats, x, train, update_stats)

  def _decode(self, params, batch_stats, z, train: bool, update_stats: bool = False):
    return self._apply("decoder", params, batch_stats, z, train, update_stats)

  # ------------------------------------------------------------------------------ state
  def init_state(self, key: jax.Array) -> TrainState:
    """Fresh state for a run whose root key is `key`."""
    init_key = jax.random.fold_in(key, 0)
    x = jnp.zeros((1, self.image_size, self.image_size, self.image_channels), jnp.float32)
    variables = self.model.init(init_key, x, train=False)
    params = dict(variables["params"])
    batch_stats = dict(variables.get("batch_stats", {part: {} for part in PARTS}))
    opt_state = {part: self.tx[part].init(params[part]) for part in PARTS}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=opt_state, rng=key,
                      skipped_nonfinite=jnp.zeros((), jnp.int32))

  # ------------------------------------------------------------------------------ inference
  def encode(self, state: TrainState, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, H, W, C) -> posterior (mu, logvar), BatchNorm in inference mode."""
    return self._encode(state.params, state.batch_stats, images, train=False)

  def decode(self, state: TrainState, z: jax.Array) -> jax.Array:
    """(B, latent_dim) -> (B, H, W, C) images, BatchNorm in inference mode."""
    return self._decode(state.params, state.batch_stats, z, train=False)

  def reconstruct(self, state: TrainState, images: jax.Array) -> jax.Array:
    """Decodes the posterior mean: the deterministic reconstruction used for evaluation."""
    mu, _ = self.encode(state, images)
    return self.decode(state, mu)

  def eval_step(self, state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-example evaluation quantities: (B,) losses, (B, C) image metrics of the
    posterior-mean reconstruction, the reconstructions and the codes."""
    x = batch["image"]
    mu, logvar = self.encode(state, x)
    recon = self.decode(state, mu)
    return {
        "reconstruction_loss": losses.reconstruction_per_sample(x, recon,
                                                                 self.loss.reconstruction),
        "kl": losses.kl_per_sample(mu, logvar),
        "mse": recon_metrics.mse(x, recon), "psnr": recon_metrics.psnr(x, recon),
        "ssim": recon_metrics.ssim(x, recon),
        "mu": mu, "logvar": logvar, "reconstruction": recon,
    }

  # ------------------------------------------------------------------------ analysis hooks
  def generator(self, state: TrainState) -> Callable[[jax.Array], jax.Array]:
    """The decoder clipped to [0, 1]: its input is z ~ N(0, I), like a GAN generator's."""
    return lambda z: jnp.clip(self.decode(state, z), 0.0, 1.0)

  def _first_layer(self, state: TrainState) -> dict[str, Any]:
    """The decoder's first Dense layer ("from_latent": kernel (latent_dim, F), bias (F,))."""
    decoder = state.params.get("decoder", {}) if hasattr(state.params, "get") else {}
    if "from_latent" not in decoder:
      raise ValueError(f"the VAE state has no decoder/from_latent layer (decoder has "
                       f"{sorted(decoder)})")
    return decoder["from_latent"]

  def first_linear_kernel(self, state: TrainState) -> jax.Array:
    return jnp.asarray(self._first_layer(state)["kernel"])

  def first_block_features(self, state: TrainState, z: jax.Array) -> jax.Array:
    layer = self._first_layer(state)
    return jnp.maximum(z @ jnp.asarray(layer["kernel"]) + jnp.asarray(layer["bias"]), 0.0)

  def evaluate_run(self, state, mesh, split_batches, out_dir, options, header) -> dict:
    """Reconstruction and interpretability metrics with their figures
    (`families.vae_evaluation`)."""
    from cardiac_jax.families import vae_evaluation  # pylint: disable=g-import-not-at-top
    return vae_evaluation.evaluate(self, state, mesh, split_batches, out_dir, options, header)

  def evaluation_summary(self, result: dict) -> str:
    from cardiac_jax.families import vae_evaluation  # pylint: disable=g-import-not-at-top
    return vae_evaluation.summary(result)

  def save_figures(self, state: TrainState, examples: dict[str, Any], figures_dir: str,
                   step: int, key: jax.Array) -> None:
    """Inputs next to their reconstructions, and decoded prior samples."""
    from cardiac_jax import viz  # pylint: disable=g-import-not-at-top (matplotlib on demand)
    images = np.asarray(examples["image"])
    recon = np.asarray(jax.jit(self.reconstruct)(state, jnp.asarray(images)))
    viz.save_reconstruction_figure(os.path.join(figures_dir, f"reconstructions_{step:07d}.png"),
                                   images, recon)
    z = jax.random.normal(key, (min(16, max(len(images), 8)), self.latent_dim))
    samples = np.asarray(jax.jit(self.decode)(state, z))
    viz.save_samples_figure(os.path.join(figures_dir, f"samples_{step:07d}.png"), samples)

  # ------------------------------------------------------------------------------ training
  def _ar(self, z, attributes):
    if not self.loss.gamma:
      return jnp.zeros((), jnp.float32)
    if self.axis_name is not None:  # Pairs over the global batch, as under jit.
      z = jax.lax.all_gather(z, self.axis_name, tiled=True)
      attributes = jax.lax.all_gather(attributes, self.axis_name, tiled=True)
    return losses.attribute_regularization(z, attributes, self.loss.regularized_dims,
                                           self.loss.delta)

  def _reparameterize(self, key, mu, logvar):
    """z = mu + sigma * eps with eps from `_normal` (this replica's rows under pmap)."""
    return mu + jnp.exp(0.5 * logvar) * self._normal(key, mu.shape, mu.dtype)

  def _normal(self, key, shape, dtype=jnp.float32):
    """N(0, I) noise for this replica's rows (the global batch's numbers, as under jit)."""
    return replica_rows(lambda full: jax.random.normal(key, full, dtype), shape, self.axis_name)

  def _optimizer_step(self, state: TrainState, part: str, grads, params):
    """Returns (params, opt_state, grads): grads averaged over the replicas (if any) first."""
    return optimizer_step(self.tx[part], grads, state.opt_state[part], params, self.axis_name)

  def _finish(self, state: TrainState, params, opt_state, batch_stats, grads,
              metrics: Metrics) -> tuple[TrainState, Metrics]:
    """Adds norms, checks finiteness, advances the step (or skips a non-finite update)."""
    new_state = state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state)
    return finish_step(state, new_state, grads, metrics, skip_nonfinite=self.skip_nonfinite,
                       axis_name=self.axis_name)

  def vae_train_step(self, state: TrainState, batch: dict[str, jax.Array],
                     key: jax.Array) -> tuple[TrainState, Metrics]:
    """One joint encoder+decoder update of the VAE objective (module docstring)."""
    x, attributes = batch["image"], batch["attributes"]
    weighted = self.loss.objective == "soft_intro"  # SIVAE warm-up uses beta_rec/beta_kl.
    rec_weight = self.loss.beta_rec if weighted else 1.0

    def loss_fn(params):
      (mu, logvar), enc_stats = self._encode(params, state.batch_stats, x, True, update_stats=True)
      z = self._reparameterize(key, mu, logvar)
      recon, dec_stats = self._decode(params, state.batch_stats, z, True, update_stats=True)
      rec = jnp.mean(losses.reconstruction_per_sample(x, recon, self.loss.reconstruction))
      kl = jnp.mean(losses.kl_per_sample(mu, logvar))
      ar = self._ar(z, attributes)
      scale = self.scale if weighted else 1.0
      loss = scale * (rec_weight * rec + self.loss.beta_kl * kl) + self.loss.gamma * ar
      metrics = {"loss": loss, "reconstruction_loss": rec, "kl": kl, "ar_loss": ar,
                 "mse": rec / (x[0].size)}
      if self.loss.weight_l1:
        penalty = l1_norm(params)
        loss = loss + self.loss.weight_l1 * penalty
        metrics.update(loss=loss, weight_l1_norm=penalty)
      return loss, ({"encoder": enc_stats, "decoder": dec_stats}, metrics)

    grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
    params, opt_state = {}, {}
    for part in PARTS:
      params[part], opt_state[part], grads[part] = self._optimizer_step(
          state, part, grads[part], state.params[part])
    return self._finish(state, params, opt_state, batch_stats, grads, metrics)

  def soft_intro_encoder_loss(self, enc_params, state: TrainState, x: jax.Array,
                              attributes: jax.Array, z_prior: jax.Array, keys):
    """L_E of Soft-IntroVAE (+ gamma AR) as a function of the encoder parameters only.

    keys: (k_real, k_rec, k_fake) for sampling z, z_r and z_f. Returns (loss, aux) where aux
    holds the sampled z, the new BatchNorm statistics, scalar metrics and the intermediate
    tensors (for tests that re-evaluate the formula).
    """
    stats = state.batch_stats
    k_real, k_rec, k_fake = keys
    params = {"encoder": enc_params, "decoder": state.params["decoder"]}
    fake = self._decode(params, stats, z_prior, True)
    posterior, enc_stats = self._encode(params, stats, x, True, update_stats=True)
    z = self._reparameterize(k_real, *posterior)
    recon, dec_stats = self._decode(params, stats, z, True, update_stats=True)
    loss, aux = self._soft_intro_encoder_terms(enc_params, state, x, attributes, posterior, z,
                                               recon, fake, (k_rec, k_fake))
    return loss, {**aux, "z": z, "stats": {"encoder": enc_stats, "decoder": dec_stats}}

  def _soft_intro_encoder_terms(self, enc_params, state: TrainState, x: jax.Array,
                                attributes: jax.Array, posterior, z: jax.Array,
                                recon: jax.Array, fake: jax.Array, keys):
    """L_E given the encoder's posterior (mu, logvar) of x, its sample z, x_r = D(z) and
    x_f = D(z_p): the arguments through which the train step chains L_E's gradient to the
    encoder, so that it decodes z and z_p once for both updates. keys: (k_rec, k_fake)."""
    cfg, s, stats = self.loss, self.scale, state.batch_stats
    k_rec, k_fake = keys
    rec_loss = lambda a, b: losses.reconstruction_per_sample(a, b, cfg.reconstruction)
    kl = losses.kl_per_sample
    mu, logvar = posterior
    params = {"encoder": enc_params, "decoder": state.params["decoder"]}
    mu_r, logvar_r = self._encode(params, stats, jax.lax.stop_gradient(recon), True)
    mu_f, logvar_f = self._encode(params, stats, jax.lax.stop_gradient(fake), True)
    z_r = self._reparameterize(k_rec, mu_r, logvar_r)
    z_f = self._reparameterize(k_fake, mu_f, logvar_f)
    recon_rec = self._decode(params, stats, z_r, True)
    fake_rec = self._decode(params, stats, z_f, True)
    rec_real = jnp.mean(rec_loss(x, recon))
    kl_real = jnp.mean(kl(mu, logvar))
    loss_real = s * (cfg.beta_rec * rec_real + cfg.beta_kl * kl_real)
    energy_rec = cfg.beta_rec * rec_loss(recon, recon_rec) + cfg.beta_neg * kl(mu_r, logvar_r)
    energy_fake = cfg.beta_rec * rec_loss(fake, fake_rec) + cfg.beta_neg * kl(mu_f, logvar_f)
    loss_fake = 0.25 * (losses.soft_intro_exp_elbo(energy_rec, s)
                        + losses.soft_intro_exp_elbo(energy_fake, s))
    ar = self._ar(z, attributes)
    loss = loss_real + loss_fake + cfg.gamma * ar
    metrics = {"encoder_loss": loss, "loss_real": loss_real, "loss_fake": loss_fake,
               "reconstruction_loss": rec_real, "kl": kl_real, "ar_loss": ar,
               "kl_reconstructed": jnp.mean(kl(mu_r, logvar_r)),
               "kl_fake": jnp.mean(kl(mu_f, logvar_f)), "mse": rec_real / x[0].size}
    tensors = {"mu": mu, "logvar": logvar, "z": z, "recon": recon, "fake": fake,
               "mu_r": mu_r, "logvar_r": logvar_r, "mu_f": mu_f, "logvar_f": logvar_f,
               "recon_rec": recon_rec, "fake_rec": fake_rec}
    return loss, {"metrics": metrics, "tensors": tensors}

  def soft_intro_decoder_loss(self, dec_params, enc_params, state: TrainState, x: jax.Array,
                              z: jax.Array, z_prior: jax.Array, keys):
    """L_D of Soft-IntroVAE as a function of the decoder parameters only.

    The encoder parameters are constants, but the gradient flows through the encoder's
    activations on x_r and x_f into the decoder. keys: (k_rec, k_fake). Returns (loss, aux).
    """
    params = {"encoder": enc_params, "decoder": dec_params}
    recon = self._decode(params, state.batch_stats, z, True)
    fake = self._decode(params, state.batch_stats, z_prior, True)
    return self._soft_intro_decoder_terms(dec_params, enc_params, state, x, recon, fake, keys)

  def _soft_intro_decoder_terms(self, dec_params, enc_params, state: TrainState, x: jax.Array,
                                recon: jax.Array, fake: jax.Array, keys):
    """L_D given x_r = D(z) and x_f = D(z_p) (the train step chains their gradients to the
    decoder through the forward passes it shares with L_E). keys: (k_rec, k_fake)."""
    cfg, s, stats = self.loss, self.scale, state.batch_stats
    k_rec, k_fake = keys
    rec_loss = lambda a, b: losses.reconstruction_per_sample(a, b, cfg.reconstruction)
    kl = losses.kl_per_sample
    params = {"encoder": enc_params, "decoder": dec_params}
    mu_r, logvar_r = self._encode(params, stats, recon, True)
    mu_f, logvar_f = self._encode(params, stats, fake, True)
    z_r = jax.lax.stop_gradient(self._reparameterize(k_rec, mu_r, logvar_r))
    z_f = jax.lax.stop_gradient(self._reparameterize(k_fake, mu_f, logvar_f))
    recon_rec = self._decode(params, stats, z_r, True)
    fake_rec = self._decode(params, stats, z_f, True)
    rec = jnp.mean(rec_loss(x, recon))
    kl_terms = jnp.mean(kl(mu_r, logvar_r)) + jnp.mean(kl(mu_f, logvar_f))
    rec_rec = (jnp.mean(rec_loss(jax.lax.stop_gradient(recon), recon_rec))
               + jnp.mean(rec_loss(jax.lax.stop_gradient(fake), fake_rec)))
    loss = s * (cfg.beta_rec * rec + 0.5 * cfg.beta_kl * kl_terms
                + 0.5 * cfg.gamma_r * cfg.beta_rec * rec_rec)
    tensors = {"recon": recon, "fake": fake, "mu_r": mu_r, "logvar_r": logvar_r,
               "mu_f": mu_f, "logvar_f": logvar_f, "recon_rec": recon_rec,
               "fake_rec": fake_rec}
    return loss, {"metrics": {"decoder_loss": loss}, "tensors": tensors}

  def soft_intro_train_step(self, state: TrainState, batch: dict[str, jax.Array],
                            key: jax.Array) -> tuple[TrainState, Metrics]:
    """One Soft-IntroVAE encoder update followed by one decoder update (module docstring).

    The gradients are those of `soft_intro_encoder_loss` and `soft_intro_decoder_loss`, but
    x_r = D(z) and x_f = D(z_p) are decoded once for both: the decoder step's forward passes on
    z and z_p see the same parameters, codes and batch statistics as the encoder step's. Each
    pass keeps its VJP; L_E's gradient is chained through x_r, z and (mu, logvar) to the
    encoder, L_D's through x_r and x_f to the decoder. The program has two of its thirteen
    network passes fewer (XLA had merged one of the two as identical instructions: one pass,
    3 % of the step, docs/implementation_notes.md)."""
    x, attributes = batch["image"], batch["attributes"]
    k_prior, k_real, k_rec, k_fake, k_drec, k_dfake = _split(key, 6)
    z_prior = self._normal(k_prior, (x.shape[0], self.latent_dim), jnp.float32)
    stats, encoder, decoder = state.batch_stats, state.params["encoder"], state.params["decoder"]
    with_encoder = lambda dec: {"encoder": encoder, "decoder": dec}
    posterior, posterior_vjp, enc_stats = jax.vjp(
        lambda enc: self._encode({"encoder": enc, "decoder": decoder}, stats, x, True,
                                 update_stats=True), encoder, has_aux=True)
    z, z_vjp = jax.vjp(lambda mu, logvar: self._reparameterize(k_real, mu, logvar), *posterior)
    recon, recon_vjp, dec_stats = jax.vjp(
        lambda dec, code: self._decode(with_encoder(dec), stats, code, True, update_stats=True),
        decoder, z, has_aux=True)
    fake, fake_vjp = jax.vjp(lambda dec: self._decode(with_encoder(dec), stats, z_prior, True),
                             decoder)

    (g_direct, g_posterior, g_z, g_recon), enc_aux = jax.grad(
        self._soft_intro_encoder_terms, argnums=(0, 4, 5, 6), has_aux=True)(
            encoder, state, x, attributes, posterior, z, recon, fake, (k_rec, k_fake))
    g_z = g_z + recon_vjp(g_recon)[1]
    g_posterior = jax.tree.map(jnp.add, g_posterior, z_vjp(g_z))
    enc_grads = jax.tree.map(jnp.add, g_direct, posterior_vjp(g_posterior)[0])
    new_encoder, enc_opt, enc_grads = self._optimizer_step(state, "encoder", enc_grads, encoder)

    # The decoder step sees the updated encoder and the (constant) codes of the real batch.
    (g_direct, g_recon, g_fake), dec_aux = jax.grad(
        self._soft_intro_decoder_terms, argnums=(0, 4, 5), has_aux=True)(
            decoder, new_encoder, state, x, recon, fake, (k_drec, k_dfake))
    dec_grads = jax.tree.map(lambda a, b, c: a + b + c, g_direct, recon_vjp(g_recon)[0],
                             fake_vjp(g_fake)[0])
    new_decoder, dec_opt, dec_grads = self._optimizer_step(state, "decoder", dec_grads, decoder)
    metrics = {**enc_aux["metrics"], **dec_aux["metrics"],
               "loss": enc_aux["metrics"]["encoder_loss"]}
    return self._finish(state, {"encoder": new_encoder, "decoder": new_decoder},
                        {"encoder": enc_opt, "decoder": dec_opt},
                        {"encoder": enc_stats, "decoder": dec_stats},
                        {"encoder": enc_grads, "decoder": dec_grads}, metrics)

  @property
  def train_step(self) -> Callable[..., tuple[TrainState, Metrics]]:
    if self.loss.objective == "soft_intro":
      return self.soft_intro_train_step
    return self.vae_train_step

  @property
  def warmup_train_step(self) -> Callable[..., tuple[TrainState, Metrics]] | None:
    if self.loss.objective == "soft_intro" and self.loss.vae_warmup_steps:
      return self.vae_train_step
    return None



def l1_norm(params) -> jax.Array:
  """sum |theta| over every parameter, written sign(theta) * theta so that its gradient at 0 is 0
  (as PyTorch's L1 loss of the Attri-VAE reference, whose biases start at 0)."""
  leaves = jax.tree.leaves(params)
  return sum(jnp.sum(jax.lax.stop_gradient(jnp.sign(p)) * p) for p in leaves)


# config.model.architecture -> the network's builder: the residual Soft-IntroVAE model that
# the VAE, beta-VAE, AR-VAE, Soft-IntroVAE and AR-SIVAE configs share, or Attri-VAE's conv net.
ARCHITECTURES = ("soft_intro_resnet", "attri_vae_conv")


def build_network(model_config, image_size: int, image_channels: int,
                  bn_axis_name: str | None = None):
  """The encoder/decoder module named by model_config.architecture (default
  "soft_intro_resnet")."""
  architecture = model_config.get("architecture", "soft_intro_resnet")
  remat = model_config.get("remat", "none")
  dtype = jnp.dtype(model_config.compute_dtype)
  if architecture == "soft_intro_resnet":
    return vae_lib.VAE(
        channels=tuple(model_config.channels), latent_dim=int(model_config.latent_dim),
        image_size=image_size, image_channels=image_channels,
        output_activation=model_config.output_activation, conv_impl=model_config.conv_impl,
        dtype=dtype, bn_axis_name=bn_axis_name, initializer=model_config.initializer,
        remat=remat)
  if architecture == "attri_vae_conv":
    if remat != "none":
      raise ValueError(f"model.remat={remat!r}: the attri_vae_conv network has no residual "
                       "blocks to rematerialise (use model.remat=none)")
    attri_vae_lib.check_image_size(image_size, len(model_config.channels))
    return attri_vae_lib.AttriVAE(
        channels=tuple(model_config.channels), latent_dim=int(model_config.latent_dim),
        image_size=image_size, image_channels=image_channels,
        bottleneck_features=int(model_config.bottleneck_features),
        output_activation=model_config.output_activation, conv_impl=model_config.conv_impl,
        dtype=dtype, initializer=model_config.initializer)
  raise ValueError(f"unknown model.architecture {architecture!r}; known: {ARCHITECTURES}")
