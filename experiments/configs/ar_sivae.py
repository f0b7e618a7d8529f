"""AR-SIVAE (Di Folco et al., MICCAI 2024): Soft-IntroVAE whose encoder loss adds
gamma * attribute regularisation (not scaled by s) of latent dims 0, 1, 2 by LV EDV, myocardium
ED volume and RV EDV (config fields data.attributes and loss.regularized_dims).
"""

from experiments.configs import base, sivae


def paper(c):
  """ACDC setting of the reference code: gamma 0.1, delta 1, beta_rec 0.8, beta_kl 1,
  beta_neg 1024, zdim 256, batch 16, 128 px ED slices."""
  sivae.paper(c)
  base.attribute_regularisation(c, gamma=0.1)


def get_config(arg=None):
  c = base.base_config()
  c.name = "ar_sivae"
  sivae.soft_intro(c, sivae.DEFAULT_BETA_NEG)
  base.attribute_regularisation(c, gamma=0.1)
  return base.finalize(c, arg, paper)
