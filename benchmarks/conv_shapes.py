"""Per-shape timing of the 3x3 convolutions of the AR-SIVAE model, per implementation.

Profiles where the time of the paper-size train step goes (1x128x128, channels
64-128-256-512-512, batch 16): for every 3x3 convolution shape of the encoder and decoder, the
forward pass, the input gradient (what a frozen part needs: Soft-IntroVAE's encoder update
back-propagates through the frozen decoder and vice versa) and the input + kernel gradient,
for each implementation of `cardiac_jax.layers.conv2d_same` ("xla", "im2col").

  python benchmarks/conv_shapes.py [--batch_size=16] [--repeats=3] [--impls=xla,im2col]

Prints one JSON line per shape: H (= W), c_in, c_out, gflop_fwd and, per implementation, the best
of --repeats runs in ms of [forward, grad wrt input, grad wrt input and kernel].
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from cardiac_jax import layers

# (H, c_in, c_out) of every 3x3 conv of the paper-size model (both ResBlock convs, both parts).
PAPER_SHAPES = ((128, 64, 64), (64, 64, 128), (64, 128, 128), (64, 128, 64), (64, 64, 64),
                (32, 128, 256), (32, 256, 256), (32, 256, 128), (32, 128, 128),
                (16, 256, 512), (16, 512, 512), (16, 512, 256), (16, 256, 256),
                (8, 512, 512), (4, 512, 512))


def best_ms(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # Compilation is not compute.
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return round(1000.0 * best, 1)


def time_shape(size: int, c_in: int, c_out: int, batch_size: int, impls, repeats: int) -> dict:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch_size, size, size, c_in), np.float32))
  kernel = jnp.asarray(0.05 * rng.standard_normal((3, 3, c_in, c_out), np.float32))
  cotangent = jnp.asarray(rng.standard_normal((batch_size, size, size, c_out), np.float32))
  row = {"H": size, "c_in": c_in, "c_out": c_out,
         "gflop_fwd": 2.0 * batch_size * size * size * c_in * c_out * 9 / 1e9}
  for impl in impls:
    conv = lambda a, k, impl=impl: layers.conv2d_same(a, k, impl)
    grad_input = jax.jit(lambda a, k, g: jax.vjp(lambda a_: conv(a_, k), a)[1](g))
    grad_both = jax.jit(lambda a, k, g: jax.vjp(conv, a, k)[1](g))
    row[impl] = [best_ms(jax.jit(conv), x, kernel, repeats=repeats),
                 best_ms(grad_input, x, kernel, cotangent, repeats=repeats),
                 best_ms(grad_both, x, kernel, cotangent, repeats=repeats)]
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--impls", default="xla,im2col")
  args = parser.parse_args()
  impls = [impl for impl in args.impls.split(",") if impl]
  for impl in impls:
    if impl not in ("xla", "im2col"):
      parser.error(f"--impls entries must be xla or im2col, got {impl!r}")
  for shape in PAPER_SHAPES:
    print(json.dumps(time_shape(*shape, args.batch_size, impls, args.repeats)), flush=True)


if __name__ == "__main__":
  main()
