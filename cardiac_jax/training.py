"""The training loop: config + data iterators -> trained, checkpointed, logged model.

`train_and_evaluate(config, workdir, data)` is what `python -m experiments.train` calls; it needs
no flags, so tests run it directly. The loop

- checks the config (`config_checks.validate`), the workdir path, the device and process
  layout and the model's abstract state before it writes anything, so that a mistake leaves no
  trace that refuses the corrected rerun;
- holds an exclusive lock on the workdir (`cardiac_jax.workdir.WorkdirLock`): a second run on
  it is refused naming the holder;
- writes the resolved config to workdir/config.json, and refuses a workdir written by a
  different config (`cardiac_jax.run_config`); every checkpoint
  records the config too, so a workdir whose config.json was deleted resumes only under the
  config that wrote it (and gets its config.json back), and a damaged config.json is named
  with the fix. A workdir that holds no checkpoint has no run to protect: a new config
  replaces its config.json;
- restores the latest orbax checkpoint when there is one and continues from its step: the data
  iterator starts at that step and per-step keys are `fold_in(rng, step)`, so a resumed run
  is the run that would have happened without interruption; a damaged step is moved aside
  and the previous one restored (`cardiac_jax.checkpointing`); metrics.jsonl keeps the
  records up to that step (a partial last line is dropped) and an evaluation the restored
  step should have logged but did not is run again;
- compiles the family's pure step once over the device mesh, donating the state, with the
  backend of config.parallel.backend ("jit" or "pmap", see `cardiac_jax.parallel`);
- stops at a non-finite loss or gradient naming the step and the metrics, writes the offending
  batch's subject ids to workdir/nonfinite_step<N>.json and keeps the last good checkpoint
  (or, with train.skip_nonfinite, skips such updates and counts them);
- on SIGTERM/SIGINT (reaching any process) finishes the current step, saves a checkpoint and
  exits cleanly, every process after the same step;
- logs scalars (metrics.jsonl + TensorBoard), a progress bar (latest loss, steps/s, time left),
  periodic validation metrics (val/...) and the family's figures (PNG files, and the same images
  in TensorBoard as figures/<name>) from process 0 only, and the resolved config once as
  TensorBoard text (`CONFIG_TAG`);
- with config.train.best_metric (a logged validation metric, e.g. "val/reconstruction_loss",
  better when lower for train.best_mode "min"), keeps the checkpoint of the best evaluation
  besides the latest train.max_checkpoints ones: an evaluation that improves on the best saves
  its step at once, and workdir/best_checkpoint.json names it (`BEST_FILE`); a resumed run
  continues from the best recorded in its checkpoints.

The model family (`cardiac_jax.families`, chosen by config.model.family) supplies the state,
the pure steps, the evaluation outputs and the figures; its contract is
`cardiac_jax.families.base.ModelFamily`.
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

from cardiac_jax import (checkpointing, config_checks, distributed, families, io,
                         metric_logging, parallel, run_config)
from cardiac_jax import workdir as workdir_lib
from cardiac_jax.train_state import TrainState

# The best checkpoint of a run with train.best_metric: {"metric", "mode", "step", "value"}.
BEST_FILE = "best_checkpoint.json"
# TensorBoard tags: the resolved config (text, step 0) and the prefix of the figures (images).
CONFIG_TAG = "config"
FIGURE_TAG_PREFIX = "figures/"


class NonFiniteError(FloatingPointError):
  """Training produced a non-finite loss or gradient."""


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


# What a run writes in its workdir, and the kind each entry must be. A hand-made entry of the
# other kind (a folder named metrics.jsonl, a file named checkpoints) is refused before the run
# starts: it used to end in a raw OSError after the data were prepared, or inside orbax after
# the first steps, with metrics.jsonl already emptied.
WORKDIR_FILES = ("config.json", "metrics.jsonl", BEST_FILE, workdir_lib.LOCK_FILE)
WORKDIR_FOLDERS = ("checkpoints", "figures", metric_logging.TENSORBOARD_DIR)


def check_workdir_entries(workdir: str) -> None:
  """workdir.WorkdirError naming the first entry of a run directory that has the wrong kind
  (`WORKDIR_FILES` must be files, `WORKDIR_FOLDERS` folders); nothing to check in a new one."""
  for names, wanted, check in ((WORKDIR_FILES, "file", os.path.isfile),
                               (WORKDIR_FOLDERS, "folder", os.path.isdir)):
    for name in names:
      path = os.path.join(workdir, name)
      if os.path.lexists(path) and not check(path):
        raise workdir_lib.WorkdirError(
            f"{path} is not a {wanted}: a run keeps its {name} there; move it away (or use "
            "another --workdir) and rerun")


def _record_best(workdir: str, checkpointer: checkpointing.Checkpointer) -> None:
  """Writes workdir/BEST_FILE from the checkpointer's best (removes a stale one without)."""
  path = os.path.join(workdir, BEST_FILE)
  best = checkpointer.best()
  if best is not None:
    io.write_json(path, {"metric": checkpointer.best_metric, "mode": checkpointer.best_mode,
                       "step": int(best[0]), "value": float(best[1])})
  elif os.path.exists(path):
    os.remove(path)


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
      batch = _pad_rows(batch, len(parallel.local_devices(mesh)))
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
        io.write_npz(path, **rows)
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


