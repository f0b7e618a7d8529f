"""Process settings that an entry point applies before JAX starts its backend (never on import).

`configure_xla_cpu()` adds XLA_CPU_CONV_FLAG to XLA_FLAGS: with jaxlib 0.10.2 the CPU backend
hands convolutions (from about 32 channels) to YNNPACK, whose kernel gradient is 10 to 15 times
slower than XLA's own convolution (benchmarks/README.md). Every command calls it first
(`experiments.common.start_command`, and the test session's conftest); a library user calls it
before the first computation, or sets the flag; `CARDIAC_JAX_XLA_CPU_FLAGS=0` leaves XLA_FLAGS
untouched.

`quiet_library_logs()` silences what TensorFlow, absl and tensorflow-datasets print on their
own (C++ notices, config dumps, dataset-building progress bars), each at its source, so that a
command's output is its own phase lines and progress bar; `CARDIAC_JAX_VERBOSE=1` (or a
command's --verbosity) keeps all of it (`verbose_requested`).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys
import time
import warnings
from typing import Callable

# Convolutions stay with XLA's own CPU emitter instead of YNNPACK ("-" removes a fusion type
# from XLA's default list). The flag exists in the jaxlib versions listed; others are left
# alone, since XLA aborts on a flag it does not know.
XLA_CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
_FLAG_JAXLIB_VERSIONS = ("0.10.",)


def add_xla_flags(flags, unless: str, environ=None) -> bool:
  """Appends `flags` to environ["XLA_FLAGS"] (os.environ by default) unless XLA_FLAGS already
  mentions `unless`; returns whether it appended. XLA reads XLA_FLAGS once, when JAX starts its
  backend, so this has to run before the first computation."""
  environ = os.environ if environ is None else environ
  current = environ.get("XLA_FLAGS", "")
  if unless in current:
    return False
  environ["XLA_FLAGS"] = " ".join([current, *flags]).strip()
  return True


def xla_cpu_flags(environ=None) -> bool:
  """Adds XLA_CPU_CONV_FLAG to environ["XLA_FLAGS"] (os.environ by default) where it applies.

  Returns whether the flag is in XLA_FLAGS afterwards. Does nothing when XLA_FLAGS already sets
  the YNN fusion types, when CARDIAC_JAX_XLA_CPU_FLAGS=0, or for a jaxlib without the flag.
  """
  environ = os.environ if environ is None else environ
  current = environ.get("XLA_FLAGS", "")
  if "xla_cpu_experimental_ynn_fusion_type" in current:
    return XLA_CPU_CONV_FLAG in current
  if environ.get("CARDIAC_JAX_XLA_CPU_FLAGS", "1") == "0":
    return False
  try:
    jaxlib_version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return False
  if not jaxlib_version.startswith(_FLAG_JAXLIB_VERSIONS):
    return False
  return add_xla_flags([XLA_CPU_CONV_FLAG], "xla_cpu_experimental_ynn_fusion_type", environ)


def _cpu_backend_started() -> bool:
  try:
    from jax._src import xla_bridge  # Private: only to warn, never required.
    if not getattr(xla_bridge, "_backends", None):
      return False
    import jax
    return jax.default_backend() == "cpu"
  except Exception:  # pylint: disable=broad-except
    return False


def configure_xla_cpu() -> bool:
  """Applies `xla_cpu_flags` to this process (and the subprocesses it starts); warns when JAX
  already started its CPU backend, for which the flag comes too late. Returns whether the flag
  is set."""
  was_set = XLA_CPU_CONV_FLAG in os.environ.get("XLA_FLAGS", "")
  applied = xla_cpu_flags()
  if applied and not was_set and _cpu_backend_started():
    warnings.warn("JAX started its backend before cardiac_jax.runtime.configure_xla_cpu(), so "
                  f"the XLA:CPU convolution flag {XLA_CPU_CONV_FLAG} does not apply in this "
                  "process: CPU training is several times slower. Call it first or set "
                  "XLA_FLAGS.")
  return applied


# ------------------------------------------------------------------------------ library logs
VERBOSE_ENV = "CARDIAC_JAX_VERBOSE"

# What an entry point sets before TensorFlow is imported. TF_CPP_MIN_LOG_LEVEL=2 drops TF's C++
# INFO and WARNING lines (CPU feature notices); TensorFlow 2.21 prints its oneDNN notice through
# absl's C++ log before that level applies, so it is silenced by not enabling TensorFlow's
# oneDNN custom operations, which the input pipeline does not rely on: its ops (resize,
# projective warp, casts) give the same batches bit for bit either way (the smoke config's
# augmented training batches and its validation batches, compared with and without).
TENSORFLOW_QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}

_quiet = False


def verbose_requested(verbosity_flag_present: bool = False, environ=None) -> bool:
  """Whether a command keeps the libraries' own logs: --verbosity was given or
  CARDIAC_JAX_VERBOSE is set to anything but "" or "0"."""
  environ = os.environ if environ is None else environ
  return verbosity_flag_present or environ.get(VERBOSE_ENV, "0").strip() not in ("", "0")


def quiet_tensorflow_environment(environ=None) -> None:
  """Sets TENSORFLOW_QUIET_ENV in environ (os.environ by default) where not set already; has
  effect only before TensorFlow is first imported."""
  environ = os.environ if environ is None else environ
  for name, value in TENSORFLOW_QUIET_ENV.items():
    environ.setdefault(name, value)


class _DropTfdsLogs(logging.Filter):
  """Drops tensorflow-datasets' records below ERROR from absl's logger (tfds logs through absl,
  which our commands share: a builder's config dump is a WARNING there)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return (record.levelno >= logging.ERROR or
            f"{os.sep}tensorflow_datasets{os.sep}" not in (record.pathname or ""))


