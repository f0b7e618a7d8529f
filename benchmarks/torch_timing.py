"""What the PyTorch reference steps share: parameter counts, peak memory and the timed loop.

Imported by benchmarks/torch_baseline.py (AR-SIVAE) and benchmarks/imlatent_baseline.py (3D
DiffAE), which experiments.benchmark runs with another interpreter; PyTorch only.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any, Callable

from torch import nn


def peak_rss_mb() -> float:
  """This process's peak resident memory in MiB: VmHWM (Linux), which restarts at exec, unlike
  getrusage's maxrss, which a child started by a larger process inherits."""
  try:
    with open("/proc/self/status") as status:
      for line in status:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def count_parameters(module: nn.Module) -> int:
  return sum(p.numel() for p in module.parameters())


def time_steps(step: Callable[[], dict[str, float]], warmup_steps: int, steps: int,
               batch_size: int) -> dict[str, Any]:
  """Runs `step` warmup_steps times untimed, then `steps` times timed; `step` returns its
  losses as Python floats, which waits for the step to finish. Returns the timing fields of
  the JSON line and the last losses."""
  load_before = os.getloadavg()
  for _ in range(warmup_steps):
    step()
  seconds, losses = [], {}
  for _ in range(steps):
    start = time.perf_counter()
    losses = step()
    seconds.append(time.perf_counter() - start)
  s_per_step = sum(seconds) / len(seconds)
  return {"steps": steps, "warmup_steps": warmup_steps, "s_per_step": s_per_step,
          "step_seconds": seconds, "samples_per_sec": batch_size / s_per_step,
          "peak_rss_mb": peak_rss_mb(), "loadavg_before": list(load_before),
          "loadavg_after": list(os.getloadavg()), **losses}
