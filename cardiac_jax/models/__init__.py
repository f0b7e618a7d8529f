"""Flax modules, one file per architecture: `vae` (the residual Soft-IntroVAE network),
`attri_vae` (Attri-VAE's convolutional beta-VAE), `temporal_classifier`, `dcgan`, `diffae3d`,
`latent_ddim`."""
