"""Ablation: AR-VAE (Pati & Lerch 2021) on the Soft-IntroVAE residual network of AR-SIVAE.

beta-VAE objective (beta = 2) plus gamma * attribute regularisation of latent dims 0, 1, 2 by LV
EDV, myocardium ED volume and RV EDV, on the same network, data and attributes as `ar_sivae`:
the pair isolates what the introspective (adversarial) training adds. It is not the paper's
baseline: AR-SIVAE is compared against Attri-VAE, attribute regularisation on a convolutional
beta-VAE with its own hyperparameters (`attri_vae`).
"""

from experiments.configs import base, vae


def paper(c):
  """The ACDC setting of the AR-SIVAE reference (128 px ED slices, zdim 256, batch 16, AR delta
  1) with the VAE objective."""
  vae.paper(c)
  base.attribute_regularisation(c, gamma=30.0)


def get_config(arg=None):
  c = base.base_config()
  c.name = "ar_vae"
  c.loss.beta_kl = 2.0
  base.attribute_regularisation(c, gamma=30.0)
  return base.finalize(c, arg, paper)
