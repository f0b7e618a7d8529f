"""GPU and TPU lowering of every family's programs, exported on this CPU-only machine for
platforms it does not have (experiments.check_lowering); constructs only XLA:CPU can run fail
the check; the XLA:CPU convolution setting reaches no other backend."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from cardiac_jax import families, runtime
from experiments import check_lowering, configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every family (the VAE family in three of its configs) and the programs each one exports.
SMOKE_PROGRAMS = {
    "ar_sivae:smoke": ["train_step", "eval_step"],
    "ar_vae:smoke": ["train_step", "eval_step"],
    "attri_vae:smoke": ["train_step", "eval_step"],
    "temporal_classifier:smoke": ["train_step", "warmup_train_step", "eval_step"],
    "dcgan:smoke": ["train_step", "eval_step"],
    "diffae3d:smoke": ["train_step", "eval_step", "encode", "ddim_encode", "ddim_decode"],
}
PAPER_PROGRAMS = {
    "ar_sivae:paper": SMOKE_PROGRAMS["ar_sivae:smoke"],
    "diffae3d:paper": SMOKE_PROGRAMS["diffae3d:smoke"],
}
# A 3D convolution of (B, T, H, W, C) volumes (the DiffAE's "xla" implementation) and a 2D one.
CONV3D = "dim_numbers = [b, 0, 1, 2, f]x[0, 1, 2, i, o]->[b, 0, 1, 2, f]"
CONV2D = "dim_numbers = [b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f]"


def assert_lowers(spec, programs):
  results = check_lowering.check_config(configs.get_config(spec))
  assert [r.name for r in results] == programs
  for result in results:
    assert result.ok, f"{spec} {result.name}: {result.message}"
    assert result.platforms == ("cuda", "tpu") and len(result.module_sha256) == 64
    assert not check_lowering.cpu_only_custom_calls(result.custom_calls)


def test_the_smoke_configs_cover_every_family():
  assert {configs.get_config(spec).model.family for spec in SMOKE_PROGRAMS} == set(
      families.FAMILIES)


@pytest.mark.parametrize("spec", sorted(SMOKE_PROGRAMS))
def test_every_program_of_every_family_lowers_for_gpu_and_tpu(spec):
  assert_lowers(spec, SMOKE_PROGRAMS[spec])


@pytest.mark.slow
@pytest.mark.parametrize("spec", sorted(PAPER_PROGRAMS))
def test_paper_size_programs_lower_for_gpu_and_tpu(spec):
  """The reference sizes (DiffAE: 50 x 128 x 128 cines, batch 9; AR-SIVAE: 128 x 128, zdim
  256): 40 s of CPU for the two on the 2-core machine."""
  assert_lowers(spec, PAPER_PROGRAMS[spec])


def test_the_diffae_is_exported_with_the_3d_convolution_of_accelerators():
  """conv_impl "auto" is "frames" (2D convolutions of stacked frames) on the CPU backend that
  traces here; the export resolves it as GPU and TPU do: one 3D convolution."""
  config = configs.get_config("diffae3d:smoke")
  assert config.model.conv_impl == "auto"
  assert check_lowering.accelerator_config(config).model.conv_impl == "xla"
  encode = {t.name: t for t in check_lowering.lowering_targets(config)}["encode"]
  text = check_lowering.export_target(encode, ("cuda", "tpu")).mlir_module()
  assert CONV3D in text and CONV2D not in text
  # The same program traced with the config as is (auto -> frames on this CPU backend).
  family = families.make_family(config)
  state = jax.eval_shape(family.init_state, jax.random.key(0))
  cpu_choice = check_lowering.LoweringTarget("encode", family.encode, (state, encode.args[1]))
  text = check_lowering.export_target(cpu_choice, ("cuda", "tpu")).mlir_module()
  assert CONV2D in text and CONV3D not in text


# ------------------------------------------------------------------- constructs only XLA:CPU has
_X = jax.ShapeDtypeStruct((4, 4), jnp.float32)


def _pure_callback(x):
  return jax.pure_callback(lambda a: a * 2, jax.ShapeDtypeStruct(x.shape, x.dtype), x)


def _debug_callback(x):
  jax.debug.callback(lambda a: None, x)
  return x * 2


def _lapack_call(x):
  # A LAPACK target: jax.export accepts it as stable, but only XLA:CPU provides it.
  return jax.ffi.ffi_call("lapack_sgetrf_ffi", jax.ShapeDtypeStruct(x.shape, x.dtype))(x)


def _unregistered_call(x):
  return jax.ffi.ffi_call("cardiac_cpu_kernel", jax.ShapeDtypeStruct(x.shape, x.dtype))(x)


@pytest.mark.parametrize("function, expected", [
    (_pure_callback, r"export for cuda,tpu failed: .*callback"),
    (_debug_callback, r"export for cuda,tpu failed"),
    (_lapack_call, r"XLA:CPU-only custom call\(s\) lapack_sgetrf_ffi"),
    (_unregistered_call, r"export for cuda,tpu failed: .*no compatibility guarantees"),
])
def test_a_construct_only_xla_cpu_has_fails_the_check(function, expected):
  result = check_lowering.check_target(check_lowering.LoweringTarget("toy", function, (_X,)))
  assert not result.ok
  assert re.search(expected, result.message), result.message


def test_the_same_toy_without_the_construct_passes_and_cpu_may_call_lapack():
  plain = check_lowering.check_target(check_lowering.LoweringTarget("toy", lambda x: x * 2,
                                                                    (_X,)))
  assert plain.ok and plain.message == "" and plain.custom_calls == ()
  lapack = check_lowering.check_target(
      check_lowering.LoweringTarget("toy", _lapack_call, (_X,)), platforms=("cpu",))
  assert lapack.ok and lapack.custom_calls == ("lapack_sgetrf_ffi",)


# ------------------------------------------------------------------- the XLA:CPU setting
def test_the_xla_cpu_setting_does_not_reach_accelerator_modules():
  """The flag is an XLA:CPU flag read when the CPU backend compiles; the StableHLO exported for
  GPU and TPU is the same with it (this process, set by conftest as by every command) and
  without it (a command run with CARDIAC_JAX_XLA_CPU_FLAGS=0), and never names it."""
  assert runtime.XLA_CPU_CONV_FLAG.startswith("--xla_cpu_")
  assert runtime.XLA_CPU_CONV_FLAG in os.environ.get("XLA_FLAGS", "")
  spec = "ar_vae:smoke"  # Convolutions throughout, in both directions.
  with_flag = {r.name: r.module_sha256
               for r in check_lowering.check_config(configs.get_config(spec))}
  for target in check_lowering.lowering_targets(configs.get_config(spec)):
    text = check_lowering.module_without_locations(
        check_lowering.export_target(target, ("cuda", "tpu")).mlir_module())
    assert "ynn" not in text and "xla_cpu" not in text
  env = dict(os.environ, CARDIAC_JAX_XLA_CPU_FLAGS="0",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if f != runtime.XLA_CPU_CONV_FLAG)
  done = subprocess.run([sys.executable, "-m", "experiments.check_lowering",
                         f"--config={spec}"], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
  lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
  assert {line["name"]: line["module_sha256"] for line in lines} == with_flag
  assert all(line["ok"] and line["conv_impl"] == "xla" for line in lines)
