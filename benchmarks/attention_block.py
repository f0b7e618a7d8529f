"""Value and gradient of one softmax attention over a long token sequence, in the DiffAE's shape.

  python -m benchmarks.attention_block [--tokens=12800] [--channels=64] [--block=1024]
      [--repeats=3] [--naive]

Times `jax.grad` of sum(attention(q, k, v) * g) for (1, tokens, 1, channels) float32 inputs:
`cardiac_jax.attention.chunked_attention` with --block queries per block and, with --naive,
the plain formulation (its logit matrix is tokens^2 * 4 bytes: 655 MB at 12,800 tokens). The
default is one attention block of the paper DiffAE at 50 frames and 64 px (16 px level, 64
channels, one head). Prints one JSON line per variant: the wall and process CPU seconds of
every repeat after a compiling call, and the 1-minute load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

from cardiac_jax import attention


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tokens", type=int, default=12800)
  parser.add_argument("--channels", type=int, default=64)
  parser.add_argument("--block", type=int, default=1024)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--naive", action="store_true", help="Also time the plain attention.")
  args = parser.parse_args()
  if min(args.tokens, args.channels, args.block, args.repeats) < 1:
    parser.error("--tokens, --channels, --block and --repeats must be >= 1")
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, g = (jax.random.normal(key, (1, args.tokens, 1, args.channels)) for key in keys)
  variants = {f"chunked (block {args.block})":
              lambda q, k, v: attention.chunked_attention(q, k, v, args.block)}
  if args.naive:
    variants["naive"] = attention.naive_attention
  for name, fn in variants.items():
    grad = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v) * g), (0, 1, 2)))
    load_before = os.getloadavg()[0]
    jax.block_until_ready(grad(q, k, v))
    wall, cpu = [], []
    for _ in range(args.repeats):
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(grad(q, k, v))
      wall.append(round(time.perf_counter() - start, 3))
      cpu.append(round(time.process_time() - start_cpu, 3))
    print(json.dumps({"variant": name, "tokens": args.tokens, "channels": args.channels,
                      "wall_s": wall, "cpu_s": cpu, "load_before": load_before,
                      "load_after": os.getloadavg()[0]}), flush=True)


if __name__ == "__main__":
  main()
