"""Temporal VAE-classifier on short-axis cine segmentations (Clough et al. 2019).

Per-frame VAE on the 3 central short-axis slices (one-hot labels, cross-entropy
reconstruction; data.input="sa_image" for images with a squared error), a classifier over the
means of all T frames with a 64-unit concept layer, loss mean_t[rec + beta KL] + gamma BCE
with beta 0.2, two stages (VAE alone for train.stage1_steps, then joint), random shifts of up
to 5 px (done by the cine input pipeline). The disease target is group in data.positive_groups
(pathological vs normal by default). loss.reconstruction is not used: the reconstruction term
follows data.input.
"""

import ml_collections

from experiments.configs import base
from experiments.configs import cine_data


def paper(c):
  """Clough et al.: T = 50 frames of 80 x 80 px, latent 128 per frame, beta 0.2, gamma 1."""
  c.data.num_frames = 50
  c.data.image_size = 80
  c.model.channels = (32, 64, 128, 256)      # 80 -> 5 px bottleneck.
  c.model.latent_dim = 128
  c.model.frame_units = (64, 16)
  c.model.sequence_units = (256,)
  c.train.batch_size = 16
  c.train.num_steps = 20000
  c.train.stage1_steps = 10000


def smoke(c):
  """On top of base.apply_smoke: 4 frames of 16 px (tests)."""
  cine_data.apply_smoke(c)
  c.model.channels = (8, 16)
  c.model.latent_dim = 8
  c.model.frame_units = (8, 4)
  c.model.sequence_units = (16,)
  c.model.concept_units = 8
  c.model.head_units = (8,)
  c.data.augment.max_shift_px = 2
  c.train.stage1_steps = 2
  c.tcav.num_random_sets = 3


def get_config(arg=None):
  # Cine batches (data_pipelines.cine, fields in experiments/configs/cine_data.py):
  # "sa_label"/"sa_image" (B, T, S, S, 3), "group" (B,), "lv_volume_ml" (B, T), ...
  # Stored crops: 80 px at 1.8 mm (shared with the other cine experiments), resized to S.
  c = cine_data.cine_config(
      "temporal_classifier",
      num_frames=20,                  # T: frames per cycle after temporal resampling from ED.
      image_size=32)                  # S: model input size in pixels.
  c.data.input = "sa_label"           # "sa_label" (one-hot, cross-entropy) | "sa_image" (MSE).
  # Disease target: these groups (structures.GROUPS) are positive, all others negative.
  c.data.positive_groups = ("MINF", "DCM", "HCM", "RV")
  c.data.augment.max_shift_px = 5     # Random in-plane shift per sequence (paper: 5 px).

  c.model.family = "temporal_classifier"
  c.model.channels = (16, 32, 64)     # Per-frame residual VAE (cardiac_jax.models.vae).
  c.model.latent_dim = 128            # Per frame (paper: 128).
  c.model.frame_units = (64, 16)      # Dense layers on each frame's mean, shared over frames.
  c.model.sequence_units = (128,)     # Dense layers on the concatenation over frames.
  c.model.concept_units = 64          # The concept ("CAV") layer.
  c.model.head_units = (32,)          # Dense layers between the concept layer and the logit.

  c.loss.beta_kl = 0.2                # beta (paper: 0.2).
  c.loss.gamma = 1.0                  # BCE weight in stage 2 (paper: 1).

  c.optimizer.learning_rate = 3e-4
  c.train.batch_size = 8
  c.train.num_steps = 1200
  c.train.stage1_steps = 400          # Stage 1: VAE alone (gamma = 0).
  c.train.eval_every = 250
  c.train.checkpoint_every = 250
  c.train.figure_every = 250
  c.train.best_metric = "val/bce"     # The classifier's loss (stage 1 leaves it untrained).

  # experiments/tcav.py.
  c.tcav = ml_collections.ConfigDict()
  c.tcav.concept_fraction = 0.2       # Highest/lowest share of the held-out set per concept.
  c.tcav.num_random_sets = 10         # Random concepts for the significance test.
  c.tcav.alpha = 0.05                 # Before the Bonferroni correction over concepts.
  c.tcav.cycle_duration_s = 1.0       # Cycle length for rates in ml/s when none is recorded.
  c.tcav.savgol_window = 5            # Savitzky-Golay window (frames, odd) and order.
  c.tcav.savgol_order = 3
  return base.finalize(c, arg, paper, smoke)
