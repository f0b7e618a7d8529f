"""Temporal VAE-classifier: a per-frame VAE and a classifier over the whole cardiac cycle.

Clough et al. 2019, "Global and local interpretability for cardiac MRI classification" (Fig. 1):
every frame x_t of a sequence X = [x_1 .. x_T] (the 3 central short-axis slices as channels) is
encoded independently to (mu_t, logvar_t); the decoder reconstructs each frame from its code;
the classifier maps the sequence of means M = [mu_1 .. mu_T] to one disease logit:

  per-frame dense layers (shared over t) -> concatenate the T results -> dense layers
  -> the 64-unit concept ("CAV") layer -> dense layers -> one logit.

TCAV (`cardiac_jax.interpret.tcav`) is computed on the concept layer, so the classifier exposes
`concepts(M)` and `head(concepts)` separately; `head` keeps a nonlinear layer after the
concept layer, otherwise grad_concepts(logit) would be one constant vector for every subject.

The encoder and decoder are the residual networks of `cardiac_jax.models.vae` applied to the
(B*T) frames. Segmentation input is one-hot per slice, (S, S, 3 * NUM_LABELS) channels, and the
decoder returns per-slice class logits; image input has 3 channels and a sigmoid output.

Shapes: sequences (B, T, S, S, C_in); codes (B, T, latent_dim); concepts (B, concept_units);
logits (B,).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from flax import linen as nn

from cardiac_jax.models import vae as vae_lib


class SequenceClassifier(nn.Module):
  """(B, T, latent_dim) means -> (B,) logits through the concept layer."""
  frame_units: Sequence[int] = (64, 16)
  sequence_units: Sequence[int] = (128,)
  concept_units: int = 64
  head_units: Sequence[int] = (32,)

  def setup(self):
    self.frame_layers = [nn.Dense(u, name=f"frame{i}") for i, u in enumerate(self.frame_units)]
    self.sequence_layers = [nn.Dense(u, name=f"sequence{i}")
                            for i, u in enumerate(self.sequence_units)]
    self.concept_layer = nn.Dense(self.concept_units, name="concept")
    self.head_layers = [nn.Dense(u, name=f"head{i}") for i, u in enumerate(self.head_units)]
    self.to_logit = nn.Dense(1, name="logit")

  def concepts(self, means: jax.Array) -> jax.Array:
    """(B, T, D) -> (B, concept_units) activations of the concept layer (after its ReLU)."""
    h = means
    for layer in self.frame_layers:  # Shared over frames: Dense acts on the last axis.
      h = nn.relu(layer(h))
    h = h.reshape(h.shape[0], -1)
    for layer in self.sequence_layers:
      h = nn.relu(layer(h))
    return nn.relu(self.concept_layer(h))

  def head(self, concepts: jax.Array) -> jax.Array:
    """(B, concept_units) -> (B,) logits."""
    h = concepts
    for layer in self.head_layers:
      h = nn.relu(layer(h))
    return self.to_logit(h)[..., 0]

  def __call__(self, means: jax.Array) -> jax.Array:
    return self.head(self.concepts(means))


class TemporalVAEClassifier(nn.Module):
  """Per-frame encoder/decoder and the sequence classifier as three submodules
  ("encoder", "decoder", "classifier"), so each has its own parameters and optimizer."""
  channels: Sequence[int]
  latent_dim: int
  image_size: int
  in_channels: int
  out_channels: int
  output_activation: str = "none"
  frame_units: Sequence[int] = (64, 16)
  sequence_units: Sequence[int] = (128,)
  concept_units: int = 64
  head_units: Sequence[int] = (32,)
  conv_impl: str = "auto"
  dtype: Any = None
  bn_axis_name: str | None = None
  initializer: str = "lecun_normal"

  def setup(self):
    common = dict(channels=tuple(self.channels), conv_impl=self.conv_impl, dtype=self.dtype,
                  bn_axis_name=self.bn_axis_name, initializer=self.initializer)
    self.encoder = vae_lib.Encoder(latent_dim=self.latent_dim, **common)
    self.decoder = vae_lib.Decoder(image_size=self.image_size, out_channels=self.out_channels,
                                   output_activation=self.output_activation, **common)
    self.classifier = SequenceClassifier(
        frame_units=tuple(self.frame_units), sequence_units=tuple(self.sequence_units),
        concept_units=self.concept_units, head_units=tuple(self.head_units))

  def encode(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    """(B, T, S, S, C_in) -> mu, logvar, each (B, T, latent_dim)."""
    b, t = x.shape[:2]
    mu, logvar = self.encoder(x.reshape((b * t,) + x.shape[2:]), train)
    return mu.reshape(b, t, -1), logvar.reshape(b, t, -1)

  def decode(self, z: jax.Array, train: bool) -> jax.Array:
    """(B, T, latent_dim) -> (B, T, S, S, C_out) logits (labels) or images."""
    b, t = z.shape[:2]
    out = self.decoder(z.reshape(b * t, -1), train)
    return out.reshape((b, t) + out.shape[1:])

  def classify(self, means: jax.Array) -> jax.Array:
    return self.classifier(means)

  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Creates every parameter at init: (reconstruction from mu, logits)."""
    mu, _ = self.encode(x, train)
    return self.decode(mu, train), self.classify(mu)
