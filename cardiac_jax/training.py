"""The training loop: config + data iterators -> trained, checkpointed, logged model.

`train_and_evaluate(config, workdir, data)` is what `python -m experiments.train` calls; it needs
no flags, so tests run it directly. The loop

- writes the resolved config to workdir/config.json, and refuses a workdir written by a
  different config (fields that may change on resume: `RESUMABLE_FIELDS`);
- restores the latest orbax checkpoint when there is one and continues from its step: the data
  iterator starts at that step and per-step keys are `fold_in(rng, step)`, so a resumed run
  is the run that would have happened without interruption;
- compiles the family's pure step once over the device mesh, donating the state, with the
  backend of config.parallel.backend ("jit" or "pmap", see `cardiac_jax.parallel`);
- stops at a non-finite loss or gradient naming the step and the metrics, writes the offending
  batch's subject ids to workdir/nonfinite_step<N>.json and keeps the last good checkpoint
  (or, with train.skip_nonfinite, skips such updates and counts them);
- on SIGTERM/SIGINT (reaching any process) finishes the current step, saves a checkpoint and
  exits cleanly, every process after the same step;
- logs scalars (metrics.jsonl + TensorBoard), a progress bar, periodic validation metrics and
  the family's figures from process 0 only;
- with config.train.best_metric (a logged validation metric, e.g. "val/reconstruction_loss",
  better when lower for train.best_mode "min"), keeps the checkpoint of the best evaluation
  besides the latest train.max_checkpoints ones: an evaluation that improves on the best saves
  its step at once, and workdir/best_checkpoint.json names it (`BEST_FILE`); a resumed run
  continues from the best recorded in its checkpoints.

A model family (`steps.FAMILIES`, chosen by config.model.family) is an object built as
`Family(config, axis_name=None)` with
- `skip_nonfinite: bool` and `init_state(key) -> TrainState`;
- `train_step`: pure `(state, batch, key) -> (state, metrics)`, scalar metrics including "loss",
  "finite" and "skipped_nonfinite"; with `axis_name` set (pmap backend) it averages gradients
  and metrics over that axis so the update equals the jit one;
- `warmup_train_step` (or None) and `uses_warmup(step)`: a first training stage;
- `eval_step(state, batch) -> {key: (B, ...) array}`, pure; `eval_metric_keys` (averaged over
  real examples and logged as val/<key>), `eval_keep_keys` and `finalize_eval(outputs)` for
  metrics of a whole split (e.g. AUC);
- `save_figures(state, examples, figures_dir, step, key)`;
- cine families also `batch_fields`: the array fields of a cine batch they read, so that the
  pipeline copies and augments only those (`data_pipelines.cine`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np

from cardiac_jax import checkpointing, distributed, metric_logging, parallel, steps
from cardiac_jax.train_state import TrainState

# Config fields that may differ between the run that wrote a workdir and the one resuming it.
RESUMABLE_FIELDS = ("train.num_steps", "train.log_every", "train.eval_every",
                    "train.checkpoint_every", "train.figure_every", "train.progress_bar",
                    "train.max_checkpoints")
# Config sections that training never reads (settings of later analyses, e.g. the latent DDIM
# of a diffusion autoencoder): they may differ, or be new, when a run resumes.
ANALYSIS_SECTIONS = ("latent.",)

# Config fields added after runs were written, with the value that reproduces those runs: a
# saved config without the field is read as having this value (when the resuming config has
# the field), so the run still resumes.
ADDED_FIELD_DEFAULTS = {"model.remat": "none", "diffusion.p2_gamma": 0.0,
                        "diffusion.p2_k": 1.0, "eval.ddim_grid": "even"}
# Added fields that choose which checkpoints are kept, not what is trained: a saved config
# without them takes the resuming config's values (the run keeps a best checkpoint from its
# next evaluation on). A value the run was written with may not change.
ADOPTED_FIELDS = ("train.best_metric", "train.best_mode")
# The best checkpoint of a run with train.best_metric: {"metric", "mode", "step", "value"}.
BEST_FILE = "best_checkpoint.json"


class NonFiniteError(FloatingPointError):
  """Training produced a non-finite loss or gradient."""


class WorkdirConflictError(ValueError):
  """The workdir belongs to a run with a different config."""


class Preempted(Exception):
  """Training stopped at a signal after saving a checkpoint (rerun the command to resume)."""


@dataclasses.dataclass
class DataSource:
  """What the loop needs from the data side (built by experiments from data_pipelines).

  train_batches(start_step) -> infinite iterator of this process's rows of global batches,
      batch k of the iterator being global step start_step + k.
  eval_batches() -> one pass over the validation split (dicts with an optional bool "mask").
  """
  train_batches: Callable[[int], Iterator[dict[str, np.ndarray]]]
  eval_batches: Callable[[], Iterable[dict[str, np.ndarray]]]


def flatten_config(tree: dict, prefix: str = "") -> dict[str, Any]:
  """{"model.channels": (32, 64), ...} from a nested config dict (e.g. config.json).

  JSON turns the config's tuples into lists; lists become tuples so values are hashable.
  """
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten_config(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
  return out


def check_workdir_config(workdir: str, config) -> None:
  """Writes workdir/config.json, or checks that an existing one comes from the same config."""
  path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    b = flatten_config(current)
    # An added field counts at its old value only in configs that have it (its section).
    added = {k: v for k, v in ADDED_FIELD_DEFAULTS.items() if k in b}
    added.update({k: b[k] for k in ADOPTED_FIELDS if k in b})
    a = {**added, **flatten_config(saved)}
    differing = sorted(k for k in set(a) | set(b)
                       if a.get(k) != b.get(k) and k not in RESUMABLE_FIELDS
                       and not k.startswith(ANALYSIS_SECTIONS))
    if differing:
      details = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in differing[:8])
      raise WorkdirConflictError(
          f"{workdir} holds a run with a different config ({details}). Use another --workdir, "
          "or the same config to resume.")
  if jax.process_index() == 0:
    _write_json(path, current)


def _write_json(path: str, data: dict) -> None:
  """Writes `data` as JSON atomically (a reader sees the old file or the new one)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _record_best(workdir: str, checkpointer: checkpointing.Checkpointer) -> None:
  """Writes workdir/BEST_FILE from the checkpointer's best (removes a stale one without)."""
  path = os.path.join(workdir, BEST_FILE)
  best = checkpointer.best()
  if best is not None:
    _write_json(path, {"metric": checkpointer.best_metric, "mode": checkpointer.best_mode,
                       "step": int(best[0]), "value": float(best[1])})
  elif os.path.exists(path):
    os.remove(path)


