"""cardiac_jax: interpretable representation learning of cardiac MRI in JAX/Flax.

The library holds pure functions and Flax modules only: no absl flags and no file-path
conventions (those live in `experiments/`), and it never imports `data_pipelines`.

Importing the package sets one XLA:CPU option (see `xla_cpu_flags`): with jaxlib 0.10.2 the CPU
backend hands convolutions (from about 32 channels) to YNNPACK, whose kernel gradient is 10 to
15 times slower than XLA's own convolution (batch 16, 128 x 128, 64 -> 64 channels: 4.5 s vs
0.30 s; forward 0.31 s vs 0.22 s; benchmarks/README.md). Import cardiac_jax before JAX runs its
first computation, or set the flag yourself; `CARDIAC_JAX_XLA_CPU_FLAGS=0` leaves XLA_FLAGS untouched.
"""

import importlib.metadata
import os
import warnings

__version__ = "0.1.0"

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


_FLAG_WAS_SET = XLA_CPU_CONV_FLAG in os.environ.get("XLA_FLAGS", "")
if xla_cpu_flags() and not _FLAG_WAS_SET and _cpu_backend_started():
  warnings.warn("cardiac_jax was imported after JAX started its backend, so the XLA:CPU "
                f"convolution flag {XLA_CPU_CONV_FLAG} does not apply in this process: CPU "
                "training is several times slower. Import cardiac_jax first or set XLA_FLAGS.")
