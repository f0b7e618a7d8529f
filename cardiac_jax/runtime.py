"""Process settings that an entry point applies before JAX starts its backend (never on import).

`configure_xla_cpu()` adds XLA_CPU_CONV_FLAG to XLA_FLAGS: with jaxlib 0.10.2 the CPU backend
hands convolutions (from about 32 channels) to YNNPACK, whose kernel gradient is 10 to 15 times
slower than XLA's own convolution (benchmarks/README.md). Every command calls it first
(`experiments.common.start_command`, and the test session's conftest); a library user calls it
before the first computation, or sets the flag; `CARDIAC_JAX_XLA_CPU_FLAGS=0` leaves XLA_FLAGS
untouched.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings

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
