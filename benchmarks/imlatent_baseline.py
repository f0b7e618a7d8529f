"""PyTorch eager baseline of the 3D DiffAE train step, for side-by-side speed comparisons only.

The reference network of the UK Biobank cine study (Ometto et al. 2024, public ImLatent code:
Diffusion Autoencoders of Preechakul et al. 2022 with dims = 3) written from its published
architecture in PyTorch eager mode, at the sizes of `cardiac_jax.models.diffae3d` (parameter
counts are checked equal), and one training step the way the reference trains it:
  x_0 (B, 1, T, S, S) in [-1, 1];  t ~ U{0..T_diff-1};  eps ~ N(0, I);
  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps;  z_sem = Enc(x_0);
  L = mean_b lambda_t mean_voxels (eps - eps_theta(x_t, t, z_sem))^2  (lambda = 1 in the
  reference; the P2 weights 1 / (k + SNR_t)^gamma when --p2_gamma > 0, as the JAX config);
  backward; clip the global gradient norm; Adam (or AdamW) step; EMA of the parameters.
float32 throughout (the reference's mixed precision is a GPU setting).

Network (NCDHW here with D = T frames, NDHWC in JAX; same parameters in another layout):
  convolutions 3x3x3 with bias; in-plane resampling only (average pool (1, 2, 2), nearest
  upsampling to (T, 2h, 2w)); GroupNorm(min(min(32, base), C) groups); SiLU.
  ResBlock (UNet): h = Conv(SiLU(GN(x))) (resampling h and x after SiLU(GN(x)) in the down
  and up blocks); [t_s, t_b] = Linear(SiLU(e_t)); z_s = Linear(SiLU(z_sem));
  h = (1 + z_s) ((1 + t_s) GN(h) + t_b); h = Conv_0(Dropout(SiLU(h))); out = skip(x) + h,
  Conv_0 zero-initialised, skip a 1x1x1 conv when the channel count changes.
  ResBlock (encoder, no condition): out = skip(x) + Conv(SiLU(GN(x))).
  Attention over the T h w voxels: x + proj_0(softmax(q k^T / sqrt(d)) v), q, k, v from a
  1x1 projection of GN(x), the full logit matrix as in the reference.
  UNet: in conv; per level R ResBlocks (+ attention at the attention resolutions) and a
  downsampling ResBlock; middle ResBlock, attention, ResBlock; per level R + 1 ResBlocks on
  concat(h, skip) and an upsampling ResBlock; GN -> SiLU -> zero-initialised conv.
  Timestep embedding: sinusoid(base) -> Linear(E) -> SiLU -> Linear(E).
  Semantic encoder: the down path and middle with unconditioned blocks; head GN -> SiLU ->
  average over (T, h, w) -> Linear(z_sem) ("pool", the reference's 1x1 conv after the pool) or
  flatten -> Linear(z_sem) ("flatten", model.encoder_head of the JAX config).

PyTorch is not a dependency of the project: install it into a separate environment, e.g.
  python3.11 -m venv /work/torch-venv && /work/torch-venv/bin/pip install torch==2.13.0 numpy
and run this file with that interpreter (`experiments.benchmark --torch_python=...` does).

Usage:
  /work/torch-venv/bin/python benchmarks/imlatent_baseline.py --num_frames=16 --image_size=64 \
      --batch_size=1 --steps=2          (reference network, 16 frames of 64 px)
  ... --count_params   (only the parameter counts, no timing)
Prints one JSON line on stdout: s_per_step (mean over the timed steps), step_seconds,
samples_per_sec, parameter counts, losses, torch version, threads, peak RSS and load average.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

try:
  import numpy as np
  import torch
  from torch import nn
  from torch.nn import functional as F
except ImportError as error:  # Only this script needs PyTorch; say how to get it.
  sys.exit(f"benchmarks/imlatent_baseline.py needs PyTorch and numpy; PyTorch is not a project "
           f"dependency ({error}). Install it into a separate environment: python3.11 -m venv "
           f"/work/torch-venv && /work/torch-venv/bin/pip install torch==2.13.0 numpy; then run "
           f"this script (or experiments.benchmark --torch_python=...) with that interpreter.")

# The timing helpers beside this script (also when it is loaded from a file path).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_timing import count_parameters, time_steps  # noqa: E402  pylint: disable=g-import-not-at-top

GROUP_LIMIT = 32


def group_norm(channels: int, group_limit: int) -> nn.GroupNorm:
  groups = min(group_limit, channels)
  if channels % groups:
    raise ValueError(f"GroupNorm with {groups} groups cannot normalise {channels} channels; "
                     "--base_channels and the channel multipliers must give channel counts "
                     f"that are multiples of min(32, base_channels) = {group_limit}")
  return nn.GroupNorm(groups, channels, eps=1e-5)


def zeroed(module: nn.Module) -> nn.Module:
  """The module with every parameter set to zero (the reference's zero-initialised outputs)."""
  with torch.no_grad():
    for p in module.parameters():
      p.zero_()
  return module


def conv3(in_channels: int, out_channels: int) -> nn.Conv3d:
  return nn.Conv3d(in_channels, out_channels, 3, padding=1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
  """(B,) timesteps -> (B, dim) [cos(t f), sin(t f)], f_i = max_period^(-i / (dim/2))."""
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
  args = t.float()[:, None] * freqs[None]
  emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
  if dim % 2:
    emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
  return emb


def resample(x: torch.Tensor, mode: str) -> torch.Tensor:
  """In-plane only: "down" averages 2x2 pixels, "up" repeats them; T is untouched."""
  if mode == "down":
    return F.avg_pool3d(x, kernel_size=(1, 2, 2), stride=(1, 2, 2))
  if mode == "up":
    return F.interpolate(x, size=(x.shape[2], 2 * x.shape[3], 2 * x.shape[4]), mode="nearest")
  return x


class ResBlock(nn.Module):
  """(B, C_in, T, H, W) -> (B, C_out, T, H', W'); conditioned (AdaGN with e_t and z_sem) or
  not (module docstring). `mode`: "none", "down" or "up"."""

  def __init__(self, in_channels: int, out_channels: int, group_limit: int, mode: str = "none",
               embed_dim: int | None = None, z_dim: int | None = None, dropout: float = 0.0):
    super().__init__()
    self.mode = mode
    self.conditioned = embed_dim is not None
    self.in_norm = group_norm(in_channels, group_limit)
    self.in_conv = conv3(in_channels, out_channels)
    if self.conditioned:
      self.time = nn.Linear(embed_dim, 2 * out_channels)
      self.cond = nn.Linear(z_dim, out_channels)
      self.out_norm = group_norm(out_channels, group_limit)
      self.dropout = nn.Dropout(dropout)
      self.out_conv = zeroed(conv3(out_channels, out_channels))
    self.skip = (nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels
                 else nn.Identity())

  def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None,
              z: torch.Tensor | None = None) -> torch.Tensor:
    h = resample(F.silu(self.in_norm(x)), self.mode)
    x = resample(x, self.mode)
    h = self.in_conv(h)
    if self.conditioned:
      time_scale, time_shift = self.time(F.silu(emb))[:, :, None, None, None].chunk(2, dim=1)
      cond_scale = self.cond(F.silu(z))[:, :, None, None, None]
      h = (1.0 + cond_scale) * ((1.0 + time_scale) * self.out_norm(h) + time_shift)
      h = self.out_conv(self.dropout(F.silu(h)))
    return self.skip(x) + h


class Attention(nn.Module):
  """x + proj_0(attention(GN(x))) over the T*H*W voxels of (B, C, T, H, W)."""

  def __init__(self, channels: int, num_heads: int, group_limit: int):
    super().__init__()
    if channels % num_heads:
      raise ValueError(f"--num_heads={num_heads} does not divide the {channels} channels of an "
                       "attention block")
    self.num_heads = num_heads
    self.norm = group_norm(channels, group_limit)
    self.qkv = nn.Conv1d(channels, 3 * channels, 1)
    self.proj = zeroed(nn.Conv1d(channels, channels, 1))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, c, *volume = x.shape
    tokens = x.reshape(b, c, -1)
    q, k, v = self.qkv(self.norm(tokens)).chunk(3, dim=1)
    heads, d = self.num_heads, c // self.num_heads
    q, k, v = (a.reshape(b, heads, d, -1) for a in (q, k, v))
    logits = torch.einsum("bhdn,bhdm->bhnm", q * d ** -0.5, k)
    a = torch.einsum("bhnm,bhdm->bhdn", torch.softmax(logits, dim=-1), v)
    return x + self.proj(a.reshape(b, c, -1)).reshape(b, c, *volume)


def level_sizes(image_size: int, num_levels: int, flag: str) -> list[int]:
  if image_size % 2 ** (num_levels - 1):
    raise ValueError(f"--image_size {image_size} must be divisible by 2^{num_levels - 1} "
                     f"({num_levels} levels in {flag})")
  return [image_size // 2 ** level for level in range(num_levels)]


def check_resolutions(resolutions, sizes, flag: str) -> None:
  unknown = sorted(set(resolutions) - set(sizes))
  if unknown:
    raise ValueError(f"{flag} {list(resolutions)}: {unknown} match no level (in-plane sizes "
                     f"{sizes})")


class ConditionalUNet(nn.Module):
  """eps_theta(x_t, t, z_sem): (B, 1, T, S, S), (B,), (B, Z) -> (B, 1, T, S, S)."""

  def __init__(self, a):
    super().__init__()
    b, mults, group_limit = a.base_channels, a.channel_mult, min(GROUP_LIMIT, a.base_channels)
    sizes = level_sizes(a.image_size, len(mults), "--channel_mult")
    check_resolutions(a.attention_resolutions, sizes, "--attention_resolutions")
    self.base = b
    embed_dim = a.time_embed_dim or 4 * b
    self.time_embed = nn.Sequential(nn.Linear(b, embed_dim), nn.SiLU(),
                                    nn.Linear(embed_dim, embed_dim))
    block = lambda c_in, c_out, mode="none": ResBlock(
        c_in, c_out, group_limit, mode, embed_dim, a.z_sem_dim, a.dropout)
    attention = lambda c: Attention(c, a.num_heads, group_limit)
    self.in_conv = conv3(a.in_channels, b * mults[0])
    ch = b * mults[0]
    skip_channels = [ch]
    # Each entry: (ResBlock, attention or identity); the down path's outputs are the skips.
    self.down = nn.ModuleList()
    for level, mult in enumerate(mults):
      for _ in range(a.num_res_blocks):
        attn = attention(b * mult) if sizes[level] in a.attention_resolutions else nn.Identity()
        self.down.append(nn.ModuleList([block(ch, b * mult), attn]))
        ch = b * mult
        skip_channels.append(ch)
      if level != len(mults) - 1:
        self.down.append(nn.ModuleList([block(ch, ch, "down"), nn.Identity()]))
        skip_channels.append(ch)
    self.middle = nn.ModuleList([block(ch, ch), attention(ch), block(ch, ch)])
    self.up = nn.ModuleList()
    for level in reversed(range(len(mults))):
      for _ in range(a.num_res_blocks + 1):
        c_out = b * mults[level]
        attn = attention(c_out) if sizes[level] in a.attention_resolutions else nn.Identity()
        self.up.append(nn.ModuleList([block(ch + skip_channels.pop(), c_out), attn]))
        ch = c_out
      if level:
        self.up.append(nn.ModuleList([block(ch, ch, "up"), nn.Identity()]))
    self.out_norm = group_norm(ch, group_limit)
    self.out_conv = zeroed(conv3(ch, a.in_channels))

  def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    emb = self.time_embed(timestep_embedding(t, self.base))
    h = self.in_conv(x)
    skips = [h]
    for res, attn in self.down:
      h = attn(res(h, emb, z))
      skips.append(h)
    first, attn, second = self.middle
    h = second(attn(first(h, emb, z)), emb, z)
    for res, attn in self.up:
      if res.mode != "up":  # The upsampling blocks take no skip.
        h = torch.cat([h, skips.pop()], dim=1)
      h = attn(res(h, emb, z))
    return self.out_conv(F.silu(self.out_norm(h)))


class SemanticEncoder(nn.Module):
  """z_sem = Enc(x_0): (B, 1, T, S, S) -> (B, z_sem_dim)."""

  def __init__(self, a):
    super().__init__()
    b, mults, group_limit = a.base_channels, a.encoder_channel_mult, min(GROUP_LIMIT,
                                                                         a.base_channels)
    sizes = level_sizes(a.image_size, len(mults), "--encoder_channel_mult")
    check_resolutions(a.encoder_attention_resolutions, sizes, "--encoder_attention_resolutions")
    self.head = a.encoder_head
    layers = [conv3(a.in_channels, b * mults[0])]
    ch = b * mults[0]
    for level, mult in enumerate(mults):
      for _ in range(a.encoder_num_res_blocks):
        layers.append(ResBlock(ch, b * mult, group_limit))
        ch = b * mult
        if sizes[level] in a.encoder_attention_resolutions:
          layers.append(Attention(ch, a.num_heads, group_limit))
      if level != len(mults) - 1:
        layers.append(ResBlock(ch, ch, group_limit, "down"))
    layers += [ResBlock(ch, ch, group_limit), Attention(ch, a.num_heads, group_limit),
               ResBlock(ch, ch, group_limit), group_norm(ch, group_limit), nn.SiLU()]
    self.body = nn.Sequential(*layers)
    features = ch if self.head == "pool" else ch * a.num_frames * sizes[-1] ** 2
    self.out = nn.Linear(features, a.z_sem_dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = self.body(x)
    h = h.mean(dim=(2, 3, 4)) if self.head == "pool" else h.flatten(1)
    return self.out(h)


class DiffAEStep:
  """One reference training step per call (module docstring); returns its losses."""

  def __init__(self, encoder: SemanticEncoder, unet: ConditionalUNet, a):
    self.encoder, self.unet, self.args = encoder, unet, a
    self.params = list(encoder.parameters()) + list(unet.parameters())
    optimizer = torch.optim.AdamW if a.optimizer == "adamw" else torch.optim.Adam
    self.optimizer = optimizer(self.params, lr=a.learning_rate, betas=(a.b1, a.b2),
                               weight_decay=a.weight_decay)
    warmup = a.lr_warmup_steps
    # Linear warm-up from 0 (the reference's WarmupLR, optax's linear_schedule).
    self.schedule = (torch.optim.lr_scheduler.LambdaLR(
        self.optimizer, lambda step: min(step, warmup) / warmup) if warmup else None)
    self.ema = [p.detach().clone() for p in self.params]
    betas = np.linspace(a.beta_start, a.beta_end, a.num_timesteps, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    self.sqrt_abar = torch.tensor(np.sqrt(abar), dtype=torch.float32)
    self.sqrt_one_minus_abar = torch.tensor(np.sqrt(1.0 - abar), dtype=torch.float32)
    weights = (np.ones_like(abar) if a.p2_gamma == 0.0
               else (a.p2_k + abar / (1.0 - abar)) ** -a.p2_gamma)
    self.loss_weights = torch.tensor(weights, dtype=torch.float32)

  def __call__(self, x0: torch.Tensor) -> dict[str, float]:
    a = self.args
    t = torch.randint(0, a.num_timesteps, (x0.shape[0],))
    noise = torch.randn_like(x0)
    expand = lambda v: v[t].view(-1, 1, 1, 1, 1)
    x_t = expand(self.sqrt_abar) * x0 + expand(self.sqrt_one_minus_abar) * noise
    eps_hat = self.unet(x_t, t, self.encoder(x0))
    eps_loss = (noise - eps_hat).pow(2).flatten(1).mean(1)
    loss = (self.loss_weights[t] * eps_loss).mean()
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = (torch.nn.utils.clip_grad_norm_(self.params, a.grad_clip_norm)
                 if a.grad_clip_norm > 0 else None)
    self.optimizer.step()
    if self.schedule is not None:
      self.schedule.step()
    with torch.no_grad():
      for ema, p in zip(self.ema, self.params):
        ema.lerp_(p, 1.0 - a.ema_decay)  # ema <- d ema + (1 - d) p
    result = {"loss": float(loss.detach()), "eps_loss": float(eps_loss.detach().mean())}
    if grad_norm is not None:
      result["grad_norm"] = float(grad_norm)
    return result






def _int_list(value: str) -> list[int]:
  try:
    return [int(v) for v in value.split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  # Defaults: the reference network (experiments/configs/diffae3d.py, paper variant).
  p.add_argument("--num_frames", type=int, default=50, help="T, the depth axis")
  p.add_argument("--image_size", type=int, default=128, help="S of the (T, S, S) volume")
  p.add_argument("--in_channels", type=int, default=1)
  p.add_argument("--base_channels", type=int, default=32)
  p.add_argument("--channel_mult", type=_int_list, default=[1, 1, 2, 3, 4])
  p.add_argument("--num_res_blocks", type=int, default=2)
  p.add_argument("--attention_resolutions", type=_int_list, default=[16],
                 help="in-plane sizes (px) with attention in the UNet; '' for none")
  p.add_argument("--encoder_channel_mult", type=_int_list, default=[1, 1, 2, 3, 4, 4])
  p.add_argument("--encoder_num_res_blocks", type=int, default=2)
  p.add_argument("--encoder_attention_resolutions", type=_int_list, default=[16])
  p.add_argument("--encoder_head", choices=("pool", "flatten"), default="pool")
  p.add_argument("--z_sem_dim", type=int, default=128)
  p.add_argument("--time_embed_dim", type=int, default=0, help="0 = 4 * base_channels")
  p.add_argument("--num_heads", type=int, default=1)
  p.add_argument("--dropout", type=float, default=0.1, help="in the UNet's ResBlocks")
  p.add_argument("--num_timesteps", type=int, default=1000)
  p.add_argument("--beta_start", type=float, default=1e-4)
  p.add_argument("--beta_end", type=float, default=0.02)
  p.add_argument("--p2_gamma", type=float, default=0.0, help="0 = the reference's plain loss")
  p.add_argument("--p2_k", type=float, default=1.0)
  p.add_argument("--optimizer", choices=("adam", "adamw"), default="adam")
  p.add_argument("--learning_rate", type=float, default=1e-4)
  p.add_argument("--b1", type=float, default=0.9)
  p.add_argument("--b2", type=float, default=0.999)
  p.add_argument("--weight_decay", type=float, default=0.0)
  p.add_argument("--lr_warmup_steps", type=int, default=0)
  p.add_argument("--grad_clip_norm", type=float, default=1.0, help="0 = no clipping")
  p.add_argument("--ema_decay", type=float, default=0.9999)
  p.add_argument("--batch_size", type=int, default=1)
  p.add_argument("--steps", type=int, default=3, help="timed steps")
  p.add_argument("--warmup_steps", type=int, default=1, help="untimed steps first")
  p.add_argument("--threads", type=int, default=0, help="0 = torch's default")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--count_params", action="store_true",
                 help="print the parameter counts and exit")
  a = p.parse_args(argv)
  for name in ("num_frames", "image_size", "in_channels", "base_channels", "num_res_blocks",
               "encoder_num_res_blocks", "z_sem_dim", "num_heads", "batch_size", "steps"):
    if getattr(a, name) < 1:
      p.error(f"--{name} must be positive, got {getattr(a, name)}")
  for name in ("channel_mult", "encoder_channel_mult"):
    if not getattr(a, name) or min(getattr(a, name)) < 1:
      p.error(f"--{name} must be a non-empty list of positive integers, got "
              f"{getattr(a, name)}")
  if not 0.0 <= a.dropout < 1.0:
    p.error(f"--dropout must be in [0, 1), got {a.dropout}")
  if not 0.0 <= a.ema_decay < 1.0:
    p.error(f"--ema_decay must be in [0, 1), got {a.ema_decay}")
  if a.num_timesteps < 2 or not 0.0 < a.beta_start <= a.beta_end < 1.0:
    p.error(f"need --num_timesteps >= 2 and 0 < --beta_start <= --beta_end < 1, got "
            f"{a.num_timesteps}, {a.beta_start}, {a.beta_end}")
  if a.p2_gamma < 0.0 or (a.p2_gamma > 0.0 and a.p2_k <= 0.0):
    p.error(f"--p2_gamma must be >= 0 and --p2_k > 0, got {a.p2_gamma} and {a.p2_k}")
  if a.warmup_steps < 0 or a.lr_warmup_steps < 0:
    p.error("--warmup_steps and --lr_warmup_steps must be >= 0")
  return a


def build(a) -> tuple[SemanticEncoder, ConditionalUNet]:
  return SemanticEncoder(a), ConditionalUNet(a)


def main(argv=None) -> dict:
  a = parse_args(argv)
  torch.manual_seed(a.seed)
  if a.threads:
    torch.set_num_threads(a.threads)
  try:
    encoder, unet = build(a)
  except ValueError as error:
    sys.exit(f"benchmarks/imlatent_baseline.py: {error}")
  result = {"encoder_params": count_parameters(encoder), "unet_params": count_parameters(unet)}
  result["total_params"] = result["encoder_params"] + result["unet_params"]
  if a.count_params:
    print(json.dumps(result), flush=True)
    return result
  encoder.train()
  unet.train()
  generator = torch.Generator().manual_seed(a.seed)
  shape = (a.batch_size, a.in_channels, a.num_frames, a.image_size, a.image_size)
  x0 = torch.rand(shape, generator=generator) * 2.0 - 1.0
  step = DiffAEStep(encoder, unet, a)
  result.update({
      "framework": "pytorch-eager", "model": "imlatent-diffae3d",
      "torch_version": torch.__version__, "threads": torch.get_num_threads(),
      "batch_size": a.batch_size, "num_frames": a.num_frames, "image_size": a.image_size,
      "base_channels": a.base_channels,
      **time_steps(lambda: step(x0), a.warmup_steps, a.steps, a.batch_size),
  })
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main()
