"""Convolution implementations of cardiac_jax.layers and the XLA:CPU flag the commands set."""

import importlib.metadata
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cardiac_jax import layers, runtime


@pytest.mark.parametrize("shape,kernel_size", [((2, 12, 10, 3), 3), ((3, 9, 8, 2), 5),
                                               ((2, 8, 8, 4), 1)])
def test_im2col_matches_xla_values_and_gradients(shape, kernel_size):
  kx, kk, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, shape)
  kernel = jax.random.normal(kk, (kernel_size, kernel_size, shape[-1], 5)) * 0.3
  cotangent = jax.random.normal(kg, shape[:3] + (5,))

  def value_and_vjp(impl):
    y, vjp = jax.vjp(lambda x_, k_: layers.conv2d_same(x_, k_, impl), x, kernel)
    return (y,) + vjp(cotangent)

  expected = jax.jit(lambda: value_and_vjp("xla"))()
  got = jax.jit(lambda: value_and_vjp("im2col"))()
  for name, e, g in zip(("value", "d input", "d kernel"), expected, got):
    np.testing.assert_allclose(g, e, rtol=2e-5, atol=2e-5, err_msg=name)


def test_cpu_convolutions_and_their_gradients_stay_out_of_ynnpack():
  # The flag set at the start of every command (here conftest's) must reach the compiler: no convolution of a compiled
  # value-and-gradient is a YNNPACK fusion (with them, the kernel gradient is ~10x slower).
  if jax.default_backend() != "cpu":
    pytest.skip("XLA:CPU only")
  # 32 channels: XLA's default hands this size to YNNPACK (smaller ones stay with XLA anyway).
  x = jnp.ones((2, 16, 16, 32))
  kernel = jnp.ones((3, 3, 32, 32))
  loss = lambda k, x_: jnp.sum(layers.conv2d_same(x_, k, "xla") ** 2)
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(kernel, x).compile().as_text()
  assert hlo.count(" convolution(") == 3  # Forward, input gradient, kernel gradient.
  assert "__ynn_fusion" not in hlo


def test_xla_cpu_flags_adds_the_flag_once_and_respects_the_user(monkeypatch):
  environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert runtime.xla_cpu_flags(environ)
  assert environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=8 "
                                  + runtime.XLA_CPU_CONV_FLAG)
  assert runtime.xla_cpu_flags(environ)  # Already there: unchanged.
  assert environ["XLA_FLAGS"].count("ynn_fusion_type") == 1

  own = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
  assert not runtime.xla_cpu_flags(own)
  assert own["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"

  opted_out = {"CARDIAC_JAX_XLA_CPU_FLAGS": "0"}
  assert not runtime.xla_cpu_flags(opted_out)
  assert "XLA_FLAGS" not in opted_out

  # XLA aborts on unknown flags: a jaxlib the flag was not checked with is left alone.
  monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.11.0")
  other = {}
  assert not runtime.xla_cpu_flags(other)
  assert "XLA_FLAGS" not in other


def test_importing_the_library_changes_no_environment_variable():
  """Settings are applied by the entry points (`runtime.configure_xla_cpu`), never on import:
  every module of cardiac_jax and data_pipelines is imported in a fresh interpreter whose
  XLA_FLAGS lacks the flag, and the environment is compared before and after (after the
  third-party libraries, which set variables of their own when imported)."""
  import subprocess
  import sys
  script = (
      "import importlib, os, pkgutil\n"
      "import flax, jax, matplotlib, nibabel, optax, orbax.checkpoint, sklearn, tensorflow\n"
      "import tensorflow_datasets\n"
      "before = dict(os.environ)\n"
      "import cardiac_jax, data_pipelines\n"
      "names = []\n"
      "for package in (cardiac_jax, data_pipelines):\n"
      "  for info in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):\n"
      "    importlib.import_module(info.name)\n"
      "    names.append(info.name)\n"
      "changed = sorted(k for k in set(before) | set(os.environ)\n"
      "                 if before.get(k) != os.environ.get(k))\n"
      "assert len(names) > 30, names\n"
      "assert not changed, {k: (before.get(k), os.environ.get(k)) for k in changed}\n")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL")}
  done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]


def test_a_command_applies_the_cpu_flag_first(monkeypatch):
  from experiments import common
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  monkeypatch.delenv("CARDIAC_JAX_XLA_CPU_FLAGS", raising=False)
  if not importlib.metadata.version("jaxlib").startswith("0.10."):
    pytest.skip("the flag is set for the jaxlib versions it was checked with")
  # JAX's backend runs already in this test process: the flag is set, with a warning that it
  # comes too late here.
  with pytest.warns(UserWarning, match="started its backend before"):
    common.start_command(["prog"], quiet=False)
  assert runtime.XLA_CPU_CONV_FLAG in os.environ["XLA_FLAGS"]
