"""PyTorch eager baseline of the AR-SIVAE train step, for side-by-side speed comparisons only.

The same residual image model as `cardiac_jax.models.vae` (the Soft-IntroVAE image model used by
AR-SIVAE, Di Folco et al., MICCAI 2024) and the same per-batch update as
`cardiac_jax.families.vae.VAEFamily.soft_intro_train_step` (Soft-IntroVAE, Daniel & Tamar, CVPR 2021,
with the AR-VAE attribute regularisation of Pati & Lerch 2021 in the encoder loss), written in
PyTorch eager mode the way the reference code trains it: the encoder update with the decoder's
parameters frozen, then the decoder update with the encoder's parameters frozen, each with its
own Adam optimizer.

Model (NCHW here, NHWC in JAX; the parameter layout differs, the parameter count does not):
  Encoder: conv5x5 (no bias) -> BN -> LeakyReLU(0.2) -> avgpool2; for c in channels[1:]:
  ResBlock(c) -> avgpool2; ResBlock(channels[-1]); flatten; Linear(2 * zdim).
  Decoder: Linear(channels[-1] * s * s) -> ReLU; for c in reversed(channels): ResBlock(c) ->
  nearest x2; ResBlock(channels[0]); conv5x5 (bias) -> sigmoid.
  ResBlock: skip = 1x1 conv (no bias) when channels change; conv3x3 -> BN -> LeakyReLU(0.2) ->
  conv3x3 -> BN; LeakyReLU(0.2)(main + skip). Convolutions without bias inside blocks.

PyTorch is not a dependency of the project: install it into a separate environment, e.g.
  python3.11 -m venv /work/torch-venv && /work/torch-venv/bin/pip install torch==2.13.0 numpy
and run this file with that interpreter (`experiments.benchmark --torch_python=...` does).

Usage:
  /work/torch-venv/bin/python benchmarks/torch_baseline.py --image_size=128 \
      --channels=64,128,256,512,512 --latent_dim=256 --batch_size=16 --steps=3
  ... --count_params   (only the parameter counts, no timing)
Prints one JSON line on stdout: s_per_step (mean over the timed steps), step_seconds,
samples_per_sec, parameter counts, torch version, threads, peak RSS and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

try:
  import torch
  from torch import nn
  from torch.nn import functional as F
except ImportError as error:  # Only this script needs PyTorch; say how to get it.
  sys.exit(f"benchmarks/torch_baseline.py needs PyTorch, which is not a project dependency "
           f"({error}). Install it into a separate environment: python3.11 -m venv "
           f"/work/torch-venv && /work/torch-venv/bin/pip install torch==2.13.0 numpy; then run "
           f"this script (or experiments.benchmark --torch_python=...) with that interpreter.")

# The timing helpers beside this script (also when it is loaded from a file path).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_timing import count_parameters, time_steps  # noqa: E402  pylint: disable=g-import-not-at-top


def _bottleneck_size(image_size: int, num_levels: int) -> int:
  size, remainder = divmod(image_size, 2 ** num_levels)
  if remainder or size < 1:
    raise ValueError(f"image_size {image_size} must be divisible by 2**{num_levels} "
                     f"(one halving per entry of --channels)")
  return size


def _batch_norm(channels: int) -> nn.BatchNorm2d:
  # Flax momentum 0.9 (weight of the old running value) is PyTorch momentum 0.1.
  return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)


class ResBlock(nn.Module):
  """(B, C_in, H, W) -> (B, C_out, H, W); see the module docstring."""

  def __init__(self, in_channels: int, out_channels: int):
    super().__init__()
    self.skip = (nn.Conv2d(in_channels, out_channels, 1, bias=False)
                 if in_channels != out_channels else None)
    self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    self.bn1 = _batch_norm(out_channels)
    self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
    self.bn2 = _batch_norm(out_channels)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    skip = x if self.skip is None else self.skip(x)
    h = F.leaky_relu(self.bn1(self.conv1(x)), 0.2)
    h = self.bn2(self.conv2(h))
    return F.leaky_relu(h + skip, 0.2)


class Encoder(nn.Module):
  """(B, C, H, W) images -> (mu, logvar), each (B, latent_dim)."""

  def __init__(self, image_channels: int, channels: tuple[int, ...], latent_dim: int,
               image_size: int):
    super().__init__()
    size = _bottleneck_size(image_size, len(channels))
    self.stem = nn.Conv2d(image_channels, channels[0], 5, padding=2, bias=False)
    self.stem_bn = _batch_norm(channels[0])
    self.down = nn.ModuleList(ResBlock(a, b) for a, b in zip(channels[:-1], channels[1:]))
    self.bottleneck = ResBlock(channels[-1], channels[-1])
    self.to_latent = nn.Linear(channels[-1] * size * size, 2 * latent_dim)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = F.avg_pool2d(F.leaky_relu(self.stem_bn(self.stem(x)), 0.2), 2)
    for block in self.down:
      h = F.avg_pool2d(block(h), 2)
    h = self.bottleneck(h).flatten(1)
    return self.to_latent(h).chunk(2, dim=1)


class Decoder(nn.Module):
  """(B, latent_dim) codes -> (B, C, image_size, image_size) images in (0, 1)."""

  def __init__(self, image_channels: int, channels: tuple[int, ...], latent_dim: int,
               image_size: int):
    super().__init__()
    self.size = _bottleneck_size(image_size, len(channels))
    self.top = channels[-1]
    self.from_latent = nn.Linear(latent_dim, channels[-1] * self.size * self.size)
    widths = (channels[-1],) + tuple(reversed(channels))
    self.up = nn.ModuleList(ResBlock(a, b) for a, b in zip(widths[:-1], widths[1:]))
    self.head_block = ResBlock(channels[0], channels[0])
    self.to_image = nn.Conv2d(channels[0], image_channels, 5, padding=2, bias=True)

  def forward(self, z: torch.Tensor) -> torch.Tensor:
    h = F.relu(self.from_latent(z)).view(z.shape[0], self.top, self.size, self.size)
    for block in self.up:
      h = F.interpolate(block(h), scale_factor=2, mode="nearest")
    return torch.sigmoid(self.to_image(self.head_block(h)))


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
  return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


def kl_per_sample(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
  """(B, D) -> (B,) KL of N(mu, exp(logvar)) from N(0, I)."""
  return -0.5 * torch.sum(1.0 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def rec_per_sample(target: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
  """(B, C, H, W) -> (B,) summed squared error."""
  return (target - prediction).pow(2).flatten(1).sum(1)


def attribute_regularization(z: torch.Tensor, attributes: torch.Tensor, delta: float):
  """AR-VAE loss summed over (z[:, k], attributes[:, k]) for every attribute column k."""
  total = z.new_zeros(())
  for k in range(attributes.shape[1]):
    latent_distance = z[:, k, None] - z[None, :, k]
    attribute_distance = attributes[:, k, None] - attributes[None, :, k]
    total = total + torch.mean(torch.abs(torch.tanh(delta * latent_distance)
                                         - torch.sign(attribute_distance)))
  return total


class SoftIntroStep:
  """One AR-SIVAE update per call, as `VAEFamily.soft_intro_train_step` (module docstring)."""

  def __init__(self, encoder: Encoder, decoder: Decoder, args):
    self.encoder, self.decoder, self.args = encoder, decoder, args
    self.opt_e = torch.optim.Adam(encoder.parameters(), lr=args.learning_rate)
    self.opt_d = torch.optim.Adam(decoder.parameters(), lr=args.learning_rate)
    self.scale = 1.0 / (args.image_channels * args.image_size * args.image_size)

  def _trainable(self, encoder: bool):
    for p in self.encoder.parameters():
      p.requires_grad_(encoder)
    for p in self.decoder.parameters():
      p.requires_grad_(not encoder)

  def __call__(self, x: torch.Tensor, attributes: torch.Tensor) -> dict[str, float]:
    a, s, E, D = self.args, self.scale, self.encoder, self.decoder
    z_prior = torch.randn(x.shape[0], a.latent_dim)

    # Encoder update (decoder frozen).
    self._trainable(encoder=True)
    fake = D(z_prior)
    mu, logvar = E(x)
    z = reparameterize(mu, logvar)
    recon = D(z)
    mu_r, logvar_r = E(recon.detach())
    mu_f, logvar_f = E(fake.detach())
    recon_rec = D(reparameterize(mu_r, logvar_r))
    fake_rec = D(reparameterize(mu_f, logvar_f))
    loss_real = s * (a.beta_rec * rec_per_sample(x, recon).mean()
                     + a.beta_kl * kl_per_sample(mu, logvar).mean())
    energy_rec = a.beta_rec * rec_per_sample(recon, recon_rec) + a.beta_neg * kl_per_sample(
        mu_r, logvar_r)
    energy_fake = a.beta_rec * rec_per_sample(fake, fake_rec) + a.beta_neg * kl_per_sample(
        mu_f, logvar_f)
    loss_fake = 0.25 * (torch.exp(-2.0 * s * energy_rec).mean()
                        + torch.exp(-2.0 * s * energy_fake).mean())
    ar = attribute_regularization(z, attributes, a.delta) if a.gamma else z.new_zeros(())
    loss_e = loss_real + loss_fake + a.gamma * ar
    self.opt_e.zero_grad(set_to_none=True)
    loss_e.backward()
    self.opt_e.step()

    # Decoder update (encoder frozen, already updated), same prior sample.
    self._trainable(encoder=False)
    z = z.detach()
    recon = D(z)
    fake = D(z_prior)
    mu_r, logvar_r = E(recon)
    mu_f, logvar_f = E(fake)
    recon_rec = D(reparameterize(mu_r, logvar_r).detach())
    fake_rec = D(reparameterize(mu_f, logvar_f).detach())
    kl_terms = kl_per_sample(mu_r, logvar_r).mean() + kl_per_sample(mu_f, logvar_f).mean()
    rec_rec = (rec_per_sample(recon.detach(), recon_rec).mean()
               + rec_per_sample(fake.detach(), fake_rec).mean())
    loss_d = s * (a.beta_rec * rec_per_sample(x, recon).mean() + 0.5 * a.beta_kl * kl_terms
                  + 0.5 * a.gamma_r * a.beta_rec * rec_rec)
    self.opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    self.opt_d.step()
    return {"encoder_loss": float(loss_e), "decoder_loss": float(loss_d)}






def build(args) -> tuple[Encoder, Decoder]:
  channels = tuple(args.channels)
  encoder = Encoder(args.image_channels, channels, args.latent_dim, args.image_size)
  decoder = Decoder(args.image_channels, channels, args.latent_dim, args.image_size)
  return encoder, decoder


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--image_size", type=int, default=64)
  p.add_argument("--image_channels", type=int, default=1)
  p.add_argument("--channels", type=lambda v: [int(c) for c in v.split(",")],
                 default=[32, 64, 128, 256], help="comma-separated, e.g. 64,128,256,512,512")
  p.add_argument("--latent_dim", type=int, default=64)
  p.add_argument("--num_attributes", type=int, default=3)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--steps", type=int, default=3, help="timed steps")
  p.add_argument("--warmup_steps", type=int, default=1, help="untimed steps first")
  p.add_argument("--threads", type=int, default=0, help="0 = torch's default")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--learning_rate", type=float, default=2e-4)
  # ACDC weights of the AR-SIVAE reference (experiments/configs/ar_sivae.py).
  p.add_argument("--beta_rec", type=float, default=0.8)
  p.add_argument("--beta_kl", type=float, default=1.0)
  p.add_argument("--beta_neg", type=float, default=1024.0)
  p.add_argument("--gamma_r", type=float, default=1e-8)
  p.add_argument("--gamma", type=float, default=0.1)
  p.add_argument("--delta", type=float, default=1.0)
  p.add_argument("--count_params", action="store_true",
                 help="print the parameter counts and exit")
  args = p.parse_args(argv)
  if args.num_attributes > args.latent_dim:
    p.error(f"--num_attributes {args.num_attributes} exceeds --latent_dim {args.latent_dim}")
  if args.steps < 1:
    p.error(f"--steps must be positive, got {args.steps}")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  torch.manual_seed(args.seed)
  if args.threads:
    torch.set_num_threads(args.threads)
  encoder, decoder = build(args)
  result = {"encoder_params": count_parameters(encoder),
            "decoder_params": count_parameters(decoder)}
  result["total_params"] = result["encoder_params"] + result["decoder_params"]
  if args.count_params:
    print(json.dumps(result), flush=True)
    return result
  encoder.train()
  decoder.train()
  generator = torch.Generator().manual_seed(args.seed)
  x = torch.rand(args.batch_size, args.image_channels, args.image_size, args.image_size,
                 generator=generator)
  attributes = torch.randn(args.batch_size, args.num_attributes, generator=generator)
  step = SoftIntroStep(encoder, decoder, args)
  result.update({
      "framework": "pytorch-eager", "torch_version": torch.__version__,
      "threads": torch.get_num_threads(), "batch_size": args.batch_size,
      "image_size": args.image_size, "channels": args.channels, "latent_dim": args.latent_dim,
      **time_steps(lambda: step(x, attributes), args.warmup_steps, args.steps,
                   args.batch_size),
  })
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main()
