"""Pytree train states and optimizer construction.

A `TrainState` holds everything a run needs to continue bit-for-bit: the step, parameters and
BatchNorm statistics of every part of the model, one optimizer state per part (Soft-IntroVAE
trains encoder and decoder with separate Adam optimizers), the root PRNG key (per-step keys are
`fold_in(rng, step)`), and a counter of updates skipped because they were non-finite. The
optimizers themselves are pure functions owned by the model family, not state.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from cardiac_jax import config_checks as checks

PyTree = Any

# What `make_optimizer` reads, and what each value must be (a learning rate of 0 or below
# trains nowhere or uphill; b1, b2 are moment decays).
OPTIMIZER_RULES = {
    "name": checks.choice("adam", "adamw"),
    "learning_rate": checks.number(0.0, lo_open=True),
    "b1": checks.number(0.0, 1.0, hi_open=True),
    "b2": checks.number(0.0, 1.0, hi_open=True),
    "weight_decay": checks.number(0.0),
    "grad_clip_norm": checks.number(0.0),
    "schedule": checks.choice("constant", "cosine"),
    "warmup_steps": checks.integer(0),
    "decay_steps": checks.integer(0),
}


@struct.dataclass
class TrainState:
  step: jax.Array               # int32 scalar: number of updates applied so far
  params: PyTree                # {part: params}
  batch_stats: PyTree           # {part: BatchNorm statistics} (empty dict without BN)
  opt_state: PyTree             # {part: optax state}
  rng: jax.Array                # root key of the run
  skipped_nonfinite: jax.Array  # int32 scalar: updates skipped by `skip_nonfinite`


def check_optimizer_config(optimizer_config, section: str = "optimizer") -> None:
  """Raises config_checks.ConfigError naming `section`.<field> for a value `make_optimizer`
  cannot use (`OPTIMIZER_RULES`; the cosine schedule also needs decay_steps > warmup_steps)."""
  for name, check in OPTIMIZER_RULES.items():
    if name in optimizer_config:
      problem = check(optimizer_config[name])
      if problem:
        raise checks.ConfigError(f"config {section}.{name}={optimizer_config[name]!r}: "
                                 f"{problem}")
  if optimizer_config.get("schedule", "constant") == "cosine":
    warmup, decay = optimizer_config.get("warmup_steps", 0), optimizer_config.get("decay_steps", 0)
    if decay <= warmup:
      raise checks.ConfigError(f"config {section}.decay_steps={decay!r}: must exceed "
                               f"{section}.warmup_steps ({warmup}) for the cosine schedule")


def make_optimizer(optimizer_config, section: str = "optimizer") -> optax.GradientTransformation:
  """Optax optimizer from a config with fields name, learning_rate, b1, b2, weight_decay,
  grad_clip_norm (0 = off), warmup_steps and schedule ("constant" or "cosine" with decay_steps);
  `check_optimizer_config` first (`section`: the config section named in its errors).
  """
  check_optimizer_config(optimizer_config, section)
  lr = optimizer_config.learning_rate
  warmup = int(optimizer_config.get("warmup_steps", 0))
  schedule_name = optimizer_config.get("schedule", "constant")
  if schedule_name == "constant":
    schedule = optax.constant_schedule(lr)
    if warmup:
      schedule = optax.join_schedules(
          [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  elif schedule_name == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, max(warmup, 1), int(optimizer_config.decay_steps))
  else:
    raise ValueError(f"unknown optimizer.schedule {schedule_name!r} (constant or cosine)")
  name = optimizer_config.name
  b1, b2 = optimizer_config.get("b1", 0.9), optimizer_config.get("b2", 0.999)
  weight_decay = optimizer_config.get("weight_decay", 0.0)
  if name == "adam":
    tx = optax.adam(schedule, b1=b1, b2=b2)
  elif name == "adamw":
    tx = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay)
  else:
    raise ValueError(f"unknown optimizer.name {name!r} (adam or adamw)")
  clip = optimizer_config.get("grad_clip_norm", 0.0)
  if clip:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return tx


def select_tree(keep_new: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  """Leafwise `new if keep_new else old` for a scalar boolean (used to skip bad updates)."""
  return jax.tree.map(lambda n, o: jnp.where(keep_new, n, o), new, old)


def all_finite(tree: PyTree) -> jax.Array:
  """Scalar boolean: every leaf of `tree` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def replica_rows(sample: Callable[[tuple[int, ...]], jax.Array], shape: tuple[int, ...],
                 axis_name: str | None) -> jax.Array:
  """`sample(shape)` for this replica's (B/R, ...) rows of a global batch.

  Under pmap (`axis_name` set) every replica draws the global (R * B/R, ...) block from the
  shared key and keeps its own rows, so the numbers are those the jit backend draws for the
  whole batch.
  """
  if axis_name is None:
    return sample(shape)
  replicas = jax.lax.psum(1, axis_name)
  block = sample((replicas * shape[0],) + tuple(shape[1:]))
  return jax.lax.dynamic_slice_in_dim(block, jax.lax.axis_index(axis_name) * shape[0],
                                      shape[0])


def optimizer_step(tx: optax.GradientTransformation, grads: PyTree, opt_state: PyTree,
                   params: PyTree, axis_name: str | None) -> tuple[PyTree, PyTree, PyTree]:
  """(new params, new optimizer state, grads) of one update; under pmap the gradients are
  averaged over the replicas first (the returned grads are the averaged ones)."""
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, grads


def finish_step(state: TrainState, new_state: TrainState, grads: dict[str, PyTree],
                metrics: dict[str, jax.Array], *, skip_nonfinite: bool,
                axis_name: str | None) -> tuple[TrainState, dict[str, jax.Array]]:
  """The end of every family's train step.

  Averages the metrics over the replicas (pmap), adds grad_norm_<part> / param_norm_<part> for
  every part in `grads`, checks that gradients and metrics are finite, advances the step and,
  with `skip_nonfinite`, keeps `state` (counting the skip) instead of a non-finite update.
  `new_state` carries the updated params, optimizer states and statistics.
  """
  if axis_name is not None:
    metrics = jax.lax.pmean(metrics, axis_name)
  for part in grads:
    metrics[f"grad_norm_{part}"] = optax.global_norm(grads[part])
    metrics[f"param_norm_{part}"] = optax.global_norm(new_state.params[part])
  finite = all_finite((grads, metrics))
  new_state = new_state.replace(step=state.step + 1)
  if skip_nonfinite:
    skipped = state.replace(step=state.step + 1, skipped_nonfinite=state.skipped_nonfinite + 1)
    new_state = select_tree(finite, new_state, skipped)
  metrics["finite"] = finite.astype(jnp.float32)
  metrics["skipped_nonfinite"] = new_state.skipped_nonfinite
  return new_state, metrics
