"""VAE with the Soft-IntroVAE residual architecture: reconstruction + KL (beta = 1)."""

from experiments.configs import base


def paper(c):
  """The ACDC setting of the AR-SIVAE reference code: 128 px ED slices, zdim 256, batch 16."""
  c.data.image_size = 128
  c.model.channels = (64, 128, 256, 512, 512)
  c.model.latent_dim = 256
  c.model.initializer = "xavier_normal"
  c.data.augment.max_shift_px = 0
  c.train.batch_size = 16
  c.optimizer.learning_rate = 2e-4


def get_config(arg=None):
  c = base.base_config()
  c.name = "vae"
  # About 30 minutes on a 2-core CPU (1000 steps: 12 min, 3000: 30 min, measured).
  c.train.num_steps = 3000
  return base.finalize(c, arg, paper)
