"""Noise network of the latent DDIM: an MLP with skip connections over semantic codes.

The latent DDIM of Diffusion Autoencoders (Preechakul et al., CVPR 2022; `MLPSkipNet` of the
reference code, config "latent_mlp_2048_norm_10layers") learns the distribution of the
z-normalised semantic codes z_sem in R^D, so that new codes, and with them new cines, can be
sampled. The network predicts the noise eps of z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps:
  eps_theta(z_t, t) : (B, D) x (B,) -> (B, D).

Architecture (L = num_layers >= 2, H = hidden_units, E = time_embed_dim, SiLU(x) = x sigmoid(x)):
- Timestep embedding: e_t = Dense(D)(SiLU(Dense(D)(sin_emb_E(t)))), sin_emb_E the sinusoid of
  `diffae3d.timestep_embedding` ([cos(t f), sin(t f)], f_i = 10000^(-i / (E/2))); its width is
  the code size D, as the reference's `num_channels` (no activation after the last Dense).
- Layer 0:           h = SiLU(LN((W_0 z_t + b_0) * (1 + s_0(e_t)))),           (B, H)
  layer l = 1..L-2:  h = SiLU(LN((W_l [h, z_t] + b_l) * (1 + s_l(e_t)))),      (B, H)
  layer L-1:         eps_hat = W_{L-1} [h, z_t] + b_{L-1},                     (B, D)
  with s_l(e) = Dense(H)(SiLU(e)) the timestep scale of layer l and LN a LayerNorm (eps 1e-5,
  learned scale and bias). The skip connection: the noisy input z_t is concatenated to the
  input of every layer after the first, the last (linear) one included, as the reference's
  `skip_layers = range(1, L)`; the first layer sees z_t alone. Timestep conditioning scales
  before the normalisation, (W h + b) (1 + s(e_t)), the reference's `condition_bias = 1` with
  no shift.
- No dropout (reference: 0). Initialisation as the reference's `MLPLNAct.init_weights`: every
  Dense of the layers and of their timestep scales He-normal (untruncated, variance
  2 / fan_in, zero biases; the reference keeps PyTorch's default biases); the timestep MLP has
  flax's default (LeCun-normal) kernels. The output layer is not zero-initialised: unlike the
  eps head of the image UNet, whose zero init starves the semantic encoder of gradient at the
  first step, nothing is gained here, and the reference does not.

At the reference size (D = 128, L = 10, H = 2048, E = 64) the network has 38.7M parameters.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cardiac_jax.models.diffae3d import timestep_embedding

he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class MLPSkipNet(nn.Module):
  """eps_theta(z_t, t) of the latent DDIM (module docstring).

  Attributes:
    dim: D, size of the codes (input and output).
    num_layers: L >= 2 Dense layers (L - 1 hidden layers of `hidden_units` and the output).
    hidden_units: H, width of the hidden layers.
    time_embed_dim: E, size of the sinusoidal timestep embedding.
  """
  dim: int
  num_layers: int = 10
  hidden_units: int = 2048
  time_embed_dim: int = 64

  def setup(self):
    if self.num_layers < 2:
      raise ValueError(f"num_layers must be >= 2 (one hidden layer and the output layer), got "
                       f"{self.num_layers}")
    for name in ("dim", "hidden_units", "time_embed_dim"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

  @nn.compact
  def __call__(self, z_t: jax.Array, t: jax.Array) -> jax.Array:
    """(B, D) noisy codes and (B,) int timesteps -> (B, D) float32 eps_hat."""
    if z_t.ndim != 2 or z_t.shape[-1] != self.dim:
      raise ValueError(f"z_t must be (B, {self.dim}), got shape {tuple(z_t.shape)}")
    if t.shape != z_t.shape[:1]:
      raise ValueError(f"t must be (B,) = ({z_t.shape[0]},), got shape {tuple(t.shape)}")
    z_t = z_t.astype(jnp.float32)
    emb = timestep_embedding(t, self.time_embed_dim)
    emb = nn.Dense(self.dim, name="time_dense_0")(emb)
    emb = nn.Dense(self.dim, name="time_dense_1")(nn.silu(emb))
    h = z_t
    for i in range(self.num_layers):
      if i > 0:
        h = jnp.concatenate([h, z_t], axis=-1)
      if i == self.num_layers - 1:
        return nn.Dense(self.dim, kernel_init=he_normal, name=f"layer_{i}")(h)
      h = nn.Dense(self.hidden_units, kernel_init=he_normal, name=f"layer_{i}")(h)
      scale = nn.Dense(self.hidden_units, kernel_init=he_normal,
                       name=f"time_scale_{i}")(nn.silu(emb))
      h = nn.LayerNorm(epsilon=1e-5, name=f"norm_{i}")(h * (1.0 + scale))
      h = nn.silu(h)
    raise AssertionError("unreachable")  # The loop returns at its last layer.


def num_parameters(params) -> int:
  """Number of scalars in a parameter tree."""
  return int(sum(x.size for x in jax.tree.leaves(params)))
