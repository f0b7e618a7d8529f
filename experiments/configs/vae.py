"""VAE with the Soft-IntroVAE residual architecture: reconstruction + KL (beta = 1)."""

from experiments.configs import base


def paper(c):
  """The ACDC setting of the AR-SIVAE reference code: 128 px ED slices, zdim 256, batch 16."""
  c.data.image_size = 128
  c.data.prepare.slice_rule = "acdc_basal"  # Basal end of the slices showing every structure.
  c.model.channels = (64, 128, 256, 512, 512)
  c.model.latent_dim = 256
  c.model.initializer = "xavier_normal"
  c.data.augment.max_shift_px = 0
  c.train.batch_size = 16
  c.optimizer.learning_rate = 2e-4
  c.loss.reconstruction = "mse"  # The reference's summed squared error.


def get_config(arg=None):
  c = base.base_config()
  c.name = "vae"
  # Bernoulli likelihood (summed binary cross-entropy): on the synthetic cohort it reconstructs
  # sharper than the summed squared error at half the steps (docs/configs.md, section vae).
  c.loss.reconstruction = "bce"
  c.train.num_steps = 1500
  return base.finalize(c, arg, paper)