def _pad_rows(batch: dict[str, Any], multiple: int) -> dict[str, Any]:
  """`batch` with padding rows (mask False) up to a multiple of `multiple` rows, so that an
  evaluation batch of any size shards over this process's devices."""
  size = len(next(iter(batch.values())))
  missing = -size % multiple
  if not missing:
    return batch
  batch = dict(batch)
  batch["mask"] = np.asarray(batch.get("mask", np.ones(size, bool)), bool)
  for k, v in batch.items():
    v = np.asarray(v)
    if v.ndim and len(v) == size:
      batch[k] = np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)])
  return batch


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


def _lock_workdir(workdir: str, is_chief: bool) -> workdir_lib.WorkdirLock:
  """The workdir's lock, held by process 0; every process raises WorkdirLockedError when
  process 0 could not take it."""
  lock = workdir_lib.WorkdirLock(workdir, enabled=is_chief)
  error = None
  try:
    lock.acquire()
  except workdir_lib.WorkdirLockedError as e:
    error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    refused = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if int(refused) and error is None:
      error = workdir_lib.WorkdirLockedError(
          f"{workdir} is in use by another run (refused on process 0); use another --workdir")
  if error is not None:
    raise error
  if lock.recovered:
    print(f"Taking over {lock.path} from a run that ended without releasing it "
          f"(process {lock.recovered.get('pid', '?')} on {lock.recovered.get('host', '?')}).",
          flush=True)
  return lock


