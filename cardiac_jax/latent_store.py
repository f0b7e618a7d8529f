"""The latents store of a DiffAE run: the EMA encoder's z_sem of many subjects, computed batch by
batch into a resumable partial store, then written as one latents file with its metadata.

Partial store (OUTPUT.partial/): each finished batch is written at once to batch_<k>.npz
(subjects, splits, z), so memory holds one batch of images and a killed pass, run again with the
same settings, computes only the missing batches (files absent or unreadable). manifest.json
names what the store belongs to: the run (workdir, checkpoint step, SHA-256 of the EMA encoder
parameters, `encoder_digest`), the data, the batch size and z_dim. A store whose run or data
differ is refused (FileExistsError naming both), never mixed in.

Same run or not (`same_run`): two run identities are one run when their checkpoint step and
encoder digest agree (a retrained workdir at the same path is another run; a copied one is the
same). An existing output is ours when OUTPUT.meta.json matches its bytes (SHA-256) and names
the same run (`write_latents`: up to date with the same data and options, else recomputed;
another run's output is refused unless `overwrite`, except while this run's partial store
exists).

Several processes (`write_latents_part`): each encodes a contiguous share of the batches of the
one-process pass into its own part directory OUTPUT.partial/part_<i>_of_<n>/ (resumable as
above) and marks it complete; process 0 waits for every part and writes the file the one-process
pass writes, byte for byte. The processes share files only (no collective), so one that dies
cannot hang the others.

The data side is given: a `Plan` (random-access sources of the splits, the data identity) and
`make_batches(source, batch_size)`, the evaluation batches of a source (the data pipeline).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from cardiac_jax import io, parallel, phenotypes
from cardiac_jax import workdir as workdir_lib

PARTIAL_SUFFIX = ".partial"
META_SUFFIX = ".meta.json"
MANIFEST = "manifest.json"
STORE_KIND = "infer_latents partial store"
STORE_VERSION = 1
FORMATS = ("csv", "plink")


def _no_log(message: str) -> None:
  del message


def sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


@dataclasses.dataclass
class EncoderRun:
  """The EMA encoder of a restored DiffAE run, ready to encode (B, T, S, S, 1) cines.

  identity: {"workdir", "step", "encoder_sha256"}, what tells this run's outputs from another's.
  encode_fn(params, x) -> (B, D) is jitted over the run's mesh (batch rows on "data").
  """
  workdir: str
  config: Any
  family: Any
  mesh: Any
  params: Any
  step: int
  identity: dict
  encode_fn: Callable


def encoder_digest(params) -> str:
  """SHA-256 of a parameter tree: every leaf's path, dtype, shape and bytes, in tree order."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    array = np.ascontiguousarray(jax.device_get(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()



def encoder_run(workdir: str, config, family, state, mesh, step_selection: str) -> EncoderRun:
  """The EMA encoder of a restored DiffAE run (`family.inference_params(state, ema=True)`),
  jitted over `mesh` (batch rows on "data"), with its identity."""
  params = family.inference_params(state, ema=True)["encoder"]
  restored_step = int(jax.device_get(state.step))

  def encode(encoder_params, x):
    return family.apply_encoder(encoder_params, family.model_input({family.field: x}))

  encode_fn = jax.jit(encode, in_shardings=(parallel.replicated(mesh),
                                            parallel.data_sharded(mesh)),
                      out_shardings=parallel.data_sharded(mesh))
  return EncoderRun(workdir=os.path.abspath(workdir), config=config, family=family, mesh=mesh,
                    params=params, step=restored_step,
                    identity={"workdir": os.path.realpath(workdir), "step": restored_step,
                              "step_selection": step_selection,
                              "encoder_sha256": encoder_digest(params)},
                    encode_fn=encode_fn)


def encode_rows(encoder: EncoderRun, x) -> Any:
  """(B, D) float32 codes of one (B, T, S, S, 1) host batch (B divisible by the devices)."""
  array = jax.make_array_from_process_local_data(parallel.data_sharded(encoder.mesh),
                                                 np.asarray(x, np.float32))
  return np.asarray(jax.device_get(encoder.encode_fn(encoder.params, array)), np.float32)


def same_run(a: Optional[dict], b: dict) -> bool:
  """Whether two run identities are the same run: same checkpoint step and encoder weights."""
  return bool(a) and all(a.get(k) == b[k] for k in ("step", "encoder_sha256"))


def describe_run(identity: dict) -> str:
  return (f"{identity.get('workdir')} at step {identity.get('step')} (encoder "
          f"{str(identity.get('encoder_sha256'))[:12]})")


