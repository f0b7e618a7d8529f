"""The project's one checkpoint wrapper (orbax-checkpoint CheckpointManager).

A checkpoint is the whole `TrainState` (step, params, BatchNorm statistics, optimizer states,
root key, skipped-update counter) saved as a pytree of arrays. Saving is asynchronous and
collective (every process calls `save`; orbax coordinates multi-host writes). A step directory is
only visible to `latest_step` once orbax has finalised it, so an interrupted save never replaces
the last good checkpoint; a step directory that is damaged anyway (a filesystem without atomic
rename, a truncated file, a deleted part) is moved aside to <step>.corrupt-<n> by
`restore_latest`, which then restores the newest older step. Restoring needs an abstract target (`jax.eval_shape` of the state
constructor) so arrays come back with the right shapes, dtypes and shardings.

Besides the latest steps (exact resume), a run can keep its best step by a validation metric
(the reference keeps the checkpoint of the best validation reconstruction loss): orbax keeps
"the latest N, or the best one" (its LatestN and BestN preservation policies), ranking the steps
by the value saved with them in their step directory, so the best survives the rotation and a
reopened directory knows it.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp


BEST_MODES = ("min", "max")


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


def _ranking_value(metrics: Mapping[str, Any] | None, *, name: str, worst: float) -> float:
  """The saved value of `name` in a step's metrics, or `worst` when it has none (steps saved
  without an improving evaluation carry empty metrics)."""
  value = (metrics or {}).get(name)
  return float(value) if value is not None and math.isfinite(value) else worst


class Checkpointer:
  """Periodic, final and preemption checkpoints of a run directory, and its best step.

  The newest `max_to_keep` steps are kept. With `best_metric` (a validation metric name, e.g.
  "val/reconstruction_loss"; lower is better for best_mode "min", higher for "max") the best
  step is kept too, however old: `save(..., metrics=...)` records the value with a step only
  when it improves strictly on the best so far, so the best step is the newest one carrying a
  value and orbax never deletes it.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, best_metric: str = "",
               best_mode: str = "min"):
    if best_mode not in BEST_MODES:
      raise ValueError(f"best_mode must be one of {BEST_MODES}, got {best_mode!r}")
    self.directory = os.path.abspath(directory)
    self.best_metric, self.best_mode = best_metric, best_mode
    if best_metric:
      rank = functools.partial(_ranking_value, name=best_metric,
                               worst=math.inf if best_mode == "min" else -math.inf)
      policies = ocp.checkpoint_managers
      keep = policies.AnyPreservationPolicy([
          policies.LatestN(n=max_to_keep),
          policies.BestN(get_metric_fn=rank, reverse=best_mode == "min", n=1,
                         keep_checkpoints_without_metrics=False)])
      self._options = ocp.CheckpointManagerOptions(
          best_fn=rank, best_mode=best_mode, preservation_policy=keep, create=True,
          enable_async_checkpointing=True)
    else:
      self._options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                   enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(self.directory, options=self._options)
    self._best = self._saved_best()

  def _saved_best(self) -> tuple[int, float] | None:
    """(step, value) of the best step in the directory, or None."""
    if not self.best_metric:
      return None
    step = self._manager.best_step()
    if step is None:
      return None
    value = _ranking_value(self._manager.metrics(step), name=self.best_metric, worst=math.nan)
    return None if math.isnan(value) else (step, value)

  def best(self) -> tuple[int, float] | None:
    """(step, value of best_metric) of the best step saved so far, or None (no best_metric,
    or no evaluated step saved yet)."""
    return self._best

  def improves(self, metrics: Mapping[str, Any] | None) -> bool:
    """Whether validation `metrics` hold a finite best_metric value strictly better than the
    best so far (always False without best_metric)."""
    if not self.best_metric or not metrics or self.best_metric not in metrics:
      return False
    value = float(metrics[self.best_metric])
    if not math.isfinite(value):
      return False
    if self._best is None:
      return True
    return value < self._best[1] if self.best_mode == "min" else value > self._best[1]

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, *, force: bool = False,
           metrics: Mapping[str, Any] | None = None) -> bool:
    """Starts an asynchronous save of `state` as step `step`; `metrics`: the validation
    metrics of this step when it was just evaluated. With best_metric, the step becomes the
    best when they improve on it (`improves`)."""
    record = None
    if self.best_metric:
      record = ({self.best_metric: float(metrics[self.best_metric])}
                if self.improves(metrics) else {})
    saved = self._manager.save(step, args=ocp.args.StandardSave(state), force=force,
                               metrics=record)
    if saved and record:
      self._best = (step, record[self.best_metric])
    return saved

  def restore(self, abstract_state: Any, step: int | None = None) -> Any:
    """Restores `step` (default: latest) into the structure of `abstract_state`.

    Raises CheckpointMismatchError naming the mismatching fields when the checkpoint was written
    by a model of another shape (e.g. a different config in the same workdir), and
    CorruptCheckpointError when the step directory is incomplete or damaged.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    if step not in self.all_steps():
      raise FileNotFoundError(f"no checkpoint step {step} in {self.directory} (steps kept: "
                              f"{self.all_steps()})")
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
        self._best = self._saved_best()
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
