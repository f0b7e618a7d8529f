"""experiments.infer_latents split over several processes: each encodes its share of the
batches into its own part of the partial store, process 0 merges, and the file is the one a
single process writes, byte for byte, also after a process was killed and the launch rerun.

In-process tests drive the processes' shares one after the other (same encoder, same bytes as
a one-process run in this process); the command-line test starts two real processes at once
(JAX_PLATFORMS=cpu) with the launch variables of a multi-process training run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cardiac_jax import distributed, latent_store, phenotypes
from experiments import infer_latents
from tests.conftest import CINE_COHORT_SUBJECTS
from tests.test_infer_latents import _Interrupt, _counting_encoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 4    # 12 subjects: 3 batches; with 2 processes, process 0 takes batch 0, process 1
             # batches 1 and 2.
TIMEOUT_S = 300


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


@pytest.fixture(scope="module")
def one_process_csv(diffae_run, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("one_process") / "latents.csv")
  infer_latents.run(diffae_run, path, batch_size=BATCH, progress=False)
  return path


def test_part_batches_split_the_pass_in_subject_order():
  for num_batches in range(0, 12):
    for num_processes in range(1, 5):
      parts = [latent_store.part_batches(num_batches, i, num_processes)
               for i in range(num_processes)]
      assert [k for part in parts for k in part] == list(range(num_batches))
      assert max(map(len, parts)) - min(map(len, parts)) <= 1
  assert latent_store.part_batches(3, 0, 2) == range(0, 1)
  assert latent_store.part_batches(3, 1, 2) == range(1, 3)


def test_process_slot_reads_the_launch(monkeypatch):
  for name in (distributed.NUM_PROCESSES_ENV, distributed.PROCESS_ID_ENV, "SLURM_NTASKS",
               "SLURM_PROCID", "SLURM_JOB_ID"):
    monkeypatch.delenv(name, raising=False)
  assert distributed.process_slot() == (0, 1)
  assert distributed.process_slot(3, 2) == (2, 3)
  monkeypatch.setenv(distributed.NUM_PROCESSES_ENV, "2")
  monkeypatch.setenv(distributed.PROCESS_ID_ENV, "1")
  assert distributed.process_slot() == (1, 2)
  assert distributed.process_slot(4, 0) == (0, 4)          # Arguments first.
  monkeypatch.delenv(distributed.NUM_PROCESSES_ENV)
  monkeypatch.delenv(distributed.PROCESS_ID_ENV)
  for name, value in (("SLURM_JOB_ID", "7"), ("SLURM_STEP_NODELIST", "n1"),
                      ("SLURM_NTASKS", "4"), ("SLURM_PROCID", "3"), ("SLURM_LOCALID", "3")):
    monkeypatch.setenv(name, value)
  assert distributed.process_slot() == (3, 4)
  with pytest.raises(ValueError, match="outside"):
    distributed.process_slot(2, 2)
  with pytest.raises(ValueError, match="both"):
    distributed.process_slot(2, None)


def test_two_shares_write_the_one_process_file(diffae_run, one_process_csv, tmp_path,
                                               monkeypatch):
  output = str(tmp_path / "latents.csv")
  calls = _counting_encoder(monkeypatch)
  assert infer_latents.run(diffae_run, output, batch_size=BATCH, progress=False,
                           process_id=1, num_processes=2) is None
  assert calls == [BATCH, BATCH] and not os.path.exists(output)
  store = output + latent_store.PARTIAL_SUFFIX
  assert sorted(os.listdir(latent_store.part_dir(store, 1, 2))) == [
      "batch_000001.npz", "batch_000002.npz", latent_store.PART_COMPLETE]
  meta = infer_latents.run(diffae_run, output, batch_size=BATCH, progress=False,
                           process_id=0, num_processes=2)
  assert calls == [BATCH] * 3
  assert _read(output) == _read(one_process_csv)
  assert meta["num_subjects"] == CINE_COHORT_SUBJECTS
  assert meta["sha256"] == latent_store.sha256_file(output)
  assert not os.path.exists(store)
  # A rerun of either process finds the file up to date.
  assert infer_latents.run(diffae_run, output, batch_size=BATCH, progress=False,
                           process_id=1, num_processes=2) is None
  assert calls == [BATCH] * 3


def test_a_killed_share_resumes_and_the_file_is_the_same(diffae_run, tmp_path, monkeypatch):
  output = str(tmp_path / "latents.pheno")
  reference = str(tmp_path / "reference.pheno")
  infer_latents.run(diffae_run, reference, fmt="plink", batch_size=BATCH, progress=False)
  real = latent_store.encode_rows
  calls = _counting_encoder(monkeypatch, fail_at=2)
  with pytest.raises(_Interrupt):
    infer_latents.run(diffae_run, output, fmt="plink", batch_size=BATCH, progress=False,
                      process_id=1, num_processes=2)
  # Process 0 finishes its share but cannot merge while process 1's part is incomplete.
  encoder = infer_latents.load_encoder(diffae_run)
  with pytest.raises(TimeoutError, match=r"processes \[1\]"):
    latent_store.write_latents_part(
        encoder, infer_latents.make_plan(encoder), output, process_id=0, num_processes=2,
        fmt="plink", batch_size=BATCH, progress=False, merge_timeout_s=0.0,
        make_batches=infer_latents.eval_batches(encoder))
  assert not os.path.exists(output)
  assert len(calls) == 3            # Process 1: batch 1, killed on batch 2; process 0: batch 0.
  monkeypatch.setattr(latent_store, "encode_rows", real)
  calls = _counting_encoder(monkeypatch)
  infer_latents.run(diffae_run, output, fmt="plink", batch_size=BATCH, progress=False,
                    process_id=1, num_processes=2)
  infer_latents.run(diffae_run, output, fmt="plink", batch_size=BATCH, progress=False,
                    process_id=0, num_processes=2)
  assert calls == [BATCH]            # Only batch 2 was left.
  assert _read(output) == _read(reference)
  assert len(phenotypes.read_latents(output).subjects) == CINE_COHORT_SUBJECTS


# ----------------------------------------------------------------------------- two processes

WORKER = r"""
import json, os, signal, sys
out_dir, kill_at = sys.argv[1], int(sys.argv[2])
from cardiac_jax import latent_store
calls = []
real = latent_store.encode_rows

