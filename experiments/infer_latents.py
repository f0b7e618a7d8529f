"""Semantic codes of a DiffAE run, one per subject: `python -m experiments.infer_latents`.

  python -m experiments.infer_latents --workdir=DIR [--data_dir=FOLDER] [--splits=train,val,test]
      [--output=FILE] [--format=csv|plink] [--inverse_normal] [--batch_size=B] [--step=N]
      [--overwrite]

z_sem = Enc_EMA(x_0) for every subject (spec /specs/diffae3d.md "Latents": the EMA encoder,
deterministic, one z_sem_dim-vector per subject), x_0 the run's cine field (data.view) as the
run's evaluation batches present it (`data_pipelines.cine.eval_batches`: no augmentation,
resized to data.image_size).

Data:
- default: the run's own prepared cine dataset (`cine.prepared_cine_dir` of its config,
  prepared first if needed), all of its non-empty splits or --splits, rows in split order, and
  within a split in the dataset's index order;
- --data_dir=FOLDER with splits.json: an already-prepared cine dataset (data_pipelines.cine),
  used as it is;
- --data_dir=FOLDER otherwise: a raw cohort in the layout of the run's dataset kind ("ukbb":
  converted UK Biobank subject folders; "synthetic": the ACDC layout of data_pipelines.synthetic),
  prepared (resumably) with the run's preparation settings (those of its training data's
  report.json, else of config.data) into <cache>/<kind>/<sha1 of the folder>/cine/<name> (for
  "ukbb" the folder a run on that cohort prepares too).

Streaming and resumption: batches of --batch_size subjects (default: the run's
train.eval_batch_size) go through one jitted encoder; each finished batch is written at once
to OUTPUT.partial/batch_<k>.npz (subjects, splits, z), so memory holds one batch of images and a
killed run, rerun with the same command, computes only the missing batches (those files that
are absent or unreadable) and never reloads the images of finished ones. OUTPUT.partial/
manifest.json names what the store belongs to: the run (workdir, checkpoint step, SHA-256 of the
EMA encoder parameters), the data (prepared directory, splits and their sizes, SHA-256 of
splits.json and of the preparation config, input field and size) and the batch size. A store
whose run or data differ is refused (FileExistsError naming both), never mixed in.

Output (--output, default DIR/latents/latents.csv, latents_int.csv with --inverse_normal, .pheno
instead of .csv for --format=plink), written atomically at the end (temporary file, then
os.replace, by `cardiac_jax.phenotypes`): --format=csv, header `subject,split,z0..z{D-1}`;
--format=plink, the PLINK / REGENIE phenotype file `FID IID z0 .. z{D-1}` (FID = IID = subject,
missing values NA). A bar shows the batches done (tqdm; --noprogress hides it). --inverse_normal
replaces every latent by its rank-based inverse-normal transform over the written subjects
(Blom offset 3/8). Then OUTPUT.meta.json (the run, the data, format, transform, subject count
and the SHA-256 of OUTPUT) is written and the partial store removed.

Same run or not: an existing OUTPUT is ours when OUTPUT.meta.json matches its bytes (SHA-256) and
names the same run, identified by checkpoint step and EMA encoder digest (a retrained workdir at
the same path is another run; a copied one is the same). Then a rerun with the same data and
options returns at once ("up to date") and one with other options overwrites it. An OUTPUT
without valid metadata or from another run is refused unless --overwrite, except while the
partial store of this very run exists (an interrupted run of ours, which was allowed to write
there). One process per output file.

Functions for analyses: `compute_latents(workdir, ...)` -> (subjects, splits, z (N, D) float32),
`run(workdir, output, ...)` (the program), `default_latents_path(workdir)` =
DIR/latents/latents.csv, and `load_or_compute(workdir, path=None, ...)` -> LatentsTable: the
latents file of the analyses (probe, reproducibility, associate, manipulate), computed into the
default path when missing.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from typing import Any, Callable, Optional, Sequence

from absl import app, flags

from experiments import common

FORMATS = ("csv", "plink")
ALL_SPLITS = ("train", "val", "test")
PARTIAL_SUFFIX = ".partial"
META_SUFFIX = ".meta.json"
MANIFEST = "manifest.json"
STORE_KIND = "infer_latents partial store"
STORE_VERSION = 1
_ENCODER_CACHE_SIZE = 2


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command-line flags; defined only when run as a program (a test passes its own
  FlagValues)."""
  fv = {"flag_values": flag_values}
  flags.DEFINE_string("workdir", None, "diffae3d run directory.", **fv)
  flags.DEFINE_string("data_dir", None, "Another cohort: a prepared cine dataset (has "
                      "splits.json) or a raw folder of the run's dataset kind (default: the "
                      "run's own prepared dataset).", **fv)
  flags.DEFINE_list("splits", None, "Splits to encode (default: every non-empty split).", **fv)
  flags.DEFINE_string("output", None, "Output file (default: DIR/latents/latents[_int].csv, "
                      "or .pheno for --format=plink).", **fv)
  flags.DEFINE_enum("format", "csv", list(FORMATS), "csv: subject,split,z0..; plink: "
                    "FID IID z0.. phenotype file for PLINK / REGENIE.", **fv)
  flags.DEFINE_bool("inverse_normal", False, "Rank-based inverse-normal transform of every "
                    "latent (Blom) before writing.", **fv)
  flags.DEFINE_integer("batch_size", None, "Subjects per batch (default: the run's "
                       "train.eval_batch_size).", **fv)
  flags.DEFINE_string("step", None, "Checkpoint: a step, best (the best validation "
                      "checkpoint) or latest (default).", **fv)
  flags.DEFINE_bool("overwrite", False, "Replace an existing output of another run.", **fv)
  flags.DEFINE_bool("progress", True, "Show a progress bar.", **fv)


