"""Time to write the synthetic cine cohort of a first run (`data_pipelines.synthetic`).

  python -m benchmarks.synthetic_cohort [--subjects=400] [--seed=0] [--workers=0]
      [--output_dir=D]

Writes a fresh cohort of --subjects subjects (default acquisition ranges, as the synthetic
configs' first run does) into a temporary folder (or D, which must not exist) with --workers
processes (0: one per core, at most 8, as the training command), removes it unless D was given,
and prints one JSON line: subjects, workers, wall seconds, CPU seconds of all processes, both
per subject, and the 1-minute load average before and after (the machine's other work inflates
the wall time; CPU seconds are less sensitive to it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time

from data_pipelines import synthetic


def cpu_seconds() -> float:
  """User + system CPU seconds of this process and of its finished worker processes."""
  total = 0.0
  for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
    usage = resource.getrusage(who)
    total += usage.ru_utime + usage.ru_stime
  return total


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--subjects", type=int, default=400)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workers", type=int, default=0)
  parser.add_argument("--output_dir", default=None)
  args = parser.parse_args()
  workers = args.workers or min(os.cpu_count() or 1, 8)
  if args.output_dir and os.path.exists(args.output_dir):
    raise SystemExit(f"{args.output_dir} exists; the benchmark writes a fresh cohort")
  root = args.output_dir or tempfile.mkdtemp(prefix="synthetic_cohort_")
  load_before = os.getloadavg()[0]
  cpu, start = cpu_seconds(), time.perf_counter()
  try:
    synthetic.synthesize_cohort(root, args.subjects, args.seed, num_workers=workers)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
  finally:
    if not args.output_dir:
      shutil.rmtree(root, ignore_errors=True)
  print(json.dumps({"subjects": args.subjects, "workers": workers, "wall_s": round(wall, 1),
                    "cpu_s": round(cpu, 1), "wall_s_per_subject": round(wall / args.subjects, 3),
                    "cpu_s_per_subject": round(cpu / args.subjects, 3),
                    "load_before": round(load_before, 2),
                    "load_after": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
  main()
