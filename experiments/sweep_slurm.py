"""SLURM job arrays of a sweep (`experiments.sweep --slurm=PATH`) and the aggregation of their
results (`--aggregate`): task i of the array runs job i of the sweep's `--dry_run` list, resuming
from its workdir and requeueing itself before the time limit; the aggregation writes the same
comparison tables and HParams summaries as a local sweep (docs/cluster.md).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import sys
from typing import Sequence, TextIO

from absl import flags

from cardiac_jax import io
from experiments.sweep import (REPO_ROOT, Job, check_job_workdirs, evaluate_command, is_evaluated,
                               make_jobs, metrics_path, train_command, write_comparisons,
                               write_hparams, write_manifest)
from experiments.sweep_settings import (SweepAxis, SweepConfigError, check_root, parse_eval_steps,
                                        validate_sweep)



@dataclasses.dataclass(frozen=True)
class SlurmSettings:
  """Resources of every array task (one job: one training process on one GPU by default)."""
  partition: str = ""        # "": the cluster's default partition.
  time: str = "24:00:00"     # Per attempt; a task requeues itself before the limit.
  gpus: int = 1
  cpus: int = 8              # tf.data input pipeline threads.
  max_running: int = 0       # Tasks running at once (the array's %N); 0: no limit.
  signal_seconds: int = 300  # USR1 this long before the time limit: checkpoint and requeue.

  def __post_init__(self):
    """SweepConfigError naming the first --slurm_* value sbatch would refuse (after the
    script was reported written) or that would requeue a task before it trains at all."""
    for name, value, low in (("slurm_gpus", self.gpus, 0), ("slurm_cpus", self.cpus, 1),
                             ("slurm_max_running", self.max_running, 0)):
      if value < low:
        raise SweepConfigError(f"--{name}={value}: must be >= {low}")
    if not re.fullmatch(r"[A-Za-z0-9_.,-]*", self.partition):
      raise SweepConfigError(f"--slurm_partition={self.partition!r}: a partition name (letters, "
                             "digits, '_', '-', '.'; several separated by ',')")
    seconds = time_limit_seconds(self.time)
    if seconds is None:
      raise SweepConfigError(
          f"--slurm_time={self.time!r}: not a SLURM time limit (MM, MM:SS, HH:MM:SS, D-HH, "
          "D-HH:MM or D-HH:MM:SS)")
    if seconds <= self.signal_seconds:
      raise SweepConfigError(
          f"--slurm_time={self.time}: a task is told to checkpoint and requeue "
          f"{self.signal_seconds} s before its limit, so it needs more than that (it would "
          "requeue itself before training)")


def time_limit_seconds(text: str) -> int | None:
  """Seconds of a SLURM time limit (sbatch --time's formats), or None when it is not one."""
  match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
  if not match:
    return None
  days, first, second, third = match.groups()
  if days is not None:  # D-HH[:MM[:SS]]
    hours, minutes, seconds = int(first), int(second or 0), int(third or 0)
    return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
  if third is not None:  # HH:MM:SS
    return (int(first) * 60 + int(second)) * 60 + int(third)
  return int(first) * 60 + int(second or 0)  # MM or MM:SS


# The array task's body: `--print` prints its job as the --dry_run line; otherwise it trains
# (resuming from the workdir's checkpoint), then runs the evaluations whose metrics.json is
# missing or damaged (not a JSON object) once the training has logged its last step. USR1
# before the time limit: the running stage gets SIGTERM (training saves a checkpoint and exits
# 0) and the task requeues itself.
# Preemption: SLURM sends SIGTERM to every process of the task and requeues it (--requeue).
_SLURM_BODY = r"""
if [ "${1:-}" = "--print" ]; then
  line="${STAGES[0]}"
  for stage in "${STAGES[@]:1}"; do line="$line && $stage"; done
  printf '%s\n' "$line"
  exit 0
fi

cd __START_DIR__ || exit 1
export PYTHONPATH=__REPO_ROOT__${PYTHONPATH:+:$PYTHONPATH}

REQUEUE=0
CHILD=
stop_for_requeue() {
  echo "$(date): time limit near: stopping task $TASK to requeue it"
  REQUEUE=1
  if [ -n "$CHILD" ]; then kill -TERM "$CHILD" 2>/dev/null; fi
}
trap stop_for_requeue USR1

run_stage() {  # One stage as a child process the trap can signal; returns its exit status.
  echo "$(date): \$ $1"
  bash -c "exec $1" &
  CHILD=$!
  wait "$CHILD"
  local status=$?
  while kill -0 "$CHILD" 2>/dev/null; do  # wait returned early for the trap.
    wait "$CHILD"
    status=$?
  done
  CHILD=
  return "$status"
}

requeue_if_asked() {
  if [ "$REQUEUE" = 1 ]; then
    echo "$(date): requeueing ${SLURM_ARRAY_JOB_ID:-?}_$TASK"
    scontrol requeue "${SLURM_ARRAY_JOB_ID}_${TASK}"
    exit 0
  fi
}

evaluated() {  # Whether the evaluation file $1 holds a JSON object, as for the local sweep.
  python -c 'import sys; from experiments import sweep
sys.exit(0 if sweep.metrics_written(sys.argv[1]) else 1)' "$1"
}

missing=0
for path in "${METRICS[@]:1}"; do evaluated "$path" || missing=1; done
if [ "$missing" = 0 ]; then
  echo "task $TASK: $WORKDIR is already evaluated"
  exit 0
fi
echo "$(date): task $TASK, attempt ${SLURM_RESTART_COUNT:-0}: $WORKDIR"
run_stage "${STAGES[0]}"
status=$?
requeue_if_asked
if [ "$status" != 0 ]; then
  echo "task $TASK: training exited with status $status" >&2
  exit "$status"
fi
if ! python -c 'import sys; from experiments import sweep
sys.exit(0 if sweep.training_complete(sys.argv[1]) else 1)' "$WORKDIR"; then
  echo "task $TASK: training stopped before its last step; not evaluated" >&2
  exit 1
fi
for i in "${!STAGES[@]}"; do
  if [ "$i" = 0 ] || evaluated "${METRICS[$i]}"; then continue; fi
  run_stage "${STAGES[$i]}"
  status=$?
  requeue_if_asked
  if [ "$status" != 0 ]; then
    echo "task $TASK: evaluation exited with status $status" >&2
    exit "$status"
  fi
done
echo "$(date): task $TASK done"
"""


def slurm_script(jobs: Sequence[Job], config_spec: str, extra: Sequence[str],
                 eval_steps: Sequence[str], root: str, settings: SlurmSettings = SlurmSettings(),
                 start_dir: str | None = None) -> str:
  """A bash script of a SLURM job array: task i runs `jobs[i]` exactly as line i of --dry_run
  (`SLURM_ARRAY_TASK_ID=i bash SCRIPT --print` prints that line), from `start_dir` (default:
  the current directory), requeue-safe; logs in <root>/slurm_logs."""
  if not jobs:
    raise SweepConfigError("the sweep has no jobs")
  quote = shlex.quote
  name = re.sub(r"[^A-Za-z0-9._-]", "-", os.path.basename(os.path.abspath(root))) or "sweep"
  throttle = f"%{settings.max_running}" if settings.max_running > 0 else ""
  header = ["#!/bin/bash",
            f"# SLURM job array of the sweep {root}: task i runs job i of the sweep's",
            "# --dry_run list (SLURM_ARRAY_TASK_ID=i bash THIS_SCRIPT --print shows it).",
            f"#SBATCH --job-name={name}",
            f"#SBATCH --array=0-{len(jobs) - 1}{throttle}",
            "#SBATCH --ntasks=1",
            f"#SBATCH --cpus-per-task={settings.cpus}"]
  if settings.gpus > 0:
    header.append(f"#SBATCH --gpus={settings.gpus}")
  if settings.partition:
    header.append(f"#SBATCH --partition={settings.partition}")
  header += [f"#SBATCH --time={settings.time}",
             "#SBATCH --requeue                   # preempted tasks go back to the queue",
             "#SBATCH --open-mode=append          # one log for all attempts of a task",
             f"#SBATCH --output={os.path.join(os.path.abspath(root), 'slurm_logs')}"
             "/%x-%A_%a.out",
             f"#SBATCH --signal=B:USR1@{settings.signal_seconds}",
             "",
             "set -u",
             'TASK="${SLURM_ARRAY_TASK_ID:?not an array task: submit with sbatch}"',
             'case "$TASK" in']
  for index, job in enumerate(jobs):
    stages = [shlex.join(train_command(job, config_spec, extra))] + [
        shlex.join(evaluate_command(job, selection=selection)) for selection in eval_steps]
    metrics = [""] + [metrics_path(job.workdir, selection) for selection in eval_steps]
    header += [f"  {index})",
               f"    WORKDIR={quote(job.workdir)}",
               f"    STAGES=({' '.join(quote(s) for s in stages)})",
               f"    METRICS=({' '.join(quote(m) for m in metrics)})",
               "    ;;"]
  header += [f'  *) echo "task $TASK: this array has tasks 0-{len(jobs) - 1}" >&2; exit 2 ;;',
             "esac"]
  body = (_SLURM_BODY.replace("__START_DIR__", quote(start_dir or os.getcwd()))
          .replace("__REPO_ROOT__", quote(REPO_ROOT)))
  return "\n".join(header) + "\n" + body


def write_slurm_sweep(config_spec: str, axes: Sequence[SweepAxis], seeds: Sequence[int],
                      root: str, path: str, extra: Sequence[str] = (),
                      eval_steps: Sequence[str] = ("latest",),
                      settings: SlurmSettings = SlurmSettings(),
                      out: TextIO = sys.stdout) -> list[Job]:
  """Validates the sweep, writes its job array to `path` (executable) and <root>/sweep.json,
  and creates <root>/slurm_logs. Returns the jobs in task order.

  Raises:
    SweepConfigError: the settings do not fit the config.
  """
  eval_steps = parse_eval_steps(eval_steps)
  check_root(root)
  from experiments import common  # pylint: disable=g-import-not-at-top
  common.check_output_file(path, "slurm")  # Not after the sweep's folders were made.
  validate_sweep(config_spec, axes, extra)
  jobs = make_jobs(axes, seeds, root)
  check_job_workdirs(jobs)
  script = slurm_script(jobs, config_spec, extra, eval_steps, root, settings)
  os.makedirs(os.path.join(root, "slurm_logs"), exist_ok=True)
  write_manifest(root, config_spec, axes, seeds, extra, jobs, eval_steps)
  with io.atomic_path(path) as temporary:
    with open(temporary, "w", encoding="utf-8") as f:
      f.write(script)
    os.chmod(temporary, 0o755)
  print(f"Wrote {path}: {len(jobs)} array tasks (0-{len(jobs) - 1}). Submit it with "
        f"`sbatch {path}`; once the tasks have finished, rerun this command with --aggregate "
        f"instead of --slurm for the comparison table.", file=out)
  return jobs


def aggregate_sweep(config_spec: str, axes: Sequence[SweepAxis], seeds: Sequence[int],
                    root: str, extra: Sequence[str] = (),
                    eval_steps: Sequence[str] = ("latest",),
                    out: TextIO = sys.stdout) -> list[Job]:
  """The comparison tables of the sweep's jobs evaluated so far (e.g. by its SLURM array),
  written as the local sweep writes them; names the jobs not evaluated yet. Returns those."""
  eval_steps = parse_eval_steps(eval_steps)
  check_root(root, must_exist=True)
  validate_sweep(config_spec, axes, extra)
  jobs = make_jobs(axes, seeds, root)
  unfinished = [j for j in jobs
                if not all(is_evaluated(j.workdir, e) for e in eval_steps)]
  print(f"{len(jobs) - len(unfinished)} of {len(jobs)} jobs evaluated", file=out)
  for job in unfinished:
    print(f"  not evaluated yet: {job.workdir}", file=out)
  write_hparams(root, axes, jobs)  # As the local sweep: the grid, and every job that ran.
  write_comparisons(jobs, root, out, eval_steps)
  return unfinished


def define_flags() -> None:
  """The --slurm and --aggregate flags of experiments.sweep."""
  flags.DEFINE_string("slurm", None, "Write a SLURM job array (one task per job) to this path "
                      "instead of running the jobs.")
  flags.DEFINE_string("slurm_partition", "", "--slurm: partition (default: the cluster's).")
  flags.DEFINE_string("slurm_time", SlurmSettings.time, "--slurm: time limit of one attempt "
                      "of a task (it checkpoints and requeues itself before it).")
  flags.DEFINE_integer("slurm_gpus", SlurmSettings.gpus, "--slurm: GPUs per task.")
  flags.DEFINE_integer("slurm_cpus", SlurmSettings.cpus, "--slurm: CPUs per task.")
  flags.DEFINE_integer("slurm_max_running", 0, "--slurm: tasks running at once (0: no limit).")
  flags.DEFINE_bool("aggregate", False, "Only build the comparison tables from the jobs "
                    "evaluated so far (after a --slurm array).")


def from_flags(f, axes: Sequence[SweepAxis], seeds: Sequence[int], root: str,
               extra: Sequence[str]) -> bool:
  """Writes the array (--slurm) or aggregates (--aggregate) as the flags ask; False when they
  ask for neither (the sweep then runs its jobs here)."""
  if f.slurm and f.aggregate:
    raise SweepConfigError("--slurm writes the job array, --aggregate reads its results: "
                           "give one of them")
  if f.slurm:
    settings = SlurmSettings(partition=f.slurm_partition, time=f.slurm_time, gpus=f.slurm_gpus,
                             cpus=f.slurm_cpus, max_running=f.slurm_max_running)
    write_slurm_sweep(f.config, axes, seeds, root, f.slurm, extra, f.eval_steps, settings)
    return True
  if f.aggregate:
    aggregate_sweep(f.config, axes, seeds, root, extra, f.eval_steps)
    return True
  return False
