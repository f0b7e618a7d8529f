"""Where the time of a compiled step goes: a jax.profiler trace summed per operation category.

XLA:CPU records one trace event per executed operation (thunk) when XLA_FLAGS contains
TRACEME_FLAG, which has to be set before JAX starts its backend (`experiments.benchmark
--profile_dir=DIR` does so). The events are named after the HLO instructions of the compiled
executable, and each instruction's metadata names the JAX operation it came from (op_name), so
the events of one traced step are summed per category:

  conv forward          an instruction from `conv_general_dilated` outside a transpose;
  conv input gradient   inside a transpose (backward pass) whose output is image-shaped;
  conv kernel gradient  inside a transpose whose output is kernel-shaped (every dimension but
                        the first and last is odd and at most 7);
  dot                   from `dot_general` (dense layers, 1x1 convolutions);
  other                 everything else, by the instruction's name without its number (for
                        example multiply_add_fusion: element-wise work, BatchNorm statistics).

Times are thread-seconds: on a multi-threaded CPU backend two operations can run at once, so
the categories can add up to more than the step's wall time (`wall_ms`, measured around the
traced call). An operation that XLA:CPU hands to its intra-op thread pool asynchronously (the
Eigen convolutions, when convolutions are kept out of YNNPACK as every command does:
`cardiac_jax.runtime`) records only its dispatch, so its category undercounts; library fusions
(ynn_fusion) and loop fusions are timed in full. The summary is a list of {"category", "ms",
"count", "share"}, largest first, plus the slowest instructions.
"""

from __future__ import annotations

import collections
import glob
import os
import re
from typing import Any, Callable

TRACEME_FLAG = "--xla_cpu_enable_xprof_traceme=true"

_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\]\S* .*?op_name=\"([^\"]+)\"")


def enable_traceme(environ=None) -> None:
  """Adds TRACEME_FLAG to XLA_FLAGS (before JAX starts its backend)."""
  from cardiac_jax import runtime
  runtime.add_xla_flags([TRACEME_FLAG], "xla_cpu_enable_xprof_traceme", environ)


def instruction_table(hlo_text: str) -> dict[str, tuple[tuple[int, ...], str]]:
  """HLO instruction name -> (output shape, op_name) for every instruction with metadata."""
  table = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if match:
      shape = tuple(int(d) for d in match.group(3).split(",") if d)
      table[match.group(1)] = (shape, match.group(4))
  return table


def categorize(name: str, shape: tuple[int, ...], op_name: str) -> str:
  """The category of one instruction (module docstring)."""
  last = op_name.rsplit("/", 1)[-1]
  if last == "conv_general_dilated":
    if "transpose(" not in op_name:
      return "conv forward"
    inner = shape[1:-1]
    if inner and all(d % 2 == 1 and d <= 7 for d in inner):
      return "conv kernel gradient"
    return "conv input gradient"
  if last == "dot_general":
    return "dot"
  return re.sub(r"\.\d+$", "", name)


def trace_events(trace_dir: str) -> list[tuple[str, float]]:
  """(event name, milliseconds) of every event on the non-Python threads of the newest trace."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # TensorFlow is a dependency.
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  if not files:
    raise FileNotFoundError(f"no *.xplane.pb trace under {trace_dir}")
  space = xplane_pb2.XSpace()
  with open(files[-1], "rb") as f:
    space.ParseFromString(f.read())
  events = []
  for plane in space.planes:
    for line in plane.lines:
      if line.name == "python":
        continue
      for event in line.events:
        events.append((plane.event_metadata[event.metadata_id].name, event.duration_ps / 1e9))
  return events


def summarize(events, instructions, top: int = 10) -> dict[str, Any]:
  """Per-category totals and the `top` slowest instructions of the traced events."""
  per_category: dict[str, float] = collections.Counter()
  counts: dict[str, int] = collections.Counter()
  per_instruction: dict[str, float] = collections.Counter()
  for name, ms in events:
    if name not in instructions:  # Executor bookkeeping, Python frames, "end:" markers.
      continue
    shape, op_name = instructions[name]
    category = categorize(name, shape, op_name)
    per_category[category] += ms
    counts[category] += 1
    per_instruction[name] += ms
  total = sum(per_category.values())
  if total <= 0:
    raise ValueError("the trace has no events of the compiled step's instructions; was "
                     f"{TRACEME_FLAG} in XLA_FLAGS before JAX started?")
  categories = [{"category": c, "ms": round(ms, 1), "count": counts[c],
                 "share": round(ms / total, 4)} for c, ms in per_category.most_common()]
  slowest = [{"instruction": n, "ms": round(ms, 1), "shape": list(instructions[n][0]),
              "op_name": instructions[n][1]} for n, ms in per_instruction.most_common(top)]
  return {"total_ms": round(total, 1), "categories": categories, "slowest": slowest}


def profile_call(fn: Callable, args: tuple, hlo_text: str, trace_dir: str,
                 top: int = 10) -> dict[str, Any]:
  """Runs fn(*args) once under jax.profiler into trace_dir and summarizes its operations.

  fn should already be compiled (a warm call), and hlo_text is its compiled HLO
  (`jitted.lower(*args).compile().as_text()`), whose instruction names the events carry.
  """
  import time
  import jax
  with jax.profiler.trace(trace_dir):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    wall_ms = 1000.0 * (time.perf_counter() - start)
  summary = summarize(trace_events(trace_dir), instruction_table(hlo_text), top)
  return {"wall_ms": round(wall_ms, 1), **summary}
