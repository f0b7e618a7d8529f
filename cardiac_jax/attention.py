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
  """(B, N, ...) -> (num_blocks, B, block_size, ...), N zero-padded to a multiple of the block."""
  b, n = x.shape[:2]
  num_blocks = -(-n // block_size)
  pad = [(0, 0), (0, num_blocks * block_size - n)] + [(0, 0)] * (x.ndim - 2)
  x = jnp.pad(x, pad).reshape(b, num_blocks, block_size, *x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _unblock(x: jax.Array, n: int) -> jax.Array:
  """Inverse of `_query_blocks`: (num_blocks, B, block_size, ...) -> (B, n, ...)."""
  num_blocks, b, block_size = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape(b, num_blocks * block_size, *x.shape[3:])[:, :n]


def _blockwise_forward(q, k, v, block_size):
  """Attention output and the log-sum-exp of every query's logits, `block_size` queries at a
  time; returns (out, residuals of the backward pass)."""
  scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)

  def block(qb):
    logits = jnp.einsum("bqhd,bkhd->bhqk", qb * scale, k, preferred_element_type=jnp.float32)
    peak = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
    weights = jnp.exp(logits - peak)
    total = weights.sum(axis=-1, keepdims=True)
    out = jnp.einsum("bhqk,bkhd->bqhd", (weights / total).astype(v.dtype), v)
    return out, (peak + jnp.log(total))[..., 0]                  # (B, H, Q)

  out, lse = jax.lax.map(block, _query_blocks(q, block_size))
  out = _unblock(out, q.shape[1])
  return out, (q, k, v, out, lse)


def _blockwise_backward(block_size, residuals, d_out):
  """Gradients of the blockwise attention: per query block the logits are computed once more
  and turned into the weights with the stored log-sum-exp; dK and dV accumulate over blocks."""
  q, k, v, out, lse = residuals
  n = q.shape[1]
  scale = q.shape[-1] ** -0.5
  # delta_i = sum_j P_ij dP_ij = <dO_i, O_i>: the softmax Jacobian's correction per query.
  delta = jnp.einsum("bqhd,bqhd->bqh", d_out.astype(jnp.float32), out.astype(jnp.float32))
  blocks = (_query_blocks(q, block_size), _query_blocks(d_out.astype(v.dtype), block_size),
            lse, jnp.moveaxis(_query_blocks(delta, block_size), -1, 2))   # delta: (nb, B, H, Q)

  def block(carry, xs):
    dk, dv = carry
    qb, dob, lseb, deltab = xs
    logits = jnp.einsum("bqhd,bkhd->bhqk", qb * jnp.asarray(scale, q.dtype), k,
                        preferred_element_type=jnp.float32)
    weights = jnp.exp(logits - lseb[..., None])
    dv += jnp.einsum("bhqk,bqhd->bkhd", weights.astype(v.dtype), dob,
                     preferred_element_type=jnp.float32)
    d_weights = jnp.einsum("bqhd,bkhd->bhqk", dob, v, preferred_element_type=jnp.float32)
    d_logits = (weights * (d_weights - deltab[..., None]) * scale).astype(q.dtype)
    dq = jnp.einsum("bhqk,bkhd->bqhd", d_logits, k, preferred_element_type=jnp.float32)
    dk += jnp.einsum("bhqk,bqhd->bkhd", d_logits, qb, preferred_element_type=jnp.float32)
    return (dk, dv), dq

  zeros = jnp.zeros(k.shape, jnp.float32)
  (dk, dv), dq = jax.lax.scan(block, (zeros, zeros), blocks)
  return _unblock(dq, n).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blockwise(q, k, v, block_size):
  return _blockwise_forward(q, k, v, block_size)[0]


_blockwise.defvjp(_blockwise_forward, _blockwise_backward)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, block_size: int) -> jax.Array:
  """Softmax attention computed `block_size` queries at a time (module docstring).

  Args:
    q, k, v: (B, N, H, D) queries, keys and values.
    block_size: queries per block; N is padded to a multiple of it (the padded queries are
      dropped from the result, keys are never padded).

  Returns:
    (B, N, H, D), equal to `naive_attention(q, k, v)`, with the same gradients. The forward
    pass keeps only the output and each query's log-sum-exp; the backward pass (a custom VJP)
    recomputes each block's logits once and derives the weights from the log-sum-exp, so both
    hold one (B, H, block_size, N) logit matrix at a time, and the backward computes five
    block matmuls where differentiating a recomputed forward would compute six.
  """
  if block_size < 1:
    raise ValueError(f"attention block_size must be >= 1, got {block_size}")
  if q.shape[1] <= block_size:
    return _attend(q, k, v)
  return _blockwise(q, k, v, int(block_size))
