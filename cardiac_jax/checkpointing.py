"""The project's one checkpoint wrapper (orbax-checkpoint CheckpointManager).

A checkpoint is the whole `TrainState` (step, params, BatchNorm statistics, optimizer states,
root key, skipped-update counter) saved as a pytree of arrays. Saving is asynchronous and
collective (every process calls `save`; orbax coordinates multi-host writes). A step directory is
only visible to `latest_step` once orbax has finalised it, so an interrupted save never replaces
the last good checkpoint; a step directory that is damaged anyway (a filesystem without atomic
rename, a truncated file, a deleted part) is moved aside to <step>.corrupt-<n> by
`restore_latest`, which then restores the newest older step. Restoring needs an abstract target
(`jax.eval_shape` of the state constructor) so arrays come back with the right shapes, dtypes
and shardings.

Besides the latest steps (exact resume), a run can keep its best step by a validation metric
(the reference keeps the checkpoint of the best validation reconstruction loss): orbax keeps
"the latest N, or the best one" (its LatestN and BestN preservation policies), ranking the steps
by the value saved with them in their step directory, so the best survives the rotation and a
reopened directory knows it.

Integrity: orbax 0.12.8 keeps no checksum of the array data (its zarr3 layout checksums only a
shard index, and the layout written here has none), so a flipped byte in a data file restores
silently. Once a save has finished, `MANIFEST_FILE` in the step directory records the size
and SHA-256 of every file of the step; `restore` checks them first, and a step whose files
differ (cut short, changed, missing, or an unreadable manifest) is damaged and moved aside like
an incomplete one. A step without a manifest (written before manifests existed, or by a run
killed between the end of a save and its manifest) is checked for what can be checked without
one (its JSON metadata parses, its arrays restore) and restored with a warning that its bytes
are unverified (`unverified_steps`). Each step also carries
`step_metadata` (the run's config) in orbax's step metadata, so a run directory that lost its
config.json still knows which config wrote its checkpoints.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import sys
from typing import Any, Mapping

from absl import logging as absl_logging
import jax
import numpy as np
import orbax.checkpoint as ocp


BEST_MODES = ("min", "max")
# Written into each finished step directory: {"files": {relative path: {"size", "sha256"}}}.
MANIFEST_FILE = "integrity_manifest.json"


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


def _stored_shape(leaf: Any) -> tuple[int, ...]:
  """The shape under which a leaf of an abstract state is stored: a typed PRNG key array is
  saved as its raw key data, with the implementation's trailing key shape (e.g. (2,))."""
  dtype = getattr(leaf, "dtype", None)
  shape = tuple(getattr(leaf, "shape", ()))
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return tuple(jax.eval_shape(jax.random.key_data,
                                jax.ShapeDtypeStruct(shape, dtype)).shape)
  return shape


def _describe_mismatch(saved: Any, target: Any) -> str:
  """Names the first fields whose stored shape differs between a checkpoint's metadata and an
  abstract state, or that exist in only one of them ("" when the structures agree)."""
  saved_leaves, target_leaves = _leaf_names(saved), _leaf_names(target)
  problems = []
  for name, leaf in target_leaves.items():
    other = saved_leaves.get(name)
    if other is None:
      problems.append(f"{name}: missing in the checkpoint")
    elif tuple(getattr(other, "shape", ())) != _stored_shape(leaf):
      problems.append(f"{name}: checkpoint shape {tuple(other.shape)} != model shape "
                      f"{_stored_shape(leaf)}")
  problems += [f"{name}: in the checkpoint but not in the model"
               for name in saved_leaves if name not in target_leaves]
  return "; ".join(problems[:6])


