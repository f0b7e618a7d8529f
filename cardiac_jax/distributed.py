"""Joining JAX's multi-controller runtime: one Python process per host (or per GPU), one program.

`initialize_from_environment` calls `jax.distributed.initialize` once, before any JAX
computation, with the first of these that applies:

1. explicit arguments (`--coordinator_address`, `--num_processes`, `--process_id` of
   `experiments.train`);
2. the variables CARDIAC_JAX_COORDINATOR ("host:port" of process 0),
   CARDIAC_JAX_NUM_PROCESSES and CARDIAC_JAX_PROCESS_ID, for launchers that are neither SLURM nor
   a TPU pod (a shell loop, mpirun without mpi4py, a Kubernetes job);
3. a SLURM step with several tasks (SLURM_NTASKS > 1, one task per GPU or per host): JAX reads
   the coordinator, process count and id from the SLURM variables;
4. a Cloud TPU VM (libtpu installed and a TPU device present): JAX asks the TPU metadata for the
   pod's workers, which also covers a single-host slice (one process).

Otherwise the run is a single process and nothing is initialised. With several processes the
CPU backend's cross-process collectives use gloo (what the fake-device tests and CPU-only
multi-process runs need; GPU and TPU collectives are unaffected). After initialisation
`jax.devices()` lists every process's devices and `jax.process_index()` says which process this is.

`process_slot` reads the same launch (explicit arguments, CARDIAC_JAX_* variables, SLURM)
without joining a runtime, for commands whose processes share their work through files only
(`experiments.infer_latents`).
"""

from __future__ import annotations

import glob
import importlib.util
import os

import jax

COORDINATOR_ENV = "CARDIAC_JAX_COORDINATOR"
NUM_PROCESSES_ENV = "CARDIAC_JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "CARDIAC_JAX_PROCESS_ID"
_SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                    "SLURM_LOCALID")


def _int_from(value: str | int | None, what: str) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{what} must be an integer, got {value!r}") from None


def _use_gloo_for_cpu_collectives() -> None:
  # An explicit choice (e.g. JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi) is kept.
  if jax.config.jax_cpu_collectives_implementation not in ("mpi", "megascale"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _on_slurm_with_several_tasks() -> bool:
  if not all(v in os.environ for v in _SLURM_VARIABLES):
    return False
  return (_int_from(os.environ["SLURM_NTASKS"], "SLURM_NTASKS") or 1) > 1


def _on_cloud_tpu_vm() -> bool:
  has_libtpu = importlib.util.find_spec("libtpu") is not None
  has_tpu = bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))
  return has_libtpu and has_tpu


def initialize_from_environment(coordinator_address: str | None = None,
                                num_processes: int | None = None,
                                process_id: int | None = None) -> bool:
  """Initialises the multi-process runtime if this run has several processes.

  Call it before anything touches a JAX device. Returns True when the runtime is (now or
  already) initialised, False for a single-process run.

  Raises:
    ValueError: incomplete or inconsistent explicit arguments / CARDIAC_JAX_* variables.
    RuntimeError (from JAX): initialisation after a JAX computation, or the coordinator cannot
      be reached within JAX's timeout.
  """
  if jax.distributed.is_initialized():
    return True
  source = "arguments"
  if coordinator_address is None and num_processes is None and process_id is None:
    source = f"{COORDINATOR_ENV}/{NUM_PROCESSES_ENV}/{PROCESS_ID_ENV}"
    coordinator_address = os.environ.get(COORDINATOR_ENV) or None
    num_processes = _int_from(os.environ.get(NUM_PROCESSES_ENV), NUM_PROCESSES_ENV)
    process_id = _int_from(os.environ.get(PROCESS_ID_ENV), PROCESS_ID_ENV)

  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if num_processes is None or (num_processes > 1 and None in explicit):
      raise ValueError(
          f"multi-process run from {source} needs all of coordinator address, number of "
          f"processes and process id; got coordinator_address={coordinator_address!r}, "
          f"num_processes={num_processes!r}, process_id={process_id!r}")
    num_processes, process_id = int(num_processes), int(process_id or 0)
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"process_id={process_id} is outside [0, num_processes={num_processes})")
    if num_processes == 1:
      return False
    _use_gloo_for_cpu_collectives()
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return True

  if _on_slurm_with_several_tasks():
    _use_gloo_for_cpu_collectives()
    jax.distributed.initialize()  # JAX's SLURM detection: coordinator on the first node.
    return True
  if _on_cloud_tpu_vm():
    jax.distributed.initialize()  # JAX's Cloud TPU detection via the VM metadata.
    return True
  return False


def process_slot(num_processes: int | None = None,
                 process_id: int | None = None) -> tuple[int, int]:
  """(process id, number of processes) of this process as its launch declares them, without
  joining a JAX runtime: the explicit arguments, else CARDIAC_JAX_NUM_PROCESSES and
  CARDIAC_JAX_PROCESS_ID, else a SLURM step with several tasks (SLURM_PROCID, SLURM_NTASKS),
  else (0, 1).

  Raises:
    ValueError: only one of the two given, or an id outside [0, number of processes).
  """
  source = "arguments"
  if num_processes is None and process_id is None:
    source = f"{NUM_PROCESSES_ENV}/{PROCESS_ID_ENV}"
    num_processes = _int_from(os.environ.get(NUM_PROCESSES_ENV), NUM_PROCESSES_ENV)
    process_id = _int_from(os.environ.get(PROCESS_ID_ENV), PROCESS_ID_ENV)
  if num_processes is None and process_id is None and _on_slurm_with_several_tasks():
    source = "SLURM_NTASKS/SLURM_PROCID"
    num_processes = _int_from(os.environ["SLURM_NTASKS"], "SLURM_NTASKS")
    process_id = _int_from(os.environ.get("SLURM_PROCID"), "SLURM_PROCID")
  if num_processes is None and process_id is None:
    return 0, 1
  if num_processes is None or process_id is None:
    raise ValueError(f"a multi-process launch from {source} needs both the number of processes "
                     f"and the process id; got num_processes={num_processes!r}, "
                     f"process_id={process_id!r}")
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id} is outside [0, num_processes={num_processes})")
  return int(process_id), int(num_processes)
