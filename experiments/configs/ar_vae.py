"""AR-VAE (Pati & Lerch 2021), the "Attri-VAE" baseline of AR-SIVAE: beta-VAE (beta = 2) plus
gamma * attribute regularisation of latent dims 0, 1, 2 by LV EDV, myocardium ED volume, RV EDV.
"""

from experiments.configs import base, vae


def paper(c):
  """ACDC setting of the reference code: 128 px ED slices, zdim 256, batch 16, AR delta 1."""
  vae.paper(c)
  c.loss.gamma = 30.0
  c.loss.delta = 1.0


def get_config(arg=None):
  c = base.base_config()
  c.name = "ar_vae"
  c.loss.beta_kl = 2.0
  c.loss.gamma = 30.0
  c.loss.delta = 1.0
  c.loss.regularized_dims = tuple(range(len(c.data.attributes)))
  return base.finalize(c, arg, paper)
