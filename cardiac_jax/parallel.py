"""Device mesh, shardings and compiled steps.

The default backend ("jit") compiles a step once with `jax.jit` over a one-axis device mesh
("data"): the batch is sharded on its leading axis, the state is replicated and donated. XLA
inserts the gradient all-reduce; BatchNorm statistics are computed over the global batch. The
same code runs on one CPU, several GPUs, a TPU slice and several hosts (every process feeds its
own rows of the global batch, see `shard_batch`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int = 0) -> Mesh:
  """A ("data",) mesh over the first `num_devices` devices (0 = all, across all processes)."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"parallel.num_devices={num_devices} but only {len(devices)} devices "
                       f"are visible ({jax.default_backend()})")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  if global_batch_size % mesh.size:
    raise ValueError(f"train.batch_size={global_batch_size} must be divisible by the number "
                     f"of devices ({mesh.size})")


def device_fields(batch: dict[str, Any]) -> dict[str, np.ndarray]:
  """The numeric fields of a host batch (strings such as subject ids stay on the host)."""
  return {k: v for k, v in batch.items()
          if isinstance(v, np.ndarray) and v.dtype.kind in "biuf"}


def shard_batch(batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Global arrays from this process's rows of the global batch (leading axis on "data")."""
  sharding = data_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in device_fields(batch).items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))


def jit_train_step(step_fn: Callable, mesh: Mesh) -> Callable:
  """jit of `(state, batch, key) -> (state, metrics)`: replicated state (donated), sharded batch."""
  rep = replicated(mesh)
  return jax.jit(step_fn, in_shardings=(rep, data_sharded(mesh), rep),
                 out_shardings=(rep, rep), donate_argnums=(0,))


def jit_eval_step(eval_fn: Callable, mesh: Mesh) -> Callable:
  """jit of `(state, batch) -> per-example outputs`, outputs sharded like the batch."""
  return jax.jit(eval_fn, in_shardings=(replicated(mesh), data_sharded(mesh)),
                 out_shardings=data_sharded(mesh))
