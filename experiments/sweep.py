"""Run an ablation grid of config overrides and seeds: `python -m experiments.sweep
--config=NAME[:variant] --set=config.loss.gamma=0,0.05,0.1 [--set=...] --seeds=0,1,2
[--root=DIR] [--dry_run] [--extra=--config.train.num_steps=100] [--eval_steps=latest,best]`.

The grid is the cartesian product of every --set list and the seeds (the AR-VAE / AR-SIVAE
papers sweep gamma and delta over decades and report mean ± std over seeds). Each job gets its
own workdir under --root named from its settings (`gamma=0.05,seed=1`) and runs, one after the
other and each in its own process as on a cluster,

  python -m experiments.train --config=SPEC --workdir=DIR --config.seed=S --config.loss.gamma=V
  python -m experiments.evaluate --workdir=DIR
  python -m experiments.evaluate --workdir=DIR --step=best --output_dir=DIR/eval_best

(the second with --eval_steps=latest,best: the best validation checkpoint evaluated beside the
final one) with the output of all appended to DIR/sweep.log. Before anything runs, every --set
key and every --config.* override in --extra is checked against the config (an unknown key or a
value of the wrong type is refused, naming it). A job whose evaluations all exist is skipped,
so rerunning the command finishes an interrupted sweep (a half-trained job resumes from its
checkpoint). A failing job is reported with the tail of its log and the sweep goes on. At the
end the evaluated jobs are compared (experiments.compare, grouped by config: mean ± std over
seeds) into <root>/comparison.md and comparison.csv.

Values are passed to the override flags as the strings given, so ml_collections parses them
into the field's type exactly as `experiments.train` does; a value containing commas (a tuple)
is kept whole when written in brackets: --set=config.model.channels=(8,16),(16,32).

--dry_run prints one shell line per job (`train && evaluate`, with the `python` of the job's
PATH, run from the directory the sweep was started in) and nothing else, e.g. to feed a SLURM
array: `sed -n "${SLURM_ARRAY_TASK_ID}p" jobs.txt | bash`; `python -m experiments.compare
--group_by_config <root>/*/` then builds the table.

--slurm=PATH writes a SLURM job array instead of running (one array task per job, task i
running line i of --dry_run: train, then the missing evaluations once the training has logged
its last step; requeue-safe, see docs/cluster.md; --slurm_partition, --slurm_time,
--slurm_gpus, --slurm_cpus, --slurm_max_running set its resources). --aggregate, given the same
--config/--set/--seeds/--root, builds the comparison tables from the jobs evaluated so far, as
the local sweep does at its end.

SIGINT/SIGTERM: the running job is forwarded the signal (training saves a checkpoint and
stops), and the sweep stops; rerun the same command to continue.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Sequence, TextIO

from absl import app, flags

from data_pipelines import errors as data_errors
from experiments import configs
from experiments.sweep_settings import (SweepAxis, SweepConfigError, check_root,
                                        parse_eval_steps, parse_extra, parse_seeds, parse_set,
                                        validate_sweep)

# The directory holding the `experiments` package: put on PYTHONPATH of the jobs so that
# `python -m experiments.train` works from any working directory.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_NAME = "sweep.log"
_LOG_TAIL_LINES = 25


@dataclasses.dataclass(frozen=True)
class Job:
  """One grid point: a workdir and the override flags that define it."""
  name: str                  # "gamma=0.05,seed=1": the workdir's basename.
  workdir: str
  seed: int
  overrides: tuple[str, ...]  # ("--config.seed=1", "--config.loss.gamma=0.05").


@dataclasses.dataclass
class JobResult:
  job: Job
  status: str                # "done" | "skipped" | "failed" | "interrupted".
  message: str = ""
  seconds: float = 0.0


# ------------------------------------------------------------------------------------------------
# The grid.
# ------------------------------------------------------------------------------------------------


def _value_for_name(value: str) -> str:
  """A value as it appears in a workdir name: brackets and quotes dropped, commas, spaces and
  path separators turned into '-' ("(8,16)" -> "8-16")."""
  value = re.sub(r"[()\[\]{}'\"]", "", value)
  return re.sub(r"[^A-Za-z0-9._+=-]", "-", value)


def axis_labels(axes: Sequence[SweepAxis]) -> list[str]:
  """Short names of the axes in workdir names: the field's last part ("gamma"), or the whole
  path when two axes share that last part."""
  leaves = [a.path.rsplit(".", 1)[-1] for a in axes]
  return [leaf if leaves.count(leaf) == 1 else axis.path for leaf, axis in zip(leaves, axes)]


def make_jobs(axes: Sequence[SweepAxis], seeds: Sequence[int], root: str) -> list[Job]:
  """The cartesian product of the axes' values and the seeds (seed varying fastest)."""
  labels = axis_labels(axes)
  jobs = []
  for values in itertools.product(*(a.values for a in axes)):
    for seed in seeds:
      name = ",".join([f"{label}={_value_for_name(v)}" for label, v in zip(labels, values)]
                      + [f"seed={seed}"])
      overrides = (f"--config.seed={seed}",) + tuple(
          f"{axis.flag}={value}" for axis, value in zip(axes, values))
      jobs.append(Job(name=name, workdir=os.path.join(root, name), seed=seed,
                      overrides=overrides))
  names = [j.name for j in jobs]
  clashes = sorted({n for n in names if names.count(n) > 1})
  if clashes:
    raise SweepConfigError(f"different values give the same workdir name {clashes}; write the "
                           "values so that they differ in letters or digits")
  return jobs


