"""3D diffusion autoencoder on 4-chamber cine volumes (DiffAE, Preechakul et al. 2022, in 3D as
in the UK Biobank latent-phenotype study of Ometto et al. 2024).

A cine is a (T, S, S) volume with time as depth (3x3x3 convolutions, in-plane resampling only);
a semantic encoder maps it to z_sem in R^128 and a conditional UNet predicts the noise of
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps given (t, z_sem); the encoder is trained only
through the eps loss. Adam 1e-4, gradient clipping at norm 1, EMA of the parameters for
inference, horizontal flips (p = 0.5) as the only augmentation, subject split 60/10/30.
Validation: eps loss at fixed timesteps and SSIM / NRMSE / PSNR of the EMA reconstruction
(DDIM inversion then decoding) on [0, 1]. Networks: cardiac_jax.models.diffae3d; family:
cardiac_jax.families.diffae3d.

Variants:
- default: 8 frames of 32 x 32 px (the 80 px / 1.8 mm crop, area-resized), base 8, UNet
  multipliers (1, 2, 4) (8, 16, 32 channels at 32, 16, 8 px), one res block per level (two on
  the way up), attention at 8 px (512 tokens) and in the middle blocks, encoder multipliers
  (1, 2, 4, 4) (down to 4 px), z_sem 128: 1.22M parameters (UNet 0.55M, encoder 0.67M, of
  which 0.52M in the flattened head).
  Batch 4, 1,500 steps: about 40 minutes on a 2-core CPU. Four departures from the reference
  make so short a run useful (measurements: docs/configs.md, section diffae3d):
  * Adam at 1e-3 with 50 warm-up steps instead of 1e-4: a lower eps loss in a third of the steps.
  * model.encoder_head = "flatten": z_sem = Dense(all T x 4 x 4 x 32 features of the encoder's
    last level) instead of Dense(their average over (T, h, w)) ("pool", the reference, kept by
    the paper variant): the average of a group-normalised feature map hardly depends on the
    image, so the pooled code stays nearly constant across subjects and the UNet ignores it.
  * P2 loss weights lambda_t = 1 / (1 + SNR_t) (Choi et al. 2022; diffusion.p2_gamma = 1,
    p2_k = 1; the paper variant keeps the plain eps loss): the plain loss puts almost no
    gradient on the high-noise steps where z_sem decides the coarse content.
  * EMA decay 0.995 (a time constant of 200 steps) instead of 0.9999, which would leave the
    EMA near its initialisation over such a short run; no dropout in so small a model.
- paper: the reference (50 frames of 128 x 128 px at 1.8 mm, base 32, multipliers
  (1, 1, 2, 3, 4), attention at 16 px (12,800 tokens) and in the middle, encoder multipliers
  (1, 1, 2, 3, 4, 4), z_sem 128, dropout 0.1, batch 9, EMA 0.9999): 20.84M parameters
  (UNet 16.56M, encoder 4.28M); model.remat = "blocks", so that a step fits in memory.
- smoke: 4 frames of 16 x 16 px, base 8, z_sem 8, 4 steps (tests).

The model fields channels, latent_dim, output_activation and initializer of the base config
belong to the VAE-type families and are removed here; the code size is model.z_sem_dim.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import base
from experiments.configs import cine_data

# Fields of base.base_config().model that this family does not read.
_UNUSED_MODEL_FIELDS = ("channels", "latent_dim", "output_activation", "initializer")


def paper(c):
  """Reference 3D DiffAE (Ometto et al. 2024; DiffAE of Preechakul et al. 2022 in 3D)."""
  c.data.num_frames = 50
  c.data.prepare.image_size = 128
  c.data.image_size = 128
  c.model.base_channels = 32
  c.model.channel_mult = (1, 1, 2, 3, 4)      # 32, 32, 64, 96, 128 ch at 128 .. 8 px.
  c.model.num_res_blocks = 2
  c.model.attention_resolutions = (16,)
  c.model.encoder_channel_mult = (1, 1, 2, 3, 4, 4)  # Down to 4 x 4 px.
  c.model.encoder_num_res_blocks = 2
  c.model.encoder_attention_resolutions = (16,)
  c.model.encoder_head = "pool"
  c.diffusion.p2_gamma = 0.0          # The reference's unweighted eps loss.
  c.model.dropout = 0.1
  c.model.ema_decay = 0.9999
  # A step of this size needs rematerialisation to fit (docs/diffae3d_memory.md); bfloat16
  # compute (the reference trains in mixed precision) lowers its memory further.
  c.model.remat = "blocks"
  c.train.batch_size = 9
  c.train.eval_batch_size = 9
  c.optimizer.learning_rate = 1e-4
  c.optimizer.warmup_steps = 0
  c.train.num_steps = 200000          # Not stated by the reference (about a week on 4 GPUs).
  c.train.eval_every = 5000
  c.train.checkpoint_every = 5000
  c.train.figure_every = 5000
  c.eval.inversion_steps = 20
  c.eval.decode_steps = 20
  # The original DiffAE latent DDIM (FFHQ-128 template): 38.7M parameters, AdamW 1e-4 with
  # weight decay 0.01, EMA 0.9999, 101M samples (about 400k steps of 256), 20 DDIM steps per
  # sample.
  c.latent.update(hidden_units=2048, batch_size=256, learning_rate=1e-4, weight_decay=0.01,
                  ema_decay=0.9999, num_steps=400000, log_every=1000, checkpoint_every=10000,
                  sample_steps=20, image_decode_steps=20)


def smoke(c):
  """On top of base.apply_smoke (which sets the batch sizes): 4 frames of 16 px, base 8, a
  tiny latent DDIM (tests)."""
  cine_data.apply_smoke(c)
  c.model.update(base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(8,), encoder_channel_mult=(1, 2),
                 encoder_num_res_blocks=1, encoder_attention_resolutions=(), z_sem_dim=8,
                 dropout=0.0, ema_decay=0.9)
  c.optimizer.warmup_steps = 0
  c.eval.inversion_steps = 3
  c.eval.decode_steps = 3
  c.eval.loss_timesteps = (100, 600)
  c.latent.update(num_layers=3, hidden_units=16, time_embed_dim=8, batch_size=8, num_steps=20,
                  log_every=10, checkpoint_every=10, ema_decay=0.9, sample_steps=5,
                  image_decode_steps=3)


def get_config(arg=None):
  # Cine batches (data_pipelines.cine): the field of data.view, "la_image" for "la_4ch",
  # (B, T, S, S, 1) in [-1, 1] (min-max per volume, then (x - 0.5) / 0.5).
  c = cine_data.cine_config(
      "diffae3d",
      view="la_4ch",                  # "la_4ch" (reference) | "sa_mid" (mid short-axis cine).
      num_frames=8,                   # T: frames per cycle, resampled from ED.
      image_size=32,                  # S: model input size (resized from prepare.image_size).
      split=(0.6, 0.1, 0.3),          # Subject-level train / val / test fractions.
      augment={"max_shift_px": 0, "zoom_prob": 0.0, "flip_prob": 0.5})

  c.model.family = "diffae3d"
  c.model.base_channels = 8           # b: channels of the first level, sinusoid dimension.
  c.model.channel_mult = (1, 2, 4)    # UNet levels: b * m_l channels at S / 2^l px.
  c.model.num_res_blocks = 1          # Per level on the way down (+1 on the way up).
  c.model.attention_resolutions = (8,)  # In-plane sizes (px) with self-attention (UNet).
  c.model.encoder_channel_mult = (1, 2, 4, 4)  # Semantic encoder levels.
  c.model.encoder_num_res_blocks = 1
  c.model.encoder_attention_resolutions = (8,)
  c.model.encoder_head = "flatten"    # "pool" (reference) | "flatten": see the docstring.
  c.model.z_sem_dim = 128             # Semantic code size.
  c.model.time_embed_dim = 0          # E of the timestep MLP; 0 = 4 * base_channels.
  c.model.num_heads = 1               # Attention heads (reference: 1).
  c.model.attention_block_size = 1024  # Queries per block of the chunked attention.
  c.model.dropout = 0.0               # In the UNet's ResBlocks (reference: 0.1).
  c.model.ema_decay = 0.995           # Reference: 0.9999 (see the module docstring).
  for name in _UNUSED_MODEL_FIELDS:
    del c.model[name]

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.num_timesteps = 1000    # T of the linear schedule.
  c.diffusion.beta_start = 1e-4
  c.diffusion.beta_end = 0.02
  c.diffusion.p2_gamma = 1.0          # P2 loss weights 1 / (k + SNR_t)^gamma; 0 = reference.
  c.diffusion.p2_k = 1.0              # (see the module docstring).

  c.eval = ml_collections.ConfigDict()
  c.eval.inversion_steps = 10         # DDIM steps x_0 -> x_T (reference: 20).
  c.eval.decode_steps = 10            # DDIM steps x_T -> x_0 (reference: 20).
  c.eval.ddim_grid = "stride"         # DDIM grid: the reference's range(0, T, T // N), or
                                      # "even" (N steps from 0 to T - 1; cardiac_jax.diffusion).
  c.eval.loss_timesteps = (50, 250, 500, 750, 950)  # Fixed timesteps of the eval eps loss.
  c.eval.use_ema = True               # Evaluate (and draw figures of) the EMA parameters.

  # Latent DDIM over the z-normalised z_sem of the training split (cardiac_jax.latent_diffusion,
  # network cardiac_jax.models.latent_ddim), fitted and sampled by experiments.sample. Default:
  # 1.2M parameters, about a minute on a 2-core CPU. Why the constant schedule, Adam at 1e-3
  # and 50 sampling steps: docs/configs.md (diffae3d, latent DDIM).
  c.latent = ml_collections.ConfigDict()
  c.latent.num_layers = 10            # L Dense layers of the MLP with skips (reference: 10).
  c.latent.hidden_units = 256         # H, hidden width (reference: 2048).
  c.latent.time_embed_dim = 64        # Sinusoidal timestep embedding size (reference: 64).
  c.latent.num_timesteps = 1000       # T of the latent diffusion.
  c.latent.beta_start = 0.008         # Linear betas beta_start..beta_end; equal: the constant
  c.latent.beta_end = 0.008           # schedule of the original latent DDIM ("const0.008").
  c.latent.loss = "l1"                # "l1" (reference) | "l2": on eps.
  c.latent.learning_rate = 1e-3       # Constant (reference: 1e-4 over ~400k steps).
  c.latent.weight_decay = 0.0         # > 0: AdamW (reference: 0.01), else Adam.
  c.latent.grad_clip_norm = 1.0       # Global gradient-norm clipping (0 = off).
  c.latent.ema_decay = 0.995          # EMA of the parameters used for sampling (0 = none).
  c.latent.batch_size = 128           # Codes per step, drawn with replacement.
  c.latent.num_steps = 1500
  c.latent.log_every = 250            # Steps per compiled chunk and metrics.jsonl line.
  c.latent.checkpoint_every = 500
  c.latent.std_floor = 1e-6           # Floor of the per-dimension std of the normalisation.
  c.latent.sample_steps = 50          # DDIM steps of a z_sem sample (reference: 20).
  c.latent.image_decode_steps = 10    # DDIM steps of the cine decoded from a sampled z_sem.

  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3    # Reference: 1e-4 (see the docstring).
  c.optimizer.warmup_steps = 50
  c.optimizer.grad_clip_norm = 1.0

  c.train.batch_size = 4
  c.train.num_steps = 1500
  c.train.eval_batch_size = 8
  c.train.eval_every = 1500           # Once, at the end (a validation pass takes minutes).
  c.train.checkpoint_every = 200
  c.train.figure_every = 250
  c.train.best_metric = "val/eps_loss"
  c = base.finalize(c, arg, paper, smoke)
  for name in _UNUSED_MODEL_FIELDS:  # base.apply_smoke sets some of them again.
    if name in c.model:
      del c.model[name]
  return c
