"""Soft-IntroVAE (Daniel & Tamar, CVPR 2021) with the residual image model: the adversarial
(introspective) VAE that AR-SIVAE builds on, without attribute regularisation.
"""

from experiments.configs import base, vae


def soft_intro(c):
  """The Soft-IntroVAE objective with the ACDC weights of the AR-SIVAE reference code."""
  c.loss.objective = "soft_intro"
  c.loss.beta_rec = 0.8
  c.loss.beta_kl = 1.0
  c.loss.beta_neg = 1024.0
  c.loss.gamma_r = 1e-8
  c.loss.scale = "chw"


def paper(c):
  """ACDC setting: 128 px ED slices, zdim 256, batch 16, two Adam optimisers lr 2e-4."""
  vae.paper(c)
  soft_intro(c)


def get_config(arg=None):
  c = base.base_config()
  c.name = "sivae"
  soft_intro(c)
  return base.finalize(c, arg, paper)