def default_root(config_spec: str, axes: Sequence[SweepAxis]) -> str:
  """workdirs/sweeps/<config>[_<variant>]_<swept fields> (or _seeds when only seeds vary)."""
  name = config_spec.replace(":", "_")
  suffix = "_".join(axis_labels(axes)) or "seeds"
  return os.path.join("workdirs", "sweeps", f"{name}_{_value_for_name(suffix)}")


def train_command(job: Job, config_spec: str, extra: Sequence[str],
                  python: str = "python") -> list[str]:
  return [python, "-m", "experiments.train", f"--config={config_spec}",
          f"--workdir={job.workdir}", *job.overrides, *extra]


def eval_name(selection: str) -> str:
  """The evaluation folder of a checkpoint selection: eval (latest), eval_best, eval_<step>."""
  return "eval" if selection == "latest" else f"eval_{selection}"


def evaluate_command(job: Job, python: str = "python", selection: str = "latest") -> list[str]:
  command = [python, "-m", "experiments.evaluate", f"--workdir={job.workdir}"]
  if selection != "latest":
    command += [f"--step={selection}",
                f"--output_dir={os.path.join(job.workdir, eval_name(selection))}"]
  return command


def shell_line(job: Job, config_spec: str, extra: Sequence[str],
               eval_steps: Sequence[str] = ("latest",)) -> str:
  """One job as a shell line for a cluster scheduler: train && evaluate (per eval step)."""
  return " && ".join([shlex.join(train_command(job, config_spec, extra))] +
                     [shlex.join(evaluate_command(job, selection=selection))
                      for selection in eval_steps])


# ------------------------------------------------------------------------------------------------
# Running.
# ------------------------------------------------------------------------------------------------


def metrics_path(workdir: str, selection: str = "latest") -> str:
  return os.path.join(workdir, eval_name(selection), "metrics.json")


def metrics_written(path: str) -> bool:
  """Whether the evaluation file `path` holds a JSON object (the rule of the local sweep and of
  its SLURM array). A file cut short or edited into something else counts as missing, so the
  job's evaluation runs again (it used to be skipped, and the comparison failed on every
  rerun)."""
  try:
    with open(path, encoding="utf-8") as f:
      return isinstance(json.load(f), dict)
  except (OSError, ValueError):
    return False


def is_evaluated(workdir: str, selection: str = "latest") -> bool:
  """Whether the job's evaluation at `selection` is written (`metrics_written`)."""
  return metrics_written(metrics_path(workdir, selection))