def _summary(error: BaseException, limit: int = 300) -> str:
  """The first line of an orbax / tensorstore error (whose full text lists the whole storage
  spec), shortened: enough to say what failed."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return text if len(text) <= limit else text[:limit] + " ..."


def _has_arrays(metadata: Any) -> bool:
  """Whether checkpoint metadata describes at least one array (an emptied or partial step
  directory yields None or an empty composite whose attribute access raises KeyError)."""
  try:
    return metadata is not None and any(
        getattr(leaf, "shape", None) is not None for leaf in _leaf_names(metadata).values())
  except (KeyError, AttributeError, TypeError):
    return False


def _file_digests(step_dir: str) -> dict[str, dict[str, Any]]:
  """{relative path: {"size", "sha256"}} of every file under a step directory (the manifest
  itself excluded)."""
  digests = {}
  for root, dirs, names in os.walk(step_dir):
    dirs.sort()
    for name in sorted(names):
      path = os.path.join(root, name)
      relative = os.path.relpath(path, step_dir)
      if relative in (MANIFEST_FILE, MANIFEST_FILE + ".tmp"):
        continue
      with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
      digests[relative] = {"size": os.path.getsize(path), "sha256": digest}
  return digests


def write_manifest(step_dir: str) -> None:
  """Records the size and SHA-256 of every file of a finished step (atomically)."""
  path = os.path.join(step_dir, MANIFEST_FILE)
  files = _file_digests(step_dir)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump({"files": files}, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)


def manifest_problem(step_dir: str) -> str | None:
  """What differs between a step directory and its manifest, or None when every recorded file
  is there unchanged (or the step has no manifest)."""
  path = os.path.join(step_dir, MANIFEST_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      files = json.load(f)["files"]
    recorded = {str(k): (int(v["size"]), str(v["sha256"])) for k, v in files.items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    return f"its {MANIFEST_FILE} is unreadable ({type(e).__name__}: {e})"
  if not recorded:
    return f"its {MANIFEST_FILE} lists no files"
  for relative, (size, digest) in sorted(recorded.items()):
    file_path = os.path.join(step_dir, relative)
    if not os.path.isfile(file_path):
      return f"{relative} is missing"
    actual = os.path.getsize(file_path)
    if actual != size:
      return f"{relative} has {actual} bytes, {size} when saved"
    with open(file_path, "rb") as f:
      if hashlib.file_digest(f, "sha256").hexdigest() != digest:
        return f"{relative} differs from the saved file (SHA-256 mismatch)"
  return None


def _metadata_problem(step_dir: str) -> str | None:
  """What is wrong with the JSON metadata files of a step directory (each must parse when
  present), or None: the checks a step without a manifest still allows."""
  for relative in ("_CHECKPOINT_METADATA", os.path.join("metrics", "metrics")):
    try:
      with open(os.path.join(step_dir, relative), encoding="utf-8") as f:
        json.load(f)
    except FileNotFoundError:
      pass
    except (OSError, ValueError) as e:
      return f"{relative} is unreadable ({e})"
  return None


def step_problem(step_dir: str) -> str | None:
  """What is wrong with a step directory: `manifest_problem` when it has a manifest, else
  `_metadata_problem` (its array bytes cannot be checked then), or None."""
  if os.path.exists(os.path.join(step_dir, MANIFEST_FILE)):
    return manifest_problem(step_dir)
  return _metadata_problem(step_dir)


def step_identity(step_dir: str) -> str:
  """A digest that differs between two saves of a step (orbax's _CHECKPOINT_METADATA records
  the save's time, the manifest every file's SHA-256): what a cache of a checkpoint's outputs
  is keyed by, so that a run trained again to the same step never reuses the old outputs."""
  digest = hashlib.sha256()
  for name in (MANIFEST_FILE, "_CHECKPOINT_METADATA"):
    path = os.path.join(step_dir, name)
    if os.path.isfile(path):
      with open(path, "rb") as f:
        digest.update(name.encode() + b"\0" + f.read())
  return digest.hexdigest()[:16]


@contextlib.contextmanager
def _orbax_warnings_silenced():
  """absl warnings off for a call: reading a step's metadata without restoring it makes orbax
  warn that the item "could not be restored", a line every run that resumes printed before
  its own messages (or before the one-line error of a workdir conflict)."""
  previous = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(previous)


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
  value and orbax never deletes it. `create=False` (the readers of a run: evaluation, analyses)
  never creates the directory: a run without checkpoints is left as it was.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, best_metric: str = "",
               best_mode: str = "min", step_metadata: Mapping[str, Any] | None = None,
               create: bool = True):
    if best_mode not in BEST_MODES:
      raise ValueError(f"best_mode must be one of {BEST_MODES}, got {best_mode!r}")
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1 (a run keeps at least its latest step), got "
                       f"{max_to_keep}")
    self.directory = os.path.abspath(directory)
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise NotADirectoryError(
          f"{self.directory} is a file, not the run's checkpoints folder: move it away (a run "
          "keeps its checkpoint steps in that folder)")
    self.step_metadata = dict(step_metadata) if step_metadata else None
    self._unsealed: list[int] = []  # Steps saved here whose manifest is not written yet.
    # Steps restored without a manifest: their bytes are unverified (warned once each).
    self.unverified_steps: list[int] = []
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
          best_fn=rank, best_mode=best_mode, preservation_policy=keep, create=create,
          enable_async_checkpointing=True)
    else:
      self._options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                                   enable_async_checkpointing=True)
    self._open()

  def _open(self) -> None:
    """Opens orbax's manager over the directory. Opening reads every step's saved metrics; a
    step whose files fail its manifest, or whose metadata no longer parses, is moved aside
    then, and the manager opened again."""
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=self._options)
    except Exception as e:  # pylint: disable=broad-except (orbax raises many types)
      damaged = self._unreadable_steps()[:64] if jax.process_index() == 0 else []
      if jax.process_count() > 1:  # Process 0's verdict, as a fixed-size list of steps.
        from jax.experimental import multihost_utils
        found = {s: problem for s, problem in damaged}
        steps = multihost_utils.broadcast_one_to_all(
            np.asarray([s for s, _ in damaged] + [-1] * (64 - len(damaged)), np.int64))
        damaged = [(int(s), found.get(int(s), "found by process 0")) for s in steps if s >= 0]
      if not damaged:
        raise CorruptCheckpointError(f"cannot open the checkpoints in {self.directory}: "
                                     f"{type(e).__name__}: {e}") from e
      for step, problem in damaged:
        print(f"WARNING: checkpoint step {step} in {self.directory} is damaged: {problem}; "
              "moving it aside.", file=sys.stderr, flush=True)
        self._move_aside(step)
      self._manager = ocp.CheckpointManager(self.directory, options=self._options)
    self._best = self._saved_best()

  def _unreadable_steps(self) -> list[tuple[int, str]]:
    """(step, problem) of each step directory that fails its manifest or, without one, whose
    JSON metadata does not parse."""
    damaged = []
    for name in sorted(os.listdir(self.directory)):
      step_dir = os.path.join(self.directory, name)
      if not name.isdigit() or not os.path.isdir(step_dir):
        continue
      problem = step_problem(step_dir)
      if problem:
        damaged.append((int(name), problem))
    return damaged

  def _move_aside(self, step: int) -> None:
    """Renames step directory <step> to <step>.corrupt-<n> (kept for inspection, never
    deleted), on process 0, seen by every process when this returns."""
    if jax.process_index() == 0:
      path = os.path.join(self.directory, str(step))
      n = 0
      while os.path.exists(f"{path}.corrupt-{n}"):
        n += 1
      os.replace(path, f"{path}.corrupt-{n}")
    if jax.process_count() > 1:  # Every process sees the rename before rescanning.
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"checkpoint_quarantine_{step}")

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
    self._manager.wait_until_finished()  # orbax would wait too; the finished step is sealed.
    self._seal()
    saved = self._manager.save(step, args=ocp.args.StandardSave(state), force=force,
                               metrics=record, custom_metadata=self.step_metadata)
    if saved:
      self._unsealed.append(step)
    if saved and record:
      self._best = (step, record[self.best_metric])
    return saved

  def _seal(self) -> None:
    """Writes the manifest of every step this checkpointer saved whose save has finished."""
    if not self._unsealed or self._manager.is_saving_in_progress():
      return
    if jax.process_index() == 0:
      for step in self._unsealed:
        step_dir = os.path.join(self.directory, str(step))
        if os.path.isdir(step_dir) and step in self.all_steps():  # Not rotated away.
          write_manifest(step_dir)
    self._unsealed = []

  def poll(self) -> None:
    """Seals finished saves (cheap when none finished): call it between steps, so that a step
    gets its manifest soon after its asynchronous save ends."""
    self._seal()

  def recorded_metadata(self, step: int | None = None) -> dict[str, Any]:
    """The `step_metadata` saved with `step` (default: the newest step holding one), or {}
    (steps saved without it, or an unreadable step metadata file)."""
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    for s in steps:
      try:
        with _orbax_warnings_silenced():
          custom = self._manager.metadata(s).custom_metadata
      except Exception:  # pylint: disable=broad-except (a damaged metadata file)
        custom = None
      if custom:
        return dict(custom)
    return {}

  def restore(self, abstract_state: Any, step: int | None = None) -> Any:
    """Restores `step` (default: latest) into the structure of `abstract_state`.

    Raises CheckpointMismatchError naming the mismatching fields when the checkpoint was written
    by a model of another shape (e.g. a different config in the same workdir), and
    CorruptCheckpointError when the step directory is incomplete or damaged. A step without a
    manifest is restored with a warning on stderr and listed in `unverified_steps`.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    if step not in self.all_steps():
      raise FileNotFoundError(f"no checkpoint step {step} in {self.directory} (steps kept: "
                              f"{self.all_steps()})")
    problem = self._verified_problem(step)
    if problem:
      raise CorruptCheckpointError(f"checkpoint step {step} in {self.directory} is damaged: "
                                   f"{problem}")
    try:
      state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # pylint: disable=broad-except (orbax/tensorstore raise many types)
      try:
        saved = self._manager.item_metadata(step)
      except Exception:  # pylint: disable=broad-except
        saved = None
      if not _has_arrays(saved):
        raise CorruptCheckpointError(
            f"checkpoint step {step} in {self.directory} is incomplete (no readable metadata): "
            f"{_summary(e)}") from e
      detail = _describe_mismatch(saved, abstract_state)
      if not detail:  # Same structure and shapes: the data itself is damaged.
        raise CorruptCheckpointError(
            f"checkpoint step {step} in {self.directory} is damaged: {_summary(e)}") from e
      raise CheckpointMismatchError(
          f"checkpoint step {step} in {self.directory} does not match the current model "
          f"({detail}); use another --workdir or the config that wrote it") from e
    if (not os.path.exists(os.path.join(self.directory, str(step), MANIFEST_FILE))
        and step not in self.unverified_steps):
      self.unverified_steps.append(step)
      if jax.process_index() == 0:
        print(f"WARNING: checkpoint step {step} in {self.directory} has no {MANIFEST_FILE} "
              "(saved before manifests existed, or its run stopped before writing it): its "
              "metadata was checked and its arrays restored, but their bytes cannot be "
              "verified.", file=sys.stderr, flush=True)
    return state

  def _verified_problem(self, step: int) -> str | None:
    """`step_problem` of a step as process 0 sees it, on every process."""
    problem = (step_problem(os.path.join(self.directory, str(step)))
               if jax.process_index() == 0 else None)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      damaged = multihost_utils.broadcast_one_to_all(np.int32(problem is not None))
      if int(damaged) and problem is None:
        problem = "its files differ from its manifest (checked by process 0)"
    return problem

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
        self._move_aside(step)
        # A fresh manager: one that has seen a damaged step can misjudge the layout of the
        # others (e.g. take an emptied directory for a multi-item checkpoint).
        self._manager.close()
        self._open()
    return None

  def wait(self) -> None:
    self._manager.wait_until_finished()
    self._seal()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._seal()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def latest_step(directory: str) -> int | None:
  """The newest finalised checkpoint step in `directory`, or None (creates nothing)."""
  with Checkpointer(directory, create=False) as checkpointer:
    return checkpointer.latest_step()
