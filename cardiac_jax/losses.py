"""Loss terms of the VAE family, each a pure function of arrays.

- `kl_per_sample`: KL(q(z|x) || N(0, I)) = -1/2 sum_d (1 + logvar - mu^2 - exp(logvar)).
- `reconstruction_per_sample`: per-sample sum over pixels and channels of the squared error
  (Soft-IntroVAE / AR-VAE "mse, mean" convention: batch mean of per-sample sums), or of the binary
  cross-entropy for images in [0, 1].
- `attribute_regularization`: AR-VAE (Pati & Lerch 2021): for latent dimension r assigned to
  attribute a, mean over all m^2 pairs of |tanh(delta * (z_ir - z_jr)) - sign(a_i - a_j)|,
  summed over the regularised (dimension, attribute) pairs.
- `soft_intro_exp_elbo`: the expELBO of Soft-IntroVAE (Daniel & Tamar 2021),
  mean_i exp(-2 * s * e_i) for per-sample energies e_i.
- `binary_cross_entropy_with_logits`: the classifier and GAN losses.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax


def kl_per_sample(mu: jax.Array, logvar: jax.Array) -> jax.Array:
  """(B, D), (B, D) -> (B,) KL divergence of N(mu, exp(logvar)) from N(0, I)."""
  return -0.5 * jnp.sum(1.0 + logvar - jnp.square(mu) - jnp.exp(logvar), axis=-1)


def reconstruction_per_sample(target: jax.Array, prediction: jax.Array,
                              kind: str = "mse") -> jax.Array:
  """(B, ...) images -> (B,) per-sample summed reconstruction error.

  kind "mse": sum of squared errors; "bce": binary cross-entropy of `prediction` (probabilities in
  (0, 1)) against `target` in [0, 1], clipped for numerical safety.
  """
  target = target.astype(jnp.float32)
  prediction = prediction.astype(jnp.float32)
  axes = tuple(range(1, target.ndim))
  if kind == "mse":
    return jnp.sum(jnp.square(target - prediction), axis=axes)
  if kind == "bce":
    p = jnp.clip(prediction, 1e-6, 1.0 - 1e-6)
    return -jnp.sum(target * jnp.log(p) + (1.0 - target) * jnp.log1p(-p), axis=axes)
  raise ValueError(f"unknown reconstruction loss {kind!r} (use 'mse' or 'bce')")


def attribute_regularization_pair(z_dim: jax.Array, attribute: jax.Array,
                                  delta: float) -> jax.Array:
  """AR-VAE loss for one latent dimension (B,) against one attribute (B,); a scalar."""
  latent_distance = z_dim[:, None] - z_dim[None, :]
  attribute_distance = attribute[:, None] - attribute[None, :]
  return jnp.mean(jnp.abs(jnp.tanh(delta * latent_distance) - jnp.sign(attribute_distance)))


def attribute_regularization(z: jax.Array, attributes: jax.Array, dims: Sequence[int],
                             delta: float) -> jax.Array:
  """Sum of the AR-VAE loss over the pairs (z[:, dims[k]], attributes[:, k]).

  Args:
    z: (B, D) sampled latent codes.
    attributes: (B, A) attribute values, column k regularises latent dimension dims[k].
    dims: A latent dimensions.
    delta: tanh sharpness.
  """
  if len(dims) != attributes.shape[-1]:
    raise ValueError(f"{len(dims)} regularised dimensions for {attributes.shape[-1]} attributes")
  terms = [attribute_regularization_pair(z[:, d], attributes[:, k].astype(z.dtype), delta)
           for k, d in enumerate(dims)]
  return jnp.sum(jnp.stack(terms)) if terms else jnp.zeros((), z.dtype)


def soft_intro_exp_elbo(energy: jax.Array, scale: float) -> jax.Array:
  """mean_i exp(-2 * scale * energy_i) for per-sample energies (B,)."""
  return jnp.mean(jnp.exp(-2.0 * scale * energy))


def binary_cross_entropy_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Elementwise -[y log sigmoid(l) + (1 - y) log(1 - sigmoid(l))] for targets y in [0, 1],
  stable for any logit (optax's log-sigmoid form)."""
  return optax.losses.sigmoid_binary_cross_entropy(logits, jnp.asarray(targets, jnp.float32))