def _log(message: str) -> None:
  print(f"[infer_latents {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def default_latents_path(workdir: str, fmt: str = "csv", inverse_normal: bool = False) -> str:
  """DIR/latents/latents.csv (raw codes as CSV; _int for the transformed codes, .pheno for the
  PLINK format)."""
  if fmt not in FORMATS:
    raise ValueError(f"unknown latents format {fmt!r} (one of {FORMATS})")
  name = "latents" + ("_int" if inverse_normal else "") + (".csv" if fmt == "csv" else ".pheno")
  return os.path.join(workdir, "latents", name)


def _sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


# ----------------------------------------------------------------------------- the encoder

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
  import jax
  import numpy as np
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    array = np.ascontiguousarray(jax.device_get(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def _checkpoint_signature(workdir: str) -> tuple:
  directory = os.path.join(workdir, "checkpoints")
  try:
    return tuple(sorted((e.name, e.stat().st_mtime_ns) for e in os.scandir(directory)))
  except OSError:
    return ()


_ENCODERS: "collections.OrderedDict[tuple, EncoderRun]" = collections.OrderedDict()


def load_encoder(workdir: str, step: Optional[int] = None) -> EncoderRun:
  """Restores the run (`common.restore_run`) and keeps its EMA encoder only. The last two are
  cached in this process, keyed by the workdir, the step and the checkpoint directory's
  listing (so a rerun of the same analysis does not restore and compile again)."""
  import jax
  from cardiac_jax import parallel
  if jax.process_count() > 1:
    raise ValueError("infer_latents runs in a single process (its partial store is not "
                     f"shared), but JAX sees {jax.process_count()} processes")
  key = (os.path.realpath(workdir), step, _checkpoint_signature(workdir))
  if key in _ENCODERS:
    _ENCODERS.move_to_end(key)
    return _ENCODERS[key]
  config = common.load_run_config(workdir)
  if config.model.family != "diffae3d":
    raise ValueError(f"{os.path.join(workdir, 'config.json')}: model.family is "
                     f"{config.model.family!r}; latents need a diffae3d run")
  config, family, state, mesh = common.restore_run(workdir, step)
  params = family.inference_params(state, ema=True)["encoder"]
  restored_step = int(jax.device_get(state.step))
  del state  # UNet, optimizer moments: not needed here.

  def encode(encoder_params, x):
    return family.apply_encoder(encoder_params, family.model_input({family.field: x}))

  encode_fn = jax.jit(encode, in_shardings=(parallel.replicated(mesh),
                                            parallel.data_sharded(mesh)),
                      out_shardings=parallel.data_sharded(mesh))
  run = EncoderRun(workdir=os.path.abspath(workdir), config=config, family=family, mesh=mesh,
                   params=params, step=restored_step,
                   identity={"workdir": os.path.realpath(workdir), "step": restored_step,
                             "step_selection": common.step_selection(step),
                             "encoder_sha256": encoder_digest(params)},
                   encode_fn=encode_fn)
  _ENCODERS[key] = run
  while len(_ENCODERS) > _ENCODER_CACHE_SIZE:
    _ENCODERS.popitem(last=False)
  return run


def _encode_rows(encoder: EncoderRun, x) -> Any:
  """(B, D) float32 codes of one (B, T, S, S, 1) host batch (B divisible by the devices)."""
  import jax
  import numpy as np
  from cardiac_jax import parallel
  array = jax.make_array_from_process_local_data(parallel.data_sharded(encoder.mesh),
                                                 np.asarray(x, np.float32))
  return np.asarray(jax.device_get(encoder.encode_fn(encoder.params, array)), np.float32)


def same_run(a: Optional[dict], b: dict) -> bool:
  """Whether two run identities are the same run: same checkpoint step and encoder weights."""
  return bool(a) and all(a.get(k) == b[k] for k in ("step", "encoder_sha256"))


def _describe_run(identity: dict) -> str:
  return (f"{identity.get('workdir')} at step {identity.get('step')} (encoder "
          f"{str(identity.get('encoder_sha256'))[:12]})")


# ----------------------------------------------------------------------------- data

def _training_preparation(config) -> Optional[dict]:
  """The preparation config (report.json "config") of the run's training data, if present."""
  from data_pipelines import cine, prepare
  try:
    directory = cine.prepared_cine_dir(config, create=False)
  except ValueError:
    return None
  report = common.read_json(os.path.join(directory, prepare.REPORT))
  return report.get("config") if report else None


def prepare_external_cohort(config, data_dir: str) -> str:
  """Prepares a raw cohort folder of the run's dataset kind with the run's preparation settings
  (module docstring) and returns the prepared directory."""
  from data_pipelines import cine
  data = config.data
  preparation = _training_preparation(config)
  if preparation and preparation.get("format") == "cine":
    kind = preparation["dataset"]
    cine_config = cine.CineConfig(**{**preparation["cine"],
                                     "intensity_percentiles":
                                         tuple(preparation["cine"]["intensity_percentiles"])})
    split_seed = int(preparation["split_seed"])
    fractions = tuple(float(f) for f in preparation["split_fractions"])
  else:
    kind = cine.data_field(data, "dataset")
    if kind not in cine.DATASETS:
      raise ValueError(
          f"{data_dir}: not a prepared cine dataset (no splits.json), and the layout of a raw "
          f"folder is unknown: the run's data.dataset is {kind!r} and its prepared data has no "
          "report.json naming the raw layout; prepare the folder with data_pipelines.cine "
          "first and pass the prepared directory")
    cine_config = cine.cine_config_from(data)
    split_seed = int(cine.data_field(data, "prepare.split_seed"))
    fractions = tuple(float(f) for f in cine.data_field(data, "split"))
  source = os.path.abspath(data_dir)
  name = cine.make_builder_config(kind, cine_config, split_seed, fractions).name
  digest = hashlib.sha1(source.encode()).hexdigest()[:10]
  root = cine.cache_root(data)
  out = os.path.join(root, kind, digest, "cine", name)
  _log(f"preparing the {kind} cohort {source} into {out} (resumable)")
  cine.prepare_cine_dataset(source, out, cine_config, dataset=kind, split_seed=split_seed,
                            split_fractions=fractions)
  return out


def resolve_data(config, data_dir: Optional[str] = None) -> str:
  """The prepared cine dataset to encode: the run's own (default) or --data_dir's (module
  docstring). FileNotFoundError when data_dir is not a directory."""
  from data_pipelines import cine, prepare
  if not data_dir:
    return cine.prepared_cine_dir(config)
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"--data_dir={data_dir} is not a directory")
  if os.path.exists(os.path.join(data_dir, prepare.SPLITS)):
    return os.path.abspath(data_dir)
  return prepare_external_cohort(config, data_dir)


def select_splits(directory: str, splits: Optional[Sequence[str]] = None) -> list[str]:
  """The splits to encode: `splits` (each must hold subjects), or every non-empty split."""
  from data_pipelines import prepare
  path = os.path.join(directory, prepare.SPLITS)
  assignment = common.read_json(path)
  if assignment is None:
    raise FileNotFoundError(f"{path} is missing or unreadable: {directory} is not a prepared "
                            "cine dataset")
  if not splits:
    chosen = [s for s in ALL_SPLITS if assignment.get(s)]
    if not chosen:
      raise ValueError(f"{path}: no split holds any subject")
    return chosen
  chosen = list(dict.fromkeys(splits))
  for split in chosen:
    if split not in ALL_SPLITS:
      raise ValueError(f"unknown split {split!r} (one of {', '.join(ALL_SPLITS)})")
    if not assignment.get(split):
      raise ValueError(f"{path}: split {split!r} holds no subjects")
  return chosen


def data_identity(directory: str, splits: Sequence[str], sizes: dict, family) -> dict:
  """What the codes were computed from (part of the partial store's manifest and the meta)."""
  from data_pipelines import prepare
  report = common.read_json(os.path.join(directory, prepare.REPORT)) or {}
  with open(os.path.join(directory, prepare.SPLITS), "rb") as f:
    splits_digest = hashlib.sha256(f.read()).hexdigest()
  preparation = json.dumps(report.get("config"), sort_keys=True)
  return {"directory": os.path.realpath(directory), "splits": list(splits),
          "num_examples": {s: int(sizes[s]) for s in splits},
          "splits_sha256": splits_digest,
          "preparation_sha256": hashlib.sha256(preparation.encode()).hexdigest(),
          "field": family.field, "num_frames": family.num_frames,
          "image_size": family.image_size}


class _Rows:
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


# ----------------------------------------------------------------------------- partial store

def _batch_path(store: str, k: int) -> str:
  return os.path.join(store, f"batch_{k:06d}.npz")


def _read_batch(path: str, rows: int, dim: int):
  """(subjects, splits, z) of a finished batch, or None when absent, unreadable or not of the
  expected shape (then it is computed again)."""
  import numpy as np
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


def _write_batch(path: str, subjects, splits, z) -> None:
  import numpy as np
  temporary = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
  with open(temporary, "wb") as f:
    np.savez(f, subjects=np.asarray(subjects, dtype=str), splits=np.asarray(splits, dtype=str),
             z=np.asarray(z, np.float32))
  os.replace(temporary, path)


def open_store(store: str, manifest: dict) -> None:
  """Creates the partial store with its manifest (staged, then renamed, so a store always has
  one), or checks that an existing one belongs to the same run and data."""
  path = os.path.join(store, MANIFEST)
  if os.path.isdir(store):
    existing = common.read_json(path)
    if existing is None or existing.get("kind") != STORE_KIND:
      raise FileExistsError(f"{store} exists but has no readable {MANIFEST}: not a partial "
                            "store of infer_latents; move it away or choose another --output")
    if not same_run(existing.get("run"), manifest["run"]):
      raise FileExistsError(
          f"{store} holds the unfinished latents of another run, "
          f"{_describe_run(existing.get('run') or {})}, not of "
          f"{_describe_run(manifest['run'])}; delete it or choose another --output")
    different = [k for k in ("data", "batch_size", "z_dim", "version")
                 if existing.get(k) != manifest[k]]
    if different:
      detail = "; ".join(f"{k}: stored {existing.get(k)!r}, now {manifest[k]!r}"
                         for k in different)
      raise FileExistsError(f"{store} holds unfinished latents of this run computed with other "
                            f"settings ({detail}); rerun with those settings to finish it, or "
                            "delete it")
    return
  if os.path.exists(store):
    raise FileExistsError(f"{store} exists and is not a directory")
  staging = f"{store}.{uuid.uuid4().hex[:8]}.tmp"
  os.makedirs(staging)
  try:
    with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as f:
      json.dump(manifest, f, indent=2)
    os.rename(staging, store)
  finally:
    if os.path.exists(staging):
      shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------- computing

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


def make_plan(encoder: EncoderRun, data_dir: Optional[str] = None,
              splits: Optional[Sequence[str]] = None) -> Plan:
  from data_pipelines import prepare
  directory = resolve_data(encoder.config, data_dir)
  chosen = select_splits(directory, splits)
  sources = {split: prepare.load_split(directory, split) for split in chosen}
  sizes = {split: len(source) for split, source in sources.items()}
  return Plan(directory=directory, splits=chosen, sources=sources, sizes=sizes,
              data=data_identity(directory, chosen, sizes, encoder.family))


def encode_plan(encoder: EncoderRun, plan: Plan, batch_size: int,
                store: Optional[str] = None, progress: bool = False,
                log: Callable[[str], None] = _log) -> tuple[list[str], list[str], Any]:
  """(subjects, splits, z (N, D) float32) of every row of `plan`, in order. With `store` (a
  partial-store directory, opened by the caller) each batch is written there as soon as it
  is computed and batches already there are not computed again."""
  import numpy as np
  from data_pipelines import cine
  from cardiac_jax import parallel
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  parallel.check_batch_size(batch_size, encoder.mesh)
  rows = plan.rows
  total, dim = len(rows), encoder.family.z_sem_dim
  num_batches = -(-total // batch_size)
  sizes = [min(batch_size, total - k * batch_size) for k in range(num_batches)]
  done: dict[int, tuple] = {}
  if store is not None:
    for k in range(num_batches):
      finished = _read_batch(_batch_path(store, k), sizes[k], dim)
      if finished is not None:
        done[k] = finished
  missing = [k for k in range(num_batches) if k not in done]
  if done:
    log(f"resuming: {len(done)} of {num_batches} batches were finished, computing "
        f"{len(missing)}")
  bar = None
  if progress:
    from tqdm import auto as tqdm
    bar = tqdm.tqdm(total=num_batches, initial=len(done), desc="latents", unit="batch",
                    dynamic_ncols=True)
  batches = None
  try:
    if missing:
      # Only the rows of missing batches are loaded; every missing batch but the last of the
      # pass is full, so the view's batches are exactly the missing ones.
      subset = _Rows(plan.sources, [rows[i] for k in missing
                                    for i in range(k * batch_size, k * batch_size + sizes[k])])
      batches = cine.eval_batches(subset, encoder.config.data, batch_size=batch_size,
                                  fields=encoder.family.batch_fields)
      for k, batch in zip(missing, batches):
        mask = np.asarray(batch["mask"], bool)
        z = _encode_rows(encoder, batch[encoder.family.field])[mask]
        subjects = [str(s) for s in np.asarray(batch["subject"])[mask]]
        splits = [rows[i][0] for i in range(k * batch_size, k * batch_size + sizes[k])]
        if len(subjects) != sizes[k]:
          raise RuntimeError(f"batch {k} has {len(subjects)} subjects, expected {sizes[k]}")
        if store is not None:
          _write_batch(_batch_path(store, k), subjects, splits, z)
        done[k] = (subjects, splits, z)
        if bar is not None:
          bar.update(1)
  finally:
    # Stop the input pipeline's threads now (an interrupted pass leaves the generator open).
    if batches is not None:
      batches.close()
    if bar is not None:
      bar.close()
  subjects = [s for k in range(num_batches) for s in done[k][0]]
  splits = [s for k in range(num_batches) for s in done[k][1]]
  z = (np.concatenate([done[k][2] for k in range(num_batches)]) if num_batches
       else np.zeros((0, dim), np.float32))
  if len(set(subjects)) != len(subjects):
    raise RuntimeError(f"duplicate subjects in the computed latents"
                       f"{f' (partial store {store})' if store else ''}; delete the store and "
                       "rerun")
  return subjects, splits, z


def compute_latents(workdir: str, *, data_dir: Optional[str] = None,
                    splits: Optional[Sequence[str]] = None, batch_size: Optional[int] = None,
                    step: Optional[int] = None, progress: bool = False
                    ) -> tuple[list[str], list[str], Any]:
  """(subjects, splits, z (N, D) float32): the EMA z_sem of every subject of the run's data
  (or data_dir's; module docstring), in memory, without files."""
  encoder = load_encoder(workdir, step)
  plan = make_plan(encoder, data_dir, splits)
  return encode_plan(encoder, plan, batch_size or int(encoder.config.train.eval_batch_size),
                     progress=progress)


# ----------------------------------------------------------------------------- the program

def _output_is_ours(output: str, identity: dict) -> tuple[bool, Optional[dict]]:
  """(same run, meta) of an existing output: its meta file must match its bytes."""
  meta = common.read_json(output + META_SUFFIX)
  if meta is None or meta.get("sha256") != _sha256_file(output):
    return False, None
  return same_run(meta.get("run"), identity), meta


def run(workdir: str, output: Optional[str] = None, *, fmt: str = "csv",
        inverse_normal: bool = False, data_dir: Optional[str] = None,
        splits: Optional[Sequence[str]] = None, batch_size: Optional[int] = None,
        step: Optional[int] = None, overwrite: bool = False, progress: bool = True,
        log: Callable[[str], None] = _log) -> dict:
  """Computes (resumably) and writes the latents file; returns its meta (module docstring)."""
  import numpy as np
  from cardiac_jax import phenotypes
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r} (one of {FORMATS})")
  output = os.path.abspath(output or default_latents_path(workdir, fmt, inverse_normal))
  store = output + PARTIAL_SUFFIX
  encoder = load_encoder(workdir, step)
  plan = make_plan(encoder, data_dir, splits)
  batch_size = batch_size or int(encoder.config.train.eval_batch_size)
  options = {"format": fmt, "inverse_normal": bool(inverse_normal)}
  manifest = {"kind": STORE_KIND, "version": STORE_VERSION, "run": encoder.identity,
              "data": plan.data, "batch_size": int(batch_size),
              "z_dim": encoder.family.z_sem_dim, "output": output}
  if os.path.exists(output):
    ours, meta = _output_is_ours(output, encoder.identity)
    if ours and meta.get("data") == plan.data and meta.get("options") == options:
      log(f"{output} is up to date (same run, data and options)")
      return meta
    store_manifest = common.read_json(os.path.join(store, MANIFEST))
    resuming = store_manifest is not None and same_run(store_manifest.get("run"),
                                                       encoder.identity)
    if not (ours or resuming or overwrite):
      origin = (f"another run, {_describe_run(meta['run'])}" if meta else
                f"an unknown origin (no {os.path.basename(output)}{META_SUFFIX} matching it)")
      raise FileExistsError(f"{output} exists and holds the latents of {origin}, not of "
                            f"{_describe_run(encoder.identity)}; pass --overwrite or choose "
                            "another --output")
  os.makedirs(os.path.dirname(output), exist_ok=True)
  open_store(store, manifest)
  log(f"encoding {sum(plan.sizes.values())} subjects ({', '.join(plan.splits)}) of "
      f"{plan.directory} with {_describe_run(encoder.identity)}")
  subjects, row_splits, z = encode_plan(encoder, plan, batch_size, store, progress, log)
  values = phenotypes.inverse_normal_transform(z) if inverse_normal else z
  if fmt == "csv":
    phenotypes.write_latents_csv(output, subjects, row_splits, values)
  else:
    phenotypes.write_plink_phenotypes(output, subjects, values)
  meta = {"run": encoder.identity, "data": plan.data, "options": options,
          "num_subjects": len(subjects), "z_dim": int(np.shape(z)[1]),
          "batch_size": int(batch_size), "sha256": _sha256_file(output),
          "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
  common.write_json(output + META_SUFFIX, meta)
  shutil.rmtree(store, ignore_errors=True)
  log(f"wrote {len(subjects)} subjects x {meta['z_dim']} latents to {output}")
  return meta


def load_or_compute(workdir: str, path: Optional[str] = None, *, refresh: bool = False,
                    log: Callable[[str], None] = _log, **kwargs):
  """The latents of a run as a `phenotypes.LatentsTable` (its `path` set): those of `path`
  when given, read as they are (a latents CSV or PLINK file, `phenotypes.read_latents`); else
  those of default_latents_path(workdir), computed there first by `run` when the file is
  missing, and with `refresh` also checked against the run (`run` with overwrite: the run's
  own folder, where latents of an earlier run at this path, or of other data or options, are
  stale and recomputed; up-to-date ones cost a restore of the encoder only). kwargs go to
  `run` (step, batch_size, data_dir, splits, progress: default False)."""
  from cardiac_jax import phenotypes
  if path:
    return phenotypes.read_latents(path)
  path = default_latents_path(workdir)
  missing = not os.path.exists(path)
  if missing or refresh:
    if missing:
      log(f"{path} is missing: encoding the run's subjects first")
    run(workdir, path, log=log, **{"overwrite": True, "progress": False, **kwargs})
  return phenotypes.read_latents(path)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
  f = flag_values
  common.start_command(argv, quiet=f is flags.FLAGS, workdir=f.workdir)
  run(f.workdir, f.output, fmt=f.format, inverse_normal=f.inverse_normal, data_dir=f.data_dir,
      splits=f.splits, batch_size=f.batch_size, step=f.step, overwrite=f.overwrite,
      progress=f.progress)


if __name__ == "__main__":
  define_flags()
  app.run(main)