def check_job_workdirs(jobs: Sequence[Job]) -> None:
  """SweepConfigError naming a job whose workdir is a file (or lies under one), before any job
  runs: the sweep used to stop at it with a raw NotADirectoryError."""
  from cardiac_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  for job in jobs:
    try:
      workdir_lib.check_path(job.workdir)
    except workdir_lib.WorkdirError as e:
      raise SweepConfigError(f"job {job.name}: {e}") from None


def training_complete(workdir: str) -> bool:
  """Whether the run logged its last step (train.num_steps of its config.json): the training
  loop always logs the final step, and exits cleanly without it only when it was preempted."""
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      num_steps = json.load(f)["train"]["num_steps"]
    last = 0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      for line in f:
        record = json.loads(line)
        if any(k.startswith("train/") for k in record):
          last = max(last, int(record["step"]))
  except (OSError, KeyError, ValueError):
    return False
  return last >= num_steps


def _log_tail(path: str, lines: int = _LOG_TAIL_LINES) -> str:
  try:
    with open(path, errors="replace") as f:
      return "".join(f.readlines()[-lines:])
  except OSError:
    return "(no log)"


class _SignalForwarder:
  """While a job runs, SIGINT/SIGTERM received by the sweep are passed on to it (jobs run in
  their own session so that a terminal's Ctrl-C reaches them once, through here) and recorded
  so that the sweep stops after that job."""

  def __init__(self):
    self.received: int | None = None
    self.process: subprocess.Popen | None = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # Not the main thread (e.g. called from a test runner's thread).
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signum
    if self.process is not None and self.process.poll() is None:
      self.process.send_signal(signum)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


def _run_logged(command: Sequence[str], log_path: str, forwarder: _SignalForwarder) -> int:
  """Runs `command` with its output appended to `log_path`; returns its exit status."""
  env = dict(os.environ)  # The jobs see the sweep's environment (data cache, devices, ...).
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
  with open(log_path, "a") as log:
    log.write(f"\n[{time.strftime('%Y-%m-%d %H:%M:%S')}] $ {shlex.join(command)}\n")
    log.flush()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
    forwarder.process = process
    try:
      return process.wait()
    finally:
      forwarder.process = None


def run_job(job: Job, config_spec: str, extra: Sequence[str],
            forwarder: _SignalForwarder,
            eval_steps: Sequence[str] = ("latest",)) -> JobResult:
  """Trains (or resumes) and evaluates one job at each of `eval_steps` unless every one of
  those evaluations exists (a missing one is computed; training then resumes nothing)."""
  missing = [e for e in eval_steps if not is_evaluated(job.workdir, e)]
  if not missing:
    return JobResult(job, "skipped", "already evaluated")
  start = time.perf_counter()
  os.makedirs(job.workdir, exist_ok=True)
  log_path = os.path.join(job.workdir, LOG_NAME)
  python = sys.executable
  stages = [("train", train_command(job, config_spec, extra, python))]
  stages += [(f"evaluate ({selection})", evaluate_command(job, python, selection))
             for selection in missing]
  for stage, command in stages:
    status = _run_logged(command, log_path, forwarder)
    seconds = time.perf_counter() - start
    if forwarder.received is not None:
      return JobResult(job, "interrupted", f"signal {forwarder.received} during {stage}",
                       seconds)
    if status != 0:
      return JobResult(job, "failed", f"{stage} exited with status {status}; last lines of "
                       f"{log_path}:\n{_log_tail(log_path)}", seconds)
    if stage == "train" and not training_complete(job.workdir):
      # The loop exits cleanly after a preemption signal sent to the job itself.
      return JobResult(job, "interrupted", "training stopped before its last step", seconds)
  return JobResult(job, "done", "", time.perf_counter() - start)