def counting(encoder, x):
  calls.append(len(x))
  with open(os.path.join(out_dir, f"calls{os.environ.get('CARDIAC_JAX_PROCESS_ID', 'single')}"
                                  ".json"), "w") as f:
    json.dump(calls, f)
  if len(calls) == kill_at:
    os.kill(os.getpid(), signal.SIGKILL)
  return real(encoder, x)

latent_store.encode_rows = counting
from absl import flags
from experiments import infer_latents
values = flags.FlagValues()
infer_latents.define_flags(values)
values(["infer_latents"] + sys.argv[3:])
infer_latents.main(["infer_latents"], values)
"""


def _launch(args: list[str], out_dir: str, num_processes: int, kill_at: dict) -> list:
  processes = []
  for i in range(num_processes):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if num_processes > 1:
      env.update({distributed.NUM_PROCESSES_ENV: str(num_processes),
                  distributed.PROCESS_ID_ENV: str(i)})
    processes.append(subprocess.Popen(
        [sys.executable, "-c", WORKER, out_dir, str(kill_at.get(i, 0))] + args, cwd=REPO,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  return processes


def _wait(processes: list) -> list:
  logs = []
  try:
    for p in processes:
      logs.append(p.communicate(timeout=TIMEOUT_S)[0])
  except subprocess.TimeoutExpired:
    for p in processes:
      p.kill()
    pytest.fail(f"a process did not finish within {TIMEOUT_S} s")
  return logs


def _calls(out_dir, name: str) -> list:
  path = os.path.join(out_dir, f"calls{name}.json")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)


def test_two_processes_write_the_one_process_file_also_after_a_kill(diffae_run, tmp_path):
  common = [f"--workdir={diffae_run}", f"--batch_size={BATCH}", "--noprogress"]
  single, pair, rerun = (str(tmp_path / name) for name in ("single", "pair", "rerun"))
  for d in (single, pair, rerun):
    os.makedirs(d)
  reference = os.path.join(single, "latents.csv")
  output = str(tmp_path / "shared" / "latents.csv")
  # The one-process reference and the first launch of the pair run together; process 1 of
  # the pair is killed (SIGKILL) on its second batch, and process 0 gives up waiting for it.
  launched = (_launch(common + [f"--output={reference}"], single, 1, {}) +
              _launch(common + [f"--output={output}", "--merge_timeout=6"], pair, 2, {1: 2}))
  logs = _wait(launched)
  assert launched[0].returncode == 0, logs[0][-3000:]
  assert launched[2].returncode == -9, logs[2][-3000:]
  assert launched[1].returncode != 0 and "TimeoutError" in logs[1], logs[1][-3000:]
  assert not os.path.exists(output)
  assert _calls(pair, "0") == [BATCH] and _calls(pair, "1") == [BATCH, BATCH]
  # The same launch again: process 1 computes only its missing batch, process 0 nothing.
  relaunched = _launch(common + [f"--output={output}"], rerun, 2, {})
  logs = _wait(relaunched)
  for p, log in zip(relaunched, logs):
    assert p.returncode == 0, log[-3000:]
  assert _calls(rerun, "0") == [] and _calls(rerun, "1") == [BATCH]
  assert _read(output) == _read(reference)
  assert not os.path.exists(output + latent_store.PARTIAL_SUFFIX)
