"""beta-VAE (Higgins et al. 2017): the VAE with the KL term weighted by beta = 2."""

from experiments.configs import base, vae


def get_config(arg=None):
  c = base.base_config()
  c.name = "beta_vae"
  # About 30 minutes on a 2-core CPU (docs/configs.md).
  c.train.num_steps = 3000
  c.loss.beta_kl = 2.0
  return base.finalize(c, arg, vae.paper)