class SourceRows:
  """Random-access view of rows [(split, index)] of several split sources, as one source."""

  def __init__(self, sources: dict, rows: Sequence[tuple[str, int]]):
    self._sources, self._rows = sources, list(rows)

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, i: int):
    split, index = self._rows[int(i)]
    return self._sources[split][index]

  def __getitems__(self, indices: Sequence[int]) -> list:
    wanted = [self._rows[int(i)] for i in indices]
    out: list = [None] * len(wanted)
    for split, source in self._sources.items():
      positions = [p for p, (s, _) in enumerate(wanted) if s == split]
      if not positions:
        continue
      keys = [wanted[p][1] for p in positions]
      fetch = getattr(source, "__getitems__", None)
      examples = fetch(keys) if fetch is not None else [source[k] for k in keys]
      for p, example in zip(positions, examples):
        out[p] = example
    return out


def batch_path(store: str, k: int) -> str:
  return os.path.join(store, f"batch_{k:06d}.npz")


def read_batch(path: str, rows: int, dim: int):
  """(subjects, splits, z) of a finished batch, or None when absent, unreadable or not of the
  expected shape (then it is computed again)."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as data:
      subjects, splits, z = data["subjects"], data["splits"], data["z"]
  except (OSError, ValueError, KeyError, EOFError):
    return None
  if z.shape != (rows, dim) or len(subjects) != rows or len(splits) != rows:
    return None
  return [str(s) for s in subjects], [str(s) for s in splits], z.astype(np.float32)


def write_batch(path: str, subjects, splits, z) -> None:
  io.write_npz(path, subjects=np.asarray(subjects, dtype=str),
               splits=np.asarray(splits, dtype=str), z=np.asarray(z, np.float32))


class LatentStoreConflictError(FileExistsError):
  """An output or partial store that holds something else than this run's latents (another
  run's, other settings, not a store): the message names the path and the way out, and a
  command prints it as one line."""


def open_store(store: str, manifest: dict) -> None:
  """Creates the partial store with its manifest (staged, then renamed, so a store always has
  one), or checks that an existing one belongs to the same run and data."""
  path = os.path.join(store, MANIFEST)
  if os.path.isdir(store):
    existing = io.read_json(path)
    if existing is None or existing.get("kind") != STORE_KIND:
      raise LatentStoreConflictError(
          f"{store} exists but has no readable {MANIFEST}: not a partial store of "
          "infer_latents; move it away or choose another --output")
    if not same_run(existing.get("run"), manifest["run"]):
      raise LatentStoreConflictError(
          f"{store} holds the unfinished latents of another run, "
          f"{describe_run(existing.get('run') or {})}, not of "
          f"{describe_run(manifest['run'])}; delete it or choose another --output")
    different = [k for k in ("data", "batch_size", "z_dim", "version")
                 if existing.get(k) != manifest[k]]
    if different:
      detail = "; ".join(f"{k}: stored {existing.get(k)!r}, now {manifest[k]!r}"
                         for k in different)
      raise LatentStoreConflictError(
          f"{store} holds unfinished latents of this run computed with other settings "
          f"({detail}); rerun with those settings to finish it, or delete it")
    return
  if os.path.exists(store):
    raise LatentStoreConflictError(f"{store} exists and is not a directory")
  staging = f"{store}.{uuid.uuid4().hex[:8]}.tmp"
  os.makedirs(staging)
  try:
    with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as f:
      json.dump(manifest, f, indent=2)
    try:
      os.rename(staging, store)
    except OSError:
      if not os.path.isdir(store):
        raise
      # Another process of the same pass created it first: check that one instead.
      open_store(store, manifest)
  finally:
    if os.path.exists(staging):
      shutil.rmtree(staging, ignore_errors=True)


@dataclasses.dataclass
class Plan:
  """One encoding pass: the prepared directory, the splits, their sources and sizes."""
  directory: str
  splits: list[str]
  sources: dict
  sizes: dict
  data: dict

  @property
  def rows(self) -> list[tuple[str, int]]:
    return [(split, i) for split in self.splits for i in range(self.sizes[split])]


def batch_sizes(num_rows: int, batch_size: int) -> list[int]:
  """Rows of each batch of a pass over `num_rows` rows: all full but the last."""
  num_batches = -(-num_rows // batch_size)
  return [min(batch_size, num_rows - k * batch_size) for k in range(num_batches)]


def encode_plan(encoder: EncoderRun, plan: Plan, batch_size: int,
                store: Optional[str] = None, progress: bool = False,
                log: Callable[[str], None] = _no_log, *,
                make_batches: Callable[[Any, int], Any]) -> tuple[list[str], list[str], Any]:
  """(subjects, splits, z (N, D) float32) of every row of `plan`, in order. With `store` (a
  partial-store directory, opened by the caller) each batch is written there as soon as it
  is computed and batches already there are not computed again. make_batches(source,
  batch_size): the evaluation batches of a random-access source (with "mask", "subject" and
  the encoder's input field)."""
  num_batches = len(batch_sizes(len(plan.rows), max(batch_size, 1)))
  done = encode_batches(encoder, plan, batch_size, range(num_batches), store, progress, log,
                        make_batches=make_batches)
  return _concatenate(done, num_batches, encoder.family.z_sem_dim, store)


def _concatenate(done: dict[int, tuple], num_batches: int, dim: int,
                 store: Optional[str]) -> tuple[list[str], list[str], Any]:
  """(subjects, splits, z) of batches 0 .. num_batches - 1 in order."""
  subjects = [s for k in range(num_batches) for s in done[k][0]]
  splits = [s for k in range(num_batches) for s in done[k][1]]
  z = (np.concatenate([done[k][2] for k in range(num_batches)]) if num_batches
       else np.zeros((0, dim), np.float32))
  if len(set(subjects)) != len(subjects):
    raise RuntimeError(f"duplicate subjects in the computed latents"
                       f"{f' (partial store {store})' if store else ''}; delete the store and "
                       "rerun")
  return subjects, splits, z


def encode_batches(encoder: EncoderRun, plan: Plan, batch_size: int, indices: Sequence[int],
                   store: Optional[str] = None, progress: bool = False,
                   log: Callable[[str], None] = _no_log, *,
                   make_batches: Callable[[Any, int], Any]) -> dict[int, tuple]:
  """{k: (subjects, splits, z)} of the batches `indices` (a contiguous range) of the pass over
  `plan` in batches of `batch_size`; batch k holds the same rows, and so the same codes, whichever
  other batches are computed with it. Store and make_batches as in `encode_plan`."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  parallel.check_batch_size(batch_size, encoder.mesh)
  rows = plan.rows
  dim = encoder.family.z_sem_dim
  sizes = batch_sizes(len(rows), batch_size)
  indices = list(indices)
  done: dict[int, tuple] = {}
  if store is not None:
    for k in indices:
      finished = read_batch(batch_path(store, k), sizes[k], dim)
      if finished is not None:
        done[k] = finished
  missing = [k for k in indices if k not in done]
  if done:
    log(f"resuming: {len(done)} of {len(indices)} batches were finished, computing "
        f"{len(missing)}")
  bar = None
  if progress:
    from tqdm import auto as tqdm
    bar = tqdm.tqdm(total=len(indices), initial=len(done), desc="latents", unit="batch",
                    dynamic_ncols=True)
  batches = None
  try:
    if missing:
      # Only the rows of missing batches are loaded; every missing batch but the last of the
      # pass is full, so the view's batches are exactly the missing ones.
      subset = SourceRows(plan.sources, [rows[i] for k in missing
                                         for i in range(k * batch_size,
                                                        k * batch_size + sizes[k])])
      batches = make_batches(subset, batch_size)
      for k, batch in zip(missing, batches):
        mask = np.asarray(batch["mask"], bool)
        z = encode_rows(encoder, batch[encoder.family.field])[mask]
        subjects = [str(s) for s in np.asarray(batch["subject"])[mask]]
        splits = [rows[i][0] for i in range(k * batch_size, k * batch_size + sizes[k])]
        if len(subjects) != sizes[k]:
          raise RuntimeError(f"batch {k} has {len(subjects)} subjects, expected {sizes[k]}")
        if store is not None:
          write_batch(batch_path(store, k), subjects, splits, z)
        done[k] = (subjects, splits, z)
        if bar is not None:
          bar.update(1)
  finally:
    # Stop the input pipeline's threads now (an interrupted pass leaves the generator open).
    if batches is not None:
      batches.close()
    if bar is not None:
      bar.close()
  return done


def output_is_ours(output: str, identity: dict) -> tuple[bool, Optional[dict]]:
  """(same run, meta) of an existing output: its meta file must match its bytes."""
  meta = io.read_json(output + META_SUFFIX)
  if meta is None or meta.get("sha256") != sha256_file(output):
    return False, None
  return same_run(meta.get("run"), identity), meta


def _start_pass(encoder: EncoderRun, plan: Plan, output: str, fmt: str, inverse_normal: bool,
                batch_size: Optional[int], overwrite: bool, log: Callable[[str], None]):
  """(meta of an up-to-date output or None, store, batch size, options, manifest): the checks
  of an existing output (`write_latents`), then the partial store opened."""
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r} (one of {FORMATS})")
  # A folder was refused as "another run's output" (--overwrite could not help), and a path
  # under a file ended in a raw FileExistsError from makedirs.
  if os.path.isdir(output):
    raise phenotypes.LatentsFileError(f"{output} is a folder: name a file for the latents")
  above = workdir_lib.file_above(output)
  if above:
    raise phenotypes.LatentsFileError(f"{output} lies under {above}, which is a file: name a "
                                      "file in a folder")
  store = output + PARTIAL_SUFFIX
  batch_size = batch_size or int(encoder.config.train.eval_batch_size)
  options = {"format": fmt, "inverse_normal": bool(inverse_normal)}
  manifest = {"kind": STORE_KIND, "version": STORE_VERSION, "run": encoder.identity,
              "data": plan.data, "batch_size": int(batch_size),
              "z_dim": encoder.family.z_sem_dim, "output": output}
  if os.path.exists(output):
    ours, meta = output_is_ours(output, encoder.identity)
    if ours and meta.get("data") == plan.data and meta.get("options") == options:
      log(f"{output} is up to date (same run, data and options)")
      return meta, store, batch_size, options, manifest
    store_manifest = io.read_json(os.path.join(store, MANIFEST))
    resuming = store_manifest is not None and same_run(store_manifest.get("run"),
                                                       encoder.identity)
    if not (ours or resuming or overwrite):
      origin = (f"another run, {describe_run(meta['run'])}" if meta else
                f"an unknown origin (no {os.path.basename(output)}{META_SUFFIX} matching it)")
      raise LatentStoreConflictError(
          f"{output} exists and holds the latents of {origin}, not of "
          f"{describe_run(encoder.identity)}; pass --overwrite or choose another --output")
  os.makedirs(os.path.dirname(output), exist_ok=True)
  open_store(store, manifest)
  return None, store, batch_size, options, manifest


def write_latents(encoder: EncoderRun, plan: Plan, output: str, *,
                  make_batches: Callable[[Any, int], Any], fmt: str = "csv",
                  inverse_normal: bool = False, batch_size: Optional[int] = None,
                  overwrite: bool = False, progress: bool = True,
                  log: Callable[[str], None] = _no_log) -> dict:
  """Computes (resumably, in output + PARTIAL_SUFFIX) and writes the latents file `output`
  (`phenotypes.write_latents_csv`, or the PLINK phenotype file for fmt="plink", of the
  inverse-normal transformed codes with `inverse_normal`) and its meta; returns the meta."""
  meta, store, batch_size, options, _ = _start_pass(encoder, plan, output, fmt, inverse_normal,
                                                    batch_size, overwrite, log)
  if meta is not None:
    return meta
  log(f"encoding {sum(plan.sizes.values())} subjects ({', '.join(plan.splits)}) of "
      f"{plan.directory} with {describe_run(encoder.identity)}")
  subjects, row_splits, z = encode_plan(encoder, plan, batch_size, store, progress, log,
                                        make_batches=make_batches)
  return _write_output(encoder, plan, output, store, subjects, row_splits, z, fmt,
                       inverse_normal, options, batch_size, log)


def _write_output(encoder: EncoderRun, plan: Plan, output: str, store: str, subjects,
                  row_splits, z, fmt: str, inverse_normal: bool, options: dict,
                  batch_size: int, log: Callable[[str], None]) -> dict:
  """Writes the latents file and its meta, then removes the partial store; returns the meta."""
  values = phenotypes.inverse_normal_transform(z) if inverse_normal else z
  if fmt == "csv":
    phenotypes.write_latents_csv(output, subjects, row_splits, values)
  else:
    phenotypes.write_plink_phenotypes(output, subjects, values)
  meta = {"run": encoder.identity, "data": plan.data, "options": options,
          "num_subjects": len(subjects), "z_dim": int(np.shape(z)[1]),
          "batch_size": int(batch_size), "sha256": sha256_file(output),
          "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
  io.write_json(output + META_SUFFIX, meta)
  shutil.rmtree(store, ignore_errors=True)
  log(f"wrote {len(subjects)} subjects x {meta['z_dim']} latents to {output}")
  return meta


# ----------------------------------------------------------------------------- several processes

PART_COMPLETE = "complete.json"


def part_batches(num_batches: int, process_id: int, num_processes: int) -> range:
  """The contiguous batches of process `process_id` of `num_processes` (by subject order; the
  first processes take one batch fewer when the count does not divide)."""
  return range(process_id * num_batches // num_processes,
               (process_id + 1) * num_batches // num_processes)


def part_dir(store: str, process_id: int, num_processes: int) -> str:
  return os.path.join(store, f"part_{process_id}_of_{num_processes}")


def _part_is_complete(store: str, process_id: int, num_processes: int,
                      batches: range) -> bool:
  marker = io.read_json(os.path.join(part_dir(store, process_id, num_processes), PART_COMPLETE))
  return marker is not None and marker.get("batches") == [batches.start, batches.stop]


def write_latents_part(encoder: EncoderRun, plan: Plan, output: str, *, process_id: int,
                       num_processes: int, make_batches: Callable[[Any, int], Any],
                       fmt: str = "csv", inverse_normal: bool = False,
                       batch_size: Optional[int] = None, overwrite: bool = False,
                       progress: bool = True, merge_timeout_s: float = 86400.0,
                       poll_s: float = 1.0,
                       log: Callable[[str], None] = _no_log) -> Optional[dict]:
  """One process's share of `write_latents` run by `num_processes` processes sharing `output`'s
  file system; returns the meta on process 0, None on the others.

  Every process encodes its contiguous batches (`part_batches`: the batches of a one-process
  pass, so each code is computed exactly as there) into its own part directory of the partial
  store, OUTPUT.partial/part_<i>_of_<n>/ (resumable batch by batch, as `encode_plan`), and marks
  the part complete. Process 0 then waits (up to `merge_timeout_s`) until every part is
  complete, concatenates the batches in order and writes the same file a one-process run writes.
  A rerun of the same launch computes only the batches that are missing. TimeoutError when a
  part is still incomplete at the deadline (rerun the launch: finished parts are kept).
  """
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id} is outside [0, num_processes={num_processes})")
  meta, store, batch_size, options, _ = _start_pass(encoder, plan, output, fmt, inverse_normal,
                                                    batch_size, overwrite, log)
  if meta is not None:
    return meta if process_id == 0 else None
  sizes = batch_sizes(len(plan.rows), batch_size)
  num_batches, dim = len(sizes), encoder.family.z_sem_dim
  mine = part_batches(num_batches, process_id, num_processes)
  directory = part_dir(store, process_id, num_processes)
  os.makedirs(directory, exist_ok=True)
  if not _part_is_complete(store, process_id, num_processes, mine):
    log(f"process {process_id} of {num_processes}: encoding batches {mine.start}.."
        f"{mine.stop - 1} of {num_batches} ({sum(sizes[k] for k in mine)} subjects) with "
        f"{describe_run(encoder.identity)}")
    encode_batches(encoder, plan, batch_size, mine, directory, progress, log,
                   make_batches=make_batches)
    io.write_json(os.path.join(directory, PART_COMPLETE), {"batches": [mine.start, mine.stop]})
  if process_id != 0:
    log(f"process {process_id} of {num_processes}: part complete; process 0 writes {output}")
    return None
  parts = [(i, part_batches(num_batches, i, num_processes)) for i in range(num_processes)]
  deadline = time.monotonic() + merge_timeout_s
  waiting = [i for i, batches in parts if not _part_is_complete(store, i, num_processes,
                                                                 batches)]
  if waiting:
    log(f"waiting for the parts of processes {waiting}")
  while waiting:
    if time.monotonic() > deadline:
      raise TimeoutError(f"the parts of processes {waiting} of {store} were not complete "
                         f"after {merge_timeout_s:.0f} s; rerun the same launch to finish them")
    time.sleep(poll_s)
    waiting = [i for i in waiting if not _part_is_complete(store, i, num_processes, parts[i][1])]
  done = {}
  for i, batches in parts:
    for k in batches:
      finished = read_batch(batch_path(part_dir(store, i, num_processes), k), sizes[k], dim)
      if finished is None:
        raise RuntimeError(f"{part_dir(store, i, num_processes)} is marked complete but batch "
                           f"{k} is missing or unreadable; delete that part and rerun")
      done[k] = finished
  subjects, row_splits, z = _concatenate(done, num_batches, dim, store)
  return _write_output(encoder, plan, output, store, subjects, row_splits, z, fmt,
                       inverse_normal, options, batch_size, log)
