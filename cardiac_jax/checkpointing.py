"""The project's one checkpoint wrapper (orbax-checkpoint CheckpointManager).

A checkpoint is the whole `TrainState` (step, params, BatchNorm statistics, optimizer states,
root key, skipped-update counter) saved as a pytree of arrays. Saving is asynchronous and
collective (every process calls `save`; orbax coordinates multi-host writes). A step directory is
only visible to `latest_step` once orbax has finalised it, so an interrupted save never replaces
the last good checkpoint. Restoring needs an abstract target (`jax.eval_shape` of the state
constructor) so arrays come back with the right shapes, dtypes and shardings.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model of the current config."""


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


class Checkpointer:
  """Periodic, final and preemption checkpoints of a run directory."""

  def __init__(self, directory: str, *, max_to_keep: int = 3):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

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
    by a model of another shape (e.g. a different config in the same workdir).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except (ValueError, KeyError, TypeError) as e:
      saved = self._manager.item_metadata(step)
      detail = _describe_mismatch(saved, abstract_state) if saved is not None else ""
      raise CheckpointMismatchError(
          f"checkpoint step {step} in {self.directory} does not match the current model "
          f"({detail or e}); use another --workdir or the config that wrote it") from e

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
