"""The project's one checkpoint wrapper (orbax-checkpoint CheckpointManager).

A checkpoint is the whole `TrainState` (step, params, BatchNorm statistics, optimizer states,
root key, skipped-update counter) saved as a pytree of arrays. Saving is asynchronous and
collective (every process calls `save`; orbax coordinates multi-host writes). A step directory is
only visible to `latest_step` once orbax has finalised it, so an interrupted save never replaces
the last good checkpoint; a step directory that is damaged anyway (a filesystem without atomic
rename, a truncated file, a deleted part) is moved aside to <step>.corrupt-<n> by
`restore_latest`, which then restores the newest older step. Restoring needs an abstract target (`jax.eval_shape` of the state
constructor) so arrays come back with the right shapes, dtypes and shardings.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model of the current config."""


class CorruptCheckpointError(OSError):
  """A checkpoint step directory is incomplete or damaged."""


def _leaf_names(tree: Any) -> dict[str, Any]:
  """{"params/decoder/to_image/kernel": leaf} with attribute, key and index paths unified."""
  def name(entry) -> str:
    for attr in ("name", "key", "idx"):
      if hasattr(entry, attr):
        return str(getattr(entry, attr))
    return str(entry)
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(name(e) for e in path): leaf for path, leaf in flat}


def _describe_mismatch(saved: Any, target: Any) -> str:
  """Names the first fields whose shape differs between two abstract trees, or that exist in
  only one of them."""
  saved_leaves, target_leaves = _leaf_names(saved), _leaf_names(target)
  problems = []
  for name, leaf in target_leaves.items():
    other = saved_leaves.get(name)
    if other is None:
      problems.append(f"{name}: missing in the checkpoint")
    elif tuple(getattr(other, "shape", ())) != tuple(getattr(leaf, "shape", ())):
      problems.append(f"{name}: checkpoint shape {tuple(other.shape)} != model shape "
                      f"{tuple(leaf.shape)}")
  problems += [f"{name}: in the checkpoint but not in the model"
               for name in saved_leaves if name not in target_leaves]
  return "; ".join(problems[:6])


def _has_arrays(metadata: Any) -> bool:
  """Whether checkpoint metadata describes at least one array (an emptied or partial step
  directory yields None or an empty composite whose attribute access raises KeyError)."""
  try:
    return metadata is not None and any(
        getattr(leaf, "shape", None) is not None for leaf in _leaf_names(metadata).values())
  except (KeyError, AttributeError, TypeError):
    return False


class Checkpointer:
  """Periodic, final and preemption checkpoints of a run directory."""

  def __init__(self, directory: str, *, max_to_keep: int = 3):
    self.directory = os.path.abspath(directory)
    self._options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(self.directory, options=self._options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Starts an asynchronous save of `state` as step `step`."""
    return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def restore(self, abstract_state: Any, step: int | None = None) -> Any:
    """Restores `step` (default: latest) into the structure of `abstract_state`.

    Raises CheckpointMismatchError naming the mismatching fields when the checkpoint was written
    by a model of another shape (e.g. a different config in the same workdir), and
    CorruptCheckpointError when the step directory is incomplete or damaged.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # pylint: disable=broad-except (orbax/tensorstore raise many types)
      try:
        saved = self._manager.item_metadata(step)
      except Exception:  # pylint: disable=broad-except
        saved = None
      if not _has_arrays(saved):
        raise CorruptCheckpointError(
            f"checkpoint step {step} in {self.directory} is incomplete (no readable metadata): "
            f"{e}") from e
      detail = _describe_mismatch(saved, abstract_state)
      if not detail:  # Same structure and shapes: the data itself is damaged.
        raise CorruptCheckpointError(
            f"checkpoint step {step} in {self.directory} is damaged: {e}") from e
      raise CheckpointMismatchError(
          f"checkpoint step {step} in {self.directory} does not match the current model "
          f"({detail}); use another --workdir or the config that wrote it") from e

  def restore_latest(self, abstract_state: Any) -> tuple[Any, int] | None:
    """(state, step) of the newest checkpoint that restores, or None if there is none.

    A damaged step is renamed to <step>.corrupt-<n> (kept for inspection, never deleted) and the
    next older step is tried; a shape mismatch is a config error and is raised.
    """
    for step in sorted(self.all_steps(), reverse=True):
      try:
        return self.restore(abstract_state, step), step
      except CorruptCheckpointError as e:
        print(f"WARNING: {e}; moving it aside and trying an older checkpoint.", file=sys.stderr,
              flush=True)
        if jax.process_index() == 0:
          path = os.path.join(self.directory, str(step))
          n = 0
          while os.path.exists(f"{path}.corrupt-{n}"):
            n += 1
          os.replace(path, f"{path}.corrupt-{n}")
        if jax.process_count() > 1:  # Every process sees the rename before rescanning.
          from jax.experimental import multihost_utils
          multihost_utils.sync_global_devices(f"checkpoint_quarantine_{step}")
        # A fresh manager: one that has seen a damaged step can misjudge the layout of the
        # others (e.g. take an emptied directory for a multi-item checkpoint).
        self._manager.close()
        self._manager = ocp.CheckpointManager(self.directory, options=self._options)
    return None

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def latest_step(directory: str) -> int | None:
  """The newest finalised checkpoint step in `directory`, or None."""
  with Checkpointer(directory) as checkpointer:
    return checkpointer.latest_step()
