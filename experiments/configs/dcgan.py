"""DCGAN on short-axis slices (Radford et al. 2016; settings of Schoen et al. 2022).

Fields beyond experiments/configs/base.py:
  model.channels: discriminator channels, one stride-2 convolution each; the generator uses them
    in reverse (one nearest x2 + conv per entry), so image_size / 2**len(channels) is the side
    of the generator's first feature map.
  model.output_activation: "sigmoid" (images in [0, 1], the data's range) or "tanh" ([-1, 1];
    the discriminator then sees real images mapped to [-1, 1]).
  gan.real_label_low, gan.real_label_high: real labels ~ U[low, high) (label smoothing).
  gan.eval_thumbnail_size: side of the average-pooled images of the MMD evaluation metric.
Which stored channels the GAN models is data.channels (default ("ed",); ("ed", "es") models
both phases as a two-channel image).
"""

import ml_collections

from experiments.configs import base


def paper(c):
  """Schoen et al.: z 32, 128 x 128, batch 128, Adam 2e-4 betas (0.5, 0.999)."""
  c.data.image_size = 128
  c.model.channels = (64, 128, 256, 512, 1024)
  c.model.latent_dim = 32
  c.data.augment.max_shift_px = 0
  c.train.batch_size = 128


def smoke(c):
  """On top of base.apply_smoke: 8 px thumbnails, an 8-dimensional code."""
  c.gan.eval_thumbnail_size = 8
  c.model.latent_dim = 8


def get_config(arg=None):
  c = base.base_config()
  c.name = "dcgan"
  c.model.family = "dcgan"
  c.model.latent_dim = 32
  c.model.channels = (32, 64, 128, 256)
  c.model.output_activation = "sigmoid"
  c.optimizer.learning_rate = 2e-4
  c.optimizer.b1 = 0.5
  c.optimizer.b2 = 0.999
  c.gan = ml_collections.ConfigDict()
  c.gan.real_label_low = 0.9
  c.gan.real_label_high = 1.0
  c.gan.eval_thumbnail_size = 16
  # 64 px ED slices; the schedule is sized to about 30 minutes on the 2-core CPU.
  c.train.batch_size = 32
  c.train.num_steps = 3000
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  c.train.figure_every = 250
  c.train.best_metric = "val/mmd2_thumbnail"  # Real vs generated sets (D's outputs rank none).
  return base.finalize(c, arg, paper, smoke)