def _check_best_metric(config) -> None:
  """A clear error for a train.best_metric / best_mode that cannot select a checkpoint."""
  name, mode = config.train.get("best_metric", ""), config.train.get("best_mode", "min")
  if mode not in checkpointing.BEST_MODES:
    raise ValueError(f"train.best_mode must be one of {checkpointing.BEST_MODES}, got {mode!r}")
  if name and not name.startswith("val/"):
    raise ValueError(f"train.best_metric must name a validation metric as logged in "
                     f"metrics.jsonl (val/<name>, e.g. val/reconstruction_loss), got {name!r}; "
                     "'' keeps no best checkpoint")


class _SignalFlag:
  """Records SIGTERM/SIGINT so the loop can checkpoint and stop between steps."""

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # Not the main thread: leave signals alone.
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # Second Ctrl-C: stop at once.
    self.received = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


def _host(x) -> np.ndarray:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def evaluate(family, state: TrainState, batches: Iterable[dict], mesh,
             eval_fn: Callable | None = None, keep: Iterable[str] = (),
             cache_dir: str | None = None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Runs the family's eval step over `batches` (one pass over a split).

  Returns (metrics, outputs). metrics: the mean over real examples (the batches' bool "mask"
  marks padding rows) of every `family.eval_metric_keys` output ((B, C) values also give one
  <key>_ch<c> entry per channel and their mean), plus `family.finalize_eval(outputs)`.
  outputs: per-example numpy arrays, concatenated over the split, of the keys in
  `family.eval_keep_keys` and `keep` (eval-step outputs or batch fields).

  With `cache_dir`, each batch's real rows are written to cache_dir/batch_<i>.npz as they are
  computed and read back instead of recomputed on a rerun, so an interrupted evaluation of a
  large cohort resumes where it stopped (the cache belongs to one checkpoint and split; it is
  used by single-process evaluations).
  """
  eval_fn = eval_fn or parallel.jit_eval_step(family.eval_step, mesh)
  keep = tuple(dict.fromkeys(tuple(family.eval_keep_keys) + tuple(keep)))
  if jax.process_count() > 1:
    cache_dir = None  # Processes would have to agree on which batches are done.
  if cache_dir is not None:
    os.makedirs(cache_dir, exist_ok=True)
  sums: dict[str, np.ndarray] = {}
  count = 0
  kept: dict[str, list] = {}
  for i, batch in enumerate(batches):
    path = os.path.join(cache_dir, f"batch_{i:06d}.npz") if cache_dir else None
    rows = _read_cached_rows(path) if path else None
    if rows is None:
      size = len(next(iter(batch.values())))
      mask = np.asarray(batch.get("mask", np.ones(size, bool)), bool)
      out = {k: _host(v) for k, v in eval_fn(state, parallel.shard_batch(batch, mesh)).items()}
      mask = _host(mask) if jax.process_count() > 1 else mask
      rows = {k: out[k][mask] for k in family.eval_metric_keys}
      for k in keep:
        if k in out:
          rows[k] = out[k][mask]
        elif k in batch:
          rows[k] = _host(np.asarray(batch[k]))[mask] if jax.process_count() > 1 else (
              np.asarray(batch[k])[mask])
      if path:
        with open(path + ".tmp", "wb") as f:
          np.savez(f, **rows)
        os.replace(path + ".tmp", path)
    for k in family.eval_metric_keys:
      sums[k] = sums.get(k, 0.0) + rows[k].sum(axis=0)
    count += len(rows[family.eval_metric_keys[0]])
    for k in keep:
      if k in rows:
        kept.setdefault(k, []).append(rows[k])
  if not count:
    raise ValueError("evaluation saw no examples (empty split?)")
  metrics: dict[str, float] = {}
  for k, total in sums.items():
    mean = np.asarray(total) / count
    if mean.ndim:  # Per-channel (C,) values.
      for c, v in enumerate(mean):
        metrics[f"{k}_ch{c}"] = float(v)
      metrics[k] = float(mean.mean())
    else:
      metrics[k] = float(mean)
  outputs = {k: np.concatenate(v) for k, v in kept.items()}
  metrics.update(family.finalize_eval(outputs))
  return metrics, outputs


def _read_cached_rows(path: str) -> dict[str, np.ndarray] | None:
  """A finished batch of an interrupted evaluation, or None (absent or unreadable)."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except (OSError, ValueError, EOFError):
    return None  # Damaged (e.g. disk full while writing): recompute it.


def _figure_examples(data: DataSource) -> dict[str, np.ndarray]:
  """The first <= 8 real rows of the first validation batch (fixed across a run)."""
  first = next(iter(data.eval_batches()))
  size = len(next(iter(first.values())))
  real = np.asarray(first.get("mask", np.ones(size, bool)), bool)
  return {k: np.asarray(v)[real][:8] for k, v in first.items()
          if k != "mask" and np.ndim(v) and len(v) == size}


def train_and_evaluate(config, workdir: str, data: DataSource) -> TrainState:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns the final state."""
  distributed.initialize_from_environment()  # Multi-host runs: before any device is touched.
  workdir = os.path.abspath(workdir)
  is_chief = jax.process_index() == 0
  _check_best_metric(config)
  check_workdir_config(workdir, config)
  writer = metric_logging.MetricWriter(workdir, enabled=is_chief)
  figures_dir = os.path.join(workdir, "figures")
  tc = config.train

  mesh = parallel.make_mesh(config.parallel.num_devices)
  parallel.check_batch_size(tc.batch_size, mesh)
  parallel.check_backend(config.parallel.backend)
  family = steps.make_family(config)
  root_key = jax.random.key(config.seed)
  # Independent streams: parameters (fold_in 0, inside init_state), training steps, figures.
  step_keys, figure_key = jax.random.fold_in(root_key, 1), jax.random.fold_in(root_key, 2)
  init = jax.jit(family.init_state, out_shardings=parallel.replicated(mesh))
  best_metric = tc.get("best_metric", "")
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                            max_to_keep=tc.max_checkpoints,
                                            best_metric=best_metric,
                                            best_mode=tc.get("best_mode", "min"))
  restored = checkpointer.restore_latest(
      parallel.abstract_state(family.init_state, root_key, mesh))
  if restored is None:
    state, start_step = init(root_key), 0
  else:
    state, start_step = restored
  writer.truncate_after(start_step)  # Lines beyond the restored step (or all, from scratch).
  if is_chief:
    _record_best(workdir, checkpointer)  # Repairs a record of a save that never completed.
  if start_step:
    print(f"Resuming {workdir} from step {start_step}.", flush=True)

  compile_step = lambda name: parallel.compile_train_step(
      lambda axis: getattr(steps.make_family(config, axis_name=axis), name), mesh,
      config.parallel.backend)
  train_step = compile_step("train_step")
  warmup_step = (compile_step("warmup_train_step")
                 if family.warmup_train_step is not None else None)
  eval_fn = parallel.jit_eval_step(family.eval_step, mesh)
  figure_examples = _figure_examples(data) if is_chief and tc.figure_every else None

  def run_eval(step: int) -> dict[str, float]:
    """The validation metrics of `step`, logged and returned under their val/ names."""
    metrics, _ = evaluate(family, state, data.eval_batches(), mesh, eval_fn)
    writer.write(step, metrics, prefix="val/")
    metrics = {f"val/{k}": v for k, v in metrics.items()}
    if best_metric and best_metric not in metrics:
      raise ValueError(f"train.best_metric {best_metric!r} is not among the validation "
                       f"metrics of this model ({', '.join(sorted(metrics))})")
    return metrics

  def save(step: int, evaluated: dict[str, float] | None, force: bool = False) -> None:
    """Saves `step` with its validation metrics (None if not evaluated at this step)."""
    before = checkpointer.best()
    checkpointer.save(step, state, force=force, metrics=evaluated)
    if is_chief and checkpointer.best() != before:
      _record_best(workdir, checkpointer)

  progress = None
  if is_chief and tc.progress_bar and start_step < tc.num_steps:
    from tqdm import auto as tqdm
    progress = tqdm.tqdm(total=tc.num_steps, initial=start_step, desc=config.name or "train",
                         dynamic_ncols=True)
  batches = data.train_batches(start_step)
  accumulated: dict[str, float] = {}
  accumulated_steps = 0
  interval_start = time.perf_counter()
  step = start_step
  evaluated = None  # Validation metrics of the current step, when it was evaluated.
  try:
    with _SignalFlag() as flag:
      while step < tc.num_steps:
        batch = next(batches)
        key = jax.random.fold_in(step_keys, step)
        fn = warmup_step if family.uses_warmup(step) else train_step
        state, metrics = fn(state, batch, key)
        metrics = jax.device_get(metrics)
        step += 1
        if not metrics["finite"] and not family.skip_nonfinite:
          _report_nonfinite(workdir, step, metrics, batch, is_chief)
        for k, v in metrics.items():
          accumulated[k] = accumulated.get(k, 0.0) + float(v)
        accumulated_steps += 1
        if progress is not None:
          progress.update(1)
        if step % tc.log_every == 0 or step == tc.num_steps:
          elapsed = time.perf_counter() - interval_start
          means = {k: v / accumulated_steps for k, v in accumulated.items()}
          means["skipped_nonfinite"] = float(metrics["skipped_nonfinite"])
          means["steps_per_sec"] = accumulated_steps / max(elapsed, 1e-9)
          writer.write(step, means, prefix="train/")
          if progress is not None:
            progress.set_postfix(loss=f"{means['loss']:.4g}",
                                 steps_s=f"{means['steps_per_sec']:.2f}")
          accumulated, accumulated_steps = {}, 0
          interval_start = time.perf_counter()
        evaluated = None
        if tc.eval_every and (step % tc.eval_every == 0 or step == tc.num_steps):
          evaluated = run_eval(step)
        # An improving evaluation is saved at once: it becomes the best checkpoint.
        if ((tc.checkpoint_every and step % tc.checkpoint_every == 0)
            or checkpointer.improves(evaluated)):
          save(step, evaluated)
        if figure_examples is not None and (step % tc.figure_every == 0
                                            or step == tc.num_steps):
          os.makedirs(figures_dir, exist_ok=True)
          family.save_figures(state, figure_examples, figures_dir, step, figure_key)
        # Every process stops after the same step, or the collective save would hang.
        if parallel.any_process(flag.received is not None):
          checkpointer.wait()
          if checkpointer.latest_step() != step:  # The periodic save may have just run.
            save(step, evaluated, force=True)
          checkpointer.wait()
          cause = (f"received signal {flag.received}" if flag.received is not None
                   else "another process received a signal")
          raise Preempted(f"{cause} at step {step}: checkpoint saved in "
                          f"{checkpointer.directory}; rerun the same command to resume.")
      if checkpointer.latest_step() != step:
        save(step, evaluated, force=True)
  finally:
    # Stop the input pipeline's threads now: left to interpreter shutdown, a tf.data iterator
    # with in-flight numpy_function calls can deadlock and keep a preempted process alive.
    if hasattr(batches, "close"):
      batches.close()
    checkpointer.close()
    writer.close()
    if progress is not None:
      progress.close()
  return state


def _report_nonfinite(workdir: str, step: int, metrics: dict, batch: dict,
                      is_chief: bool) -> None:
  bad = sorted(k for k, v in metrics.items() if not np.all(np.isfinite(v)))
  subjects = [str(s) for s in np.asarray(batch.get("subject", []))]
  path = os.path.join(workdir, f"nonfinite_step{step:07d}.json")
  if is_chief:
    with open(path, "w") as f:
      json.dump({"step": step, "nonfinite_metrics": bad, "subjects": subjects,
                 "metrics": {k: str(float(np.asarray(v))) for k, v in metrics.items()}},
                f, indent=2)
  raise NonFiniteError(
      f"non-finite values at step {step} in {', '.join(bad) or 'gradients/parameters'}; the "
      f"batch's subject ids are in {path}; the last good checkpoint is kept. Lower the "
      "learning rate (or for Soft-IntroVAE raise loss.beta_neg), or set "
      "train.skip_nonfinite=True to skip such updates.")