def train_and_evaluate(config, workdir: str, data: DataSource) -> TrainState:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns the final state.

  Everything that can be checked without training is checked before the first write (config
  values, workdir path and entries, devices and processes, the model's shapes):
  config_checks.ConfigError, workdir.WorkdirError or ValueError then leave the workdir as it
  was.
  """
  distributed.initialize_from_environment()  # Multi-host runs: before any device is touched.
  config_checks.validate(config)
  config_checks.check_process_layout(config, jax.process_count())
  workdir_lib.check_path(workdir)
  check_workdir_entries(workdir)
  workdir = os.path.abspath(workdir)
  is_chief = jax.process_index() == 0
  tc = config.train
  mesh = parallel.make_mesh(config.parallel.num_devices)
  parallel.check_batch_size(tc.batch_size, mesh)
  parallel.check_backend(config.parallel.backend)
  family = families.make_family(config)
  root_key = jax.random.key(config.seed)
  abstract = parallel.abstract_state(family.init_state, root_key, mesh)  # The model builds.
  lock = _lock_workdir(workdir, is_chief)
  try:
    return _train(config, workdir, data, mesh, family, root_key, abstract)
  finally:
    lock.release()


def _train(config, workdir: str, data: DataSource, mesh, family, root_key,
           abstract) -> TrainState:
  """The loop of `train_and_evaluate`, in a checked and locked workdir."""
  is_chief = jax.process_index() == 0
  tc = config.train
  figures_dir = os.path.join(workdir, "figures")
  # Independent streams: parameters (fold_in 0, inside init_state), training steps, figures.
  step_keys, figure_key = jax.random.fold_in(root_key, 1), jax.random.fold_in(root_key, 2)
  best_metric = tc.get("best_metric", "")
  checkpointer = checkpointing.Checkpointer(
      os.path.join(workdir, "checkpoints"), max_to_keep=tc.max_checkpoints,
      best_metric=best_metric, best_mode=tc.get("best_mode", "min"),
      step_metadata={"config": json.loads(config.to_json_best_effort())})
  writer, batches, progress = None, None, None
  try:
    run_config.check_workdir_config(workdir, config, checkpointer)
    writer = metric_logging.MetricWriter(workdir, enabled=is_chief)
    restored = checkpointer.restore_latest(abstract)
    if restored is None:
      init = jax.jit(family.init_state, out_shardings=parallel.replicated(mesh))
      state, start_step = init(root_key), 0
    else:
      state, start_step = restored
    writer.truncate_after(start_step)  # Lines beyond the restored step (or all, from scratch).
    if is_chief:
      _record_best(workdir, checkpointer)  # Repairs a record of a save that never completed.
    if start_step:
      print(f"Resuming {workdir} from step {start_step}.", flush=True)
    if start_step >= tc.num_steps:
      print(f"{workdir} is at step {start_step} and train.num_steps is {tc.num_steps}: nothing "
            "to train.", flush=True)
    elif is_chief:
      print(_training_plan(config, workdir, start_step), flush=True)
    if start_step == 0:
      writer.write_text(0, CONFIG_TAG,
                        metric_logging.config_markdown(config.to_json_best_effort()))

    compile_step = lambda name: parallel.compile_train_step(
        lambda axis: getattr(families.make_family(config, axis_name=axis), name), mesh,
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

    # A restored evaluation step whose validation line is missing (a log cut short, a run
    # killed between the save and the log): evaluated again, every process together.
    if start_step and tc.eval_every and start_step % tc.eval_every == 0:
      missing = is_chief and not writer.has_record(start_step, "val/")
      if parallel.any_process(missing):
        print(f"Evaluating step {start_step} again: its validation metrics are missing from "
              f"{writer.path}.", flush=True)
        run_eval(start_step)

    if is_chief and tc.progress_bar and start_step < tc.num_steps:
      from tqdm import auto as tqdm
      progress = tqdm.tqdm(total=tc.num_steps, initial=start_step, desc=config.name or "train",
                           unit="step", dynamic_ncols=True)
    batches = data.train_batches(start_step) if start_step < tc.num_steps else iter(())
    late = _LateMetrics(workdir, family.skip_nonfinite, is_chief, progress)
    interval_start = time.perf_counter()
    step = start_step
    evaluated = None  # Validation metrics of the current step, when it was evaluated.
    with _SignalFlag() as flag:
      while step < tc.num_steps:
        batch = next(batches)
        key = jax.random.fold_in(step_keys, step)
        fn = warmup_step if family.uses_warmup(step) else train_step
        state, metrics = fn(state, batch, key)
        step += 1
        # The previous step's metrics are read while this one runs.
        late.push(step, metrics, batch.get("subject"))
        last = step == tc.num_steps
        log_now = step % tc.log_every == 0 or last
        eval_now = bool(tc.eval_every) and (step % tc.eval_every == 0 or last)
        save_now = bool(tc.checkpoint_every) and step % tc.checkpoint_every == 0
        figures_now = figure_examples is not None and (step % tc.figure_every == 0 or last)
        if log_now or eval_now or save_now or figures_now:
          late.flush()  # Nothing reads or saves a state whose step has not been checked.
        if log_now:
          means = late.take_means(time.perf_counter() - interval_start)
          writer.write(step, means, prefix="train/")
          late.steps_per_sec = means["steps_per_sec"]
          interval_start = time.perf_counter()
        evaluated = run_eval(step) if eval_now else None
        # An improving evaluation is saved at once: it becomes the best checkpoint.
        if save_now or checkpointer.improves(evaluated):
          save(step, evaluated)
        checkpointer.poll()  # Seals a save that finished in the background.
        if figures_now:
          os.makedirs(figures_dir, exist_ok=True)
          before = _png_stamps(figures_dir)
          family.save_figures(state, figure_examples, figures_dir, step, figure_key)
          _log_figures(writer, figures_dir, before, step)
        # Every process stops after the same step, or the collective save would hang.
        if parallel.any_process(flag.received is not None):
          late.flush()
          checkpointer.wait()
          if checkpointer.latest_step() != step:  # The periodic save may have just run.
            save(step, evaluated, force=True)
          checkpointer.wait()
          cause = (f"received signal {flag.received}" if flag.received is not None
                   else "another process received a signal")
          raise Preempted(f"{cause} at step {step}: checkpoint saved in "
                          f"{checkpointer.directory}; rerun the same command to resume.")
      late.flush()
      if checkpointer.latest_step() != step:
        save(step, evaluated, force=True)
  finally:
    # Stop the input pipeline's threads now: left to interpreter shutdown, a tf.data iterator
    # with in-flight numpy_function calls can deadlock and keep a preempted process alive.
    if hasattr(batches, "close"):
      batches.close()
    checkpointer.close()
    if writer is not None:
      writer.close()
    if progress is not None:
      progress.close()
  return state


def _training_plan(config, workdir: str, start_step: int) -> str:
  """The line announcing the training phase: steps, where, and what is done when."""
  tc = config.train
  every = [f"{what} every {n}" for what, n in (("validation", tc.eval_every),
                                               ("checkpoint", tc.checkpoint_every),
                                               ("figures", tc.figure_every)) if n]
  first = "resuming at" if start_step else "starting at"
  return (f"Training {config.name or 'the model'} for {tc.num_steps} steps of "
          f"{tc.batch_size} examples into {workdir} ({first} step {start_step}"
          + (f"; {', '.join(every)} steps" if every else "") + "; the first step compiles "
          "the model). Watch it with: tensorboard --logdir "
          f"{os.path.join(workdir, 'tensorboard')}")


def _png_stamps(directory: str) -> dict[str, tuple[int, int]]:
  """{name: (modification time in ns, size)} of the PNG files in `directory`."""
  stamps = {}
  for entry in os.scandir(directory):
    if entry.name.endswith(".png") and entry.is_file():
      stat = entry.stat()
      stamps[entry.name] = (stat.st_mtime_ns, stat.st_size)
  return stamps


def _log_figures(writer: metric_logging.MetricWriter, directory: str,
                 before: dict[str, tuple[int, int]], step: int) -> None:
  """Logs every PNG the family's figure hook wrote (new or changed since `before`) as the
  TensorBoard image figures/<name> of `step`, <name> being the file's name without the step
  ("reconstructions_0000250.png" -> figures/reconstructions)."""
  suffix = f"_{step:07d}"
  for name, stamp in sorted(_png_stamps(directory).items()):
    if before.get(name) == stamp:
      continue
    stem = name[:-len(".png")]
    with open(os.path.join(directory, name), "rb") as f:
      writer.write_png(step, FIGURE_TAG_PREFIX + stem.removesuffix(suffix), f.read())


class _LateMetrics:
  """Train metrics read one step late: step N's metrics are fetched after step N + 1 has been
  dispatched, so the host never makes the device wait (nanodo). `flush()` reads the pending
  step at once; the loop calls it before anything that uses the state (logging, evaluation,
  checkpoints, figures, stopping), so a non-finite step is still named and never saved."""

  def __init__(self, workdir: str, skip_nonfinite: bool, is_chief: bool, progress):
    self.workdir, self.skip_nonfinite, self.is_chief = workdir, skip_nonfinite, is_chief
    self.progress = progress
    self.steps_per_sec: float | None = None  # Of the last logged interval (progress bar).
    self.pending = None
    self.sums: dict[str, float] = {}
    self.count = 0
    self.last: dict[str, Any] = {}

  def push(self, step: int, metrics, subjects) -> None:
    previous, self.pending = self.pending, (step, metrics, subjects)
    if previous is not None:
      self._read(*previous)

  def flush(self) -> None:
    if self.pending is not None:
      pending, self.pending = self.pending, None
      self._read(*pending)

  def _read(self, step: int, metrics, subjects) -> None:
    metrics = jax.device_get(metrics)
    if not metrics["finite"] and not self.skip_nonfinite:
      _report_nonfinite(self.workdir, step, metrics, subjects, self.is_chief)
    for k, v in metrics.items():
      self.sums[k] = self.sums.get(k, 0.0) + float(v)
    self.count += 1
    self.last = metrics
    if self.progress is not None:
      postfix = {"loss": f"{float(metrics['loss']):.4g}"}
      if self.steps_per_sec is not None:
        postfix["steps_s"] = f"{self.steps_per_sec:.2f}"
      self.progress.set_postfix(postfix, refresh=False)  # Drawn by update's refresh.
      self.progress.update(1)

  def take_means(self, elapsed: float) -> dict[str, float]:
    """Means of the steps read since the last call, the skipped-update count of the last step
    and the steps per second over `elapsed` seconds; starts a new interval."""
    means = {k: v / self.count for k, v in self.sums.items()}
    means["skipped_nonfinite"] = float(self.last["skipped_nonfinite"])
    means["steps_per_sec"] = self.count / max(elapsed, 1e-9)
    self.sums, self.count = {}, 0
    return means


def _report_nonfinite(workdir: str, step: int, metrics: dict, subjects,
                      is_chief: bool) -> None:
  bad = sorted(k for k, v in metrics.items() if not np.all(np.isfinite(v)))
  subjects = [str(s) for s in np.asarray(subjects if subjects is not None else [])]
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
