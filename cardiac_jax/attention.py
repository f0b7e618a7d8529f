"""Softmax attention over long token sequences with memory linear in their number.

`chunked_attention` computes softmax(q k^T / sqrt(D)) v a block of queries at a time, with a
custom VJP in the manner of FlashAttention (Dao et al., NeurIPS 2022): the forward pass keeps the
output and each query's log-sum-exp, the backward pass recomputes each block's logits once from
them, so neither pass holds more than one (B, H, block, N) logit matrix. The 3D DiffAE attends
over every voxel of a 16 px level of a 50-frame cine (12,800 tokens: a 655 MB logit matrix per
example and head in float32). `naive_attention` is the plain formulation, the reference of the
tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cardiac_jax import runtime

F32 = jnp.float32


def _attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(D)) v for q (B, Q, H, D), k and v (B, N, H, D): (B, Q, H, D).

  Logits and softmax in float32, the two matmuls in the inputs' dtype."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k,
                      preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def naive_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """The full softmax attention (one N x N logit matrix per example and head)."""
  return _attend(q, k, v)


def _query_blocks(x: jax.Array, block_size: int) -> jax.Array:
  """(N, ...) -> (num_blocks, block_size, ...), N zero-padded to a multiple of the block."""
  n = x.shape[0]
  num_blocks = -(-n // block_size)
  pad = [(0, num_blocks * block_size - n)] + [(0, 0)] * (x.ndim - 1)
  return jnp.pad(x, pad).reshape(num_blocks, block_size, *x.shape[1:])


def _unblock(x: jax.Array, n: int) -> jax.Array:
  """Inverse of `_query_blocks`: (num_blocks, block_size, ...) -> (n, ...)."""
  return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])[:n]


def _blockwise_forward(q, k, v, block_size):
  """Attention output of one head, q, k, v (N, D), and the log-sum-exp of every query's logits,
  `block_size` queries at a time; returns (out, residuals of the backward pass)."""
  scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)

  def block(qb):
    logits = jnp.einsum("qd,kd->qk", qb * scale, k, preferred_element_type=F32)
    peak = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
    weights = jnp.exp(logits - peak)
    total = weights.sum(axis=-1, keepdims=True)
    out = jnp.einsum("qk,kd->qd", weights.astype(v.dtype), v, preferred_element_type=F32)
    return (out / total).astype(v.dtype), (peak + jnp.log(total))[:, 0]

  out, lse = jax.lax.map(block, _query_blocks(q, block_size))
  out = _unblock(out, q.shape[0])
  return out, (q, k, v, out, lse)


def _blockwise_backward(block_size, residuals, d_out):
  """Gradients of one head's blockwise attention: per query block the logits are computed once
  more and turned into the weights with the stored log-sum-exp; dK and dV accumulate."""
  q, k, v, out, lse = residuals
  scale = q.shape[-1] ** -0.5
  # delta_i = sum_j P_ij dP_ij = <dO_i, O_i>: the softmax Jacobian's correction per query.
  delta = jnp.sum(d_out.astype(F32) * out.astype(F32), axis=-1)
  blocks = (_query_blocks(q, block_size), _query_blocks(d_out.astype(v.dtype), block_size),
            lse, _query_blocks(delta, block_size))

  def block(carry, xs):
    dk, dv = carry
    qb, dob, lseb, deltab = xs
    logits = jnp.einsum("qd,kd->qk", qb * jnp.asarray(scale, q.dtype), k,
                        preferred_element_type=F32)
    weights = jnp.exp(logits - lseb[:, None])
    dv += jnp.einsum("qk,qd->kd", weights.astype(v.dtype), dob, preferred_element_type=F32)
    d_weights = jnp.einsum("qd,kd->qk", dob, v, preferred_element_type=F32)
    d_logits = (weights * (d_weights - deltab[:, None]) * scale).astype(q.dtype)
    dq = jnp.einsum("qk,kd->qd", d_logits, k, preferred_element_type=F32)
    dk += jnp.einsum("qk,qd->kd", d_logits, qb, preferred_element_type=F32)
    return (dk, dv), dq

  zeros = jnp.zeros(k.shape, F32)
  (dk, dv), dq = jax.lax.scan(block, (zeros, zeros), blocks)
  return _unblock(dq, q.shape[0]).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blockwise(q, k, v, block_size):
  return _blockwise_forward(q, k, v, block_size)[0]


_blockwise.defvjp(_blockwise_forward, _blockwise_backward)

HEAD_LOOPS = ("auto", "map", "vmap")


def resolve_head_loop(loop: str) -> str:
  """"auto" -> "map" on the CPU backend, else "vmap" (see `chunked_attention`)."""
  return runtime.backend_choice(loop, HEAD_LOOPS, cpu="map", other="vmap",
                                what="attention head loop")


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, block_size: int,
                      head_loop: str = "auto") -> jax.Array:
  """Softmax attention computed `block_size` queries at a time (module docstring).

  Args:
    q, k, v: (B, N, H, D) queries, keys and values.
    block_size: queries per block; N is padded to a multiple of it (the padded queries are
      dropped from the result, keys are never padded).
    head_loop: how the B * H (example, head) pairs are visited: "map" one after the other, each
      with plain 2D matrix products, "vmap" all at once (batched products); "auto" takes "map"
      on the CPU, where XLA materialises a transposed copy of each (block x N) matrix that a
      batched product contracts over its rows (about three times slower there: timings in
      benchmarks/README.md), and "vmap" elsewhere.

  Returns:
    (B, N, H, D), equal to `naive_attention(q, k, v)`, with the same gradients. The forward
    pass keeps only the output and each query's log-sum-exp; the backward pass (a custom VJP)
    recomputes each block's logits once and derives the weights from the log-sum-exp, so both
    hold one (block_size, N) logit matrix per (example, head) at a time.
  """
  if block_size < 1:
    raise ValueError(f"attention block_size must be >= 1, got {block_size}")
  if q.shape[1] <= block_size:
    return _attend(q, k, v)
  b, n, h, d = q.shape
  heads = [jnp.moveaxis(x, 2, 1).reshape(b * h, n, x.shape[-1]) for x in (q, k, v)]
  one = lambda q, k, v: _blockwise(q, k, v, int(block_size))
  if resolve_head_loop(head_loop) == "map":
    out = jax.lax.map(lambda qkv: one(*qkv), tuple(heads))
  else:
    out = jax.vmap(one)(*heads)
  return jnp.moveaxis(out.reshape(b, h, n, v.shape[-1]), 1, 2)