def quiet_library_logs() -> None:
  """Silences the libraries' own output in this process (module docstring): TensorFlow's C++
  notices (`quiet_tensorflow_environment`, before TensorFlow is imported), the 'tensorflow'
  Python logger below ERROR, and tensorflow-datasets' absl records below ERROR; and marks the
  process quiet for `quiet_tensorflow_datasets`. Idempotent."""
  global _quiet
  quiet_tensorflow_environment()
  logging.getLogger("tensorflow").setLevel(logging.ERROR)
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _DropTfdsLogs) for f in absl_logger.filters):
    absl_logger.addFilter(_DropTfdsLogs())
  _quiet = True


def quiet_tensorflow_datasets() -> None:
  """In a process quieted by `quiet_library_logs`: no tensorflow-datasets progress bars
  (generating, shuffling), which a preparation replaces with its own. Imports
  tensorflow-datasets; call it where a dataset is about to be built or read. (The lines tfds
  prints when it builds a dataset are silenced by the project's builders themselves:
  `data_pipelines.tfds_builders.SubjectBuilder`.)"""
  if not _quiet:
    return
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()


def phase_logger(command: str) -> Callable[[str], None]:
  """A function that prints "[command HH:MM:SS] message" on stderr: the one-line phase
  announcements of the long commands (what they start now, on what, how many)."""

  def log(message: str) -> None:
    print(f"[{command} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

  return log


def backend_choice(value: str, choices, *, cpu: str, other: str, what: str) -> str:
  """`value` unless it is "auto": then `cpu` on the CPU backend and `other` elsewhere (settings
  whose fastest form differs between XLA:CPU and the accelerators); a ValueError naming `what`
  when `value` is not one of `choices`."""
  if value not in choices:
    raise ValueError(f"{what} must be one of {tuple(choices)}, got {value!r}")
  if value != "auto":
    return value
  import jax  # pylint: disable=g-import-not-at-top
  return cpu if jax.default_backend() == "cpu" else other
