"""Device mesh, shardings and the compiled train step of each parallel backend.

Two backends (config.parallel.backend), one training run:

- "jit" (default): the step is compiled once with `jax.jit` over a one-axis device mesh
  ("data"). The batch is sharded on its leading axis, the state is replicated and donated; XLA
  inserts the gradient all-reduce and BatchNorm statistics are those of the global batch.
- "pmap": the step runs per replica under `jax.pmap` with the replica axis named "data"; the
  model family is built with `axis_name="data"` so the step itself averages gradients and
  metrics (`lax.pmean`) and uses global BatchNorm statistics (see `cardiac_jax.families.vae`). The
  state enters with `in_axes=None`: it is broadcast to the replicas inside the compiled call and
  comes back with `out_axes=None` (all replicas hold the same values), so between steps the state
  is the same replicated array as under jit and checkpoints do not depend on the backend. The
  host batch is reshaped to (local replicas, B_local / local replicas, ...).

Both backends run on one CPU, several GPUs, a TPU slice and several hosts. Every process feeds
its own rows of the global batch (`data_pipelines.pipeline` with process_index/process_count);
process p's rows go to its own devices, which are contiguous in `jax.devices()` order.
Given the same global batch and key the two backends compute the same update (equal up to the
order of floating-point reductions: the all-reduce of per-replica sums vs one sum).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
BACKENDS = ("jit", "pmap")


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


def check_backend(backend: str) -> None:
  if backend not in BACKENDS:
    raise ValueError(f"parallel.backend={backend!r} is not one of {', '.join(BACKENDS)}")


def local_devices(mesh: Mesh) -> list:
  """The mesh's devices that belong to this process, in mesh order."""
  return [d for d in mesh.devices.flat if d.process_index == jax.process_index()]


def device_fields(batch: dict[str, Any]) -> dict[str, np.ndarray]:
  """The numeric fields of a host batch (strings such as subject ids stay on the host)."""
  return {k: v for k, v in batch.items()
          if isinstance(v, np.ndarray) and v.dtype.kind in "biuf"}


def shard_batch(batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Global arrays from this process's rows of the global batch (leading axis on "data")."""
  sharding = data_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in device_fields(batch).items()}


def split_batch_for_replicas(batch: dict[str, Any], mesh: Mesh) -> dict[str, np.ndarray]:
  """(B_local, ...) host fields -> (R_local, B_local / R_local, ...) for pmap's replica axis."""
  replicas = len(local_devices(mesh))
  out = {}
  for k, v in device_fields(batch).items():
    if v.shape[0] % replicas:
      raise ValueError(f"batch field {k!r} has {v.shape[0]} rows on this process, not "
                       f"divisible by its {replicas} devices")
    out[k] = v.reshape((replicas, v.shape[0] // replicas) + v.shape[1:])
  return out


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on any of them (e.g. a SIGTERM that reached
  only some hosts); one small all-gather when there are several processes."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))


def jit_train_step(step_fn: Callable, mesh: Mesh) -> Callable:
  """jit of `(state, batch, key) -> (state, metrics)`: replicated state (donated), sharded batch."""
  rep = replicated(mesh)
  return jax.jit(step_fn, in_shardings=(rep, data_sharded(mesh), rep),
                 out_shardings=(rep, rep), donate_argnums=(0,))


def pmap_train_step(step_fn: Callable, mesh: Mesh) -> Callable:
  """pmap of a per-replica `(state, batch, key) -> (state, metrics)` over the mesh's devices.

  `step_fn` must average over `DATA_AXIS` itself (a family built with axis_name=DATA_AXIS).
  The state and key are broadcast (in_axes=None) and the outputs are unmapped (out_axes=None):
  the step leaves identical values on every replica, so no leading replica axis is ever
  materialised outside the compiled call. The batch is mapped over its leading axis (R, ...).
  """
  return jax.pmap(step_fn, axis_name=DATA_AXIS, in_axes=(None, 0, None), out_axes=None,
                  devices=list(mesh.devices.flat), donate_argnums=(0,))


class TrainStep:
  """A compiled train step of one backend: `(state, host_batch, key) -> (state, metrics)`.

  `host_batch` is this process's rows of the global batch as numpy arrays (non-numeric fields
  such as subject ids are ignored); `state` and the returned state are replicated over `mesh`;
  `metrics` are replicated scalars (jax.device_get them for logging).
  """

  def __init__(self, step_fn: Callable, mesh: Mesh, backend: str):
    check_backend(backend)
    self.mesh, self.backend = mesh, backend
    if backend == "jit":
      self._compiled = jit_train_step(step_fn, mesh)
    else:
      self._compiled = pmap_train_step(step_fn, mesh)

  def device_batch(self, host_batch: dict[str, Any]) -> dict[str, Any]:
    """The batch in the layout the compiled step takes."""
    if self.backend == "jit":
      return shard_batch(host_batch, self.mesh)
    return split_batch_for_replicas(host_batch, self.mesh)

  def __call__(self, state: Any, host_batch: dict[str, Any],
               key: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
    state, metrics = self._compiled(state, self.device_batch(host_batch), key)
    if self.backend == "pmap" and jax.process_count() > 1:
      # Multi-process pmap hands back host-local arrays (this process's devices only); the loop,
      # the checkpointer and evaluation expect the state replicated over the global mesh.
      state, metrics = multihost_utils.host_local_array_to_global_array(
          (state, metrics), self.mesh, P())
    return state, metrics

  def lower(self, state: Any, host_batch: dict[str, Any], key: jax.Array):
    """The lowered step for these arguments (`.compile().cost_analysis()` for FLOP counts)."""
    return self._compiled.lower(state, self.device_batch(host_batch), key)


def compile_train_step(step_factory: Callable[[str | None], Callable], mesh: Mesh,
                       backend: str) -> TrainStep:
  """The train step of `backend` over `mesh`.

  step_factory(axis_name) returns the pure step `(state, batch, key) -> (state, metrics)`: with
  axis_name None a step over the whole batch (jit), with DATA_AXIS a per-replica step that
  averages over that axis (pmap), e.g. `lambda a: families.make_family(config, axis_name=a)
  .train_step`.
  """
  check_backend(backend)
  return TrainStep(step_factory(DATA_AXIS if backend == "pmap" else None), mesh, backend)


def jit_eval_step(eval_fn: Callable, mesh: Mesh) -> Callable:
  """jit of `(state, batch) -> per-example outputs`, outputs sharded like the batch."""
  return jax.jit(eval_fn, in_shardings=(replicated(mesh), data_sharded(mesh)),
                 out_shardings=data_sharded(mesh))


def abstract_state(init_fn: Callable, key: jax.Array, mesh: Mesh) -> Any:
  """Shapes, dtypes and replicated shardings of `init_fn(key)` without computing it: the
  restore target of a checkpoint."""
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated(mesh)),
      jax.eval_shape(init_fn, key))