def write_manifest(root: str, config_spec: str, axes: Sequence[SweepAxis],
                    seeds: Sequence[int], extra: Sequence[str], jobs: Sequence[Job],
                    eval_steps: Sequence[str]) -> None:
  """<root>/sweep.json: what the sweep was asked to do, so its table can be traced back."""
  manifest = {"config": config_spec, "set": {f"config.{a.path}": list(a.values) for a in axes},
              "seeds": list(seeds), "extra": list(extra), "eval_steps": list(eval_steps),
              "jobs": [{"name": j.name, "workdir": j.workdir, "command": shell_line(
                  j, config_spec, extra, eval_steps)} for j in jobs]}
  path = os.path.join(root, "sweep.json")
  with open(path + ".tmp", "w") as f:
    json.dump(manifest, f, indent=2)
  os.replace(path + ".tmp", path)


def write_hparams(root: str, axes: Sequence[SweepAxis], jobs: Sequence[Job],
                  started: Sequence[Job] | None = None) -> None:
  """TensorBoard's HParams summaries, for `tensorboard --logdir <root>`: the grid (each swept
  field's values and the seeds; the metrics its runs have logged so far) at the root, and the
  values of each job in `started` (default: every job whose workdir exists) beside its training
  events in DIR/tensorboard."""
  from cardiac_jax import metric_logging as ml  # pylint: disable=g-import-not-at-top
  domains = {a.path: [ml.hparam_value(v) for v in a.values] for a in axes}
  domains["seed"] = list(dict.fromkeys(j.seed for j in jobs))
  ml.write_hparams_config(root, domains, ml.comparable_metrics([j.workdir for j in jobs]))
  if started is None:
    started = [j for j in jobs if os.path.isdir(j.workdir)]
  for job in started:  # overrides: (--config.seed=S, then one --config.<path>=<value> per axis).
    values = {a.path: ml.hparam_value(o.split("=", 1)[1]) for a, o in zip(axes, job.overrides[1:])}
    ml.write_run_hparams(os.path.join(job.workdir, ml.TENSORBOARD_DIR),
                         {**values, "seed": job.seed}, trial_id=job.name)


def run_sweep(config_spec: str, axes: Sequence[SweepAxis], seeds: Sequence[int], root: str,
              extra: Sequence[str] = (), dry_run: bool = False,
              out: TextIO = sys.stdout,
              eval_steps: Sequence[str] = ("latest",)) -> list[JobResult]:
  """Validates, then prints (dry_run) or runs every job and writes <root>/comparison.md (and
  comparison_<selection>.md for every other entry of `eval_steps`, e.g. comparison_best.md).

  Returns one JobResult per job ([] for a dry run).

  Raises:
    SweepConfigError: the settings do not fit the config (before any job runs).
  """
  eval_steps = parse_eval_steps(eval_steps)
  check_root(root)
  validate_sweep(config_spec, axes, extra)
  jobs = make_jobs(axes, seeds, root)
  check_job_workdirs(jobs)
  if dry_run:
    for job in jobs:
      print(shell_line(job, config_spec, extra, eval_steps), file=out)
    return []
  os.makedirs(root, exist_ok=True)
  write_manifest(root, config_spec, axes, seeds, extra, jobs, eval_steps)
  write_hparams(root, axes, jobs)
  results = []
  with _SignalForwarder() as forwarder:
    for index, job in enumerate(jobs, 1):
      print(f"[{index}/{len(jobs)}] {job.name}: ", end="", file=out, flush=True)
      write_hparams(root, axes, jobs, started=[job])
      result = run_job(job, config_spec, extra, forwarder, eval_steps)
      results.append(result)
      if result.status == "done":
        print(f"done in {result.seconds:.0f} s", file=out, flush=True)
      elif result.status == "skipped":
        print(f"skipped ({result.message})", file=out, flush=True)
      elif result.status == "failed":
        print(f"FAILED in {result.seconds:.0f} s ({job.workdir}): {result.message}", file=out,
              flush=True)
      else:
        print(f"interrupted ({result.message}); rerun the same command to continue the sweep",
              file=out, flush=True)
        break
  write_hparams(root, axes, jobs)  # Now with the metrics the jobs logged.
  _summarize(results, jobs, root, out, eval_steps)
  return results


def _summarize(results: Sequence[JobResult], jobs: Sequence[Job], root: str,
               out: TextIO, eval_steps: Sequence[str] = ("latest",)) -> None:
  counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
  not_run = len(jobs) - len(results)
  print(f"{counts['done']} done, {counts['skipped']} already done, {counts['failed']} failed"
        + (f", {not_run} not run" if not_run else "") + f" of {len(jobs)} jobs", file=out)
  for result in results:
    if result.status == "failed":
      print(f"  failed: {result.job.workdir} (log: "
            f"{os.path.join(result.job.workdir, LOG_NAME)})", file=out)
  write_comparisons(jobs, root, out, eval_steps)


def write_comparisons(jobs: Sequence[Job], root: str, out: TextIO,
                      eval_steps: Sequence[str] = ("latest",)) -> None:
  """<root>/comparison.md (and comparison_<selection>.md) of the jobs evaluated at each of
  `eval_steps`, with their CSV copies; printed to `out`."""
  from experiments import compare  # pylint: disable=g-import-not-at-top
  for selection in eval_steps:
    evaluated = [j.workdir for j in jobs if is_evaluated(j.workdir, selection)]
    if not evaluated:
      print(f"No job evaluated at the {selection} checkpoint to compare.", file=out)
      continue
    name = "comparison.md" if selection == "latest" else f"comparison_{selection}.md"
    output = os.path.join(root, name)
    markdown, _ = compare.write_comparison(evaluated, output, group_by_config=True,
                                           eval_name=eval_name(selection))
    print(f"{selection} checkpoint:", file=out)
    print(markdown, end="", file=out)
    print(f"Wrote {output} and {compare.csv_path(output)}", file=out, flush=True)


def define_flags() -> None:
  """The command-line flags; defined only when run as a program, so that importing this module
  never collides with another entry point's flags (both have a --config) in one process."""
  flags.DEFINE_string("config", None, "Experiment config: NAME[:variant].")
  flags.DEFINE_multi_string("set", [], "config.section.key=v1,v2,...: a swept field "
                            "(repeatable; the grid is the product of all of them).")
  flags.DEFINE_list("seeds", ["0"], "Seeds (config.seed) of every grid point.")
  flags.DEFINE_string("root", None, "Directory of the job workdirs and the comparison "
                      "(default: workdirs/sweeps/<config>_<swept fields>).")
  flags.DEFINE_bool("dry_run", False, "Print one `train && evaluate` shell line per job only.")
  flags.DEFINE_list("eval_steps", ["latest"], "Checkpoints each job is evaluated at: latest "
                    "(into DIR/eval), best (the best validation checkpoint, DIR/eval_best), "
                    "or a step N (DIR/eval_N); one comparison table each.")
  flags.DEFINE_multi_string("extra", [], "Extra flags for every training job, e.g. "
                            "--extra=--config.train.num_steps=100 (repeatable).")
  from experiments import sweep_slurm  # pylint: disable=g-import-not-at-top
  sweep_slurm.define_flags()


def main(argv):
  from experiments import common  # pylint: disable=g-import-not-at-top
  common.start_command(argv)
  f = flags.FLAGS
  if not f.config:
    raise app.UsageError(f"--config is required; available: "
                         f"{', '.join(configs.available_configs())}")
  try:
    axes = [parse_set(text) for text in f.set]
    root = f.root or default_root(f.config, axes)
    seeds, extra = parse_seeds(f.seeds), parse_extra(f.extra)
    from experiments import sweep_slurm  # pylint: disable=g-import-not-at-top
    if sweep_slurm.from_flags(f, axes, seeds, root, extra):
      return
    results = run_sweep(f.config, axes, seeds, root, extra, dry_run=f.dry_run,
                        eval_steps=f.eval_steps)
  except data_errors.InvalidArgumentError as e:  # SweepConfigError, also sweep_slurm's.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if any(r.status in ("failed", "interrupted") for r in results):
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
