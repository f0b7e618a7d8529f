"""Semantic codes of a DiffAE run, one per subject: `python -m experiments.infer_latents`.

  python -m experiments.infer_latents --workdir=DIR [--data_dir=FOLDER] [--splits=train,val,test]
      [--output=FILE] [--format=csv|plink] [--inverse_normal] [--batch_size=B] [--step=N]
      [--overwrite] [--num_processes=N --process_id=I] [--merge_timeout=S]

z_sem = Enc_EMA(x_0) for every subject (Ometto et al. 2024's latents: the EMA encoder,
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
there).

Several processes (hosts, GPUs): launched like a multi-process training run (--num_processes and
--process_id, the CARDIAC_JAX_NUM_PROCESSES / CARDIAC_JAX_PROCESS_ID variables, or a SLURM step
with several tasks; `cardiac_jax.distributed.process_slot`), the processes split the batches by
subject order, each writes its own resumable part OUTPUT.partial/part_<i>_of_<n>/, and process 0
waits for every part (at most --merge_timeout seconds), then writes the same file a
one-process run writes (`latent_store.write_latents_part`). They share files only, not a JAX
runtime: each encodes on its own devices, and the output's folder must be on a file system
every process sees. A killed process is rerun with the same launch and computes only its
missing batches.

The encoder, the partial store and the output checks are `cardiac_jax.latent_store`; this
command restores the run and resolves the data. Functions for analyses:
`compute_latents(workdir, ...)` -> (subjects, splits, z (N, D) float32),
`run(workdir, output, ...)` (the program), `default_latents_path(workdir)` =
DIR/latents/latents.csv, and `load_or_compute(workdir, path=None, ...)` -> LatentsTable: the
latents file of the analyses (probe, reproducibility, associate, manipulate), computed into the
default path when missing.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

from absl import app, flags

from cardiac_jax import latent_store
from cardiac_jax.latent_store import EncoderRun, Plan
from cardiac_jax import io
from data_pipelines import errors as data_errors
from experiments import common

FORMATS = latent_store.FORMATS
ALL_SPLITS = ("train", "val", "test")
_ENCODER_CACHE_SIZE = 2


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command-line flags; defined only when run as a program (a test passes its own
  FlagValues)."""
  fv = {"flag_values": flag_values}
  common.define_workdir_flag("diffae3d run directory.", flag_values)
  flags.DEFINE_string("data_dir", None, "Another cohort: a prepared cine dataset (has "
                      "splits.json) or a raw folder of the run's dataset kind (default: the "
                      "run's own prepared dataset).", **fv)
  common.define_splits_flag("Splits to encode (default: every non-empty split).",
                            flag_values=flag_values)
  flags.DEFINE_string("output", None, "Output file (default: DIR/latents/latents[_int].csv, "
                      "or .pheno for --format=plink).", **fv)
  flags.DEFINE_enum("format", "csv", list(FORMATS), "csv: subject,split,z0..; plink: "
                    "FID IID z0.. phenotype file for PLINK / REGENIE.", **fv)
  flags.DEFINE_bool("inverse_normal", False, "Rank-based inverse-normal transform of every "
                    "latent (Blom) before writing.", **fv)
  flags.DEFINE_integer("batch_size", None, "Subjects per batch (default: the run's "
                       "train.eval_batch_size).", lower_bound=1, **fv)
  common.define_step_flag(flag_values=flag_values)
  flags.DEFINE_bool("overwrite", False, "Replace an existing output of another run.", **fv)
  flags.DEFINE_integer("num_processes", None, "Several processes: how many share the subjects "
                       "(default: CARDIAC_JAX_NUM_PROCESSES, SLURM_NTASKS, else 1).", **fv)
  flags.DEFINE_integer("process_id", None, "Several processes: this one's index in "
                       "[0, num_processes) (default: CARDIAC_JAX_PROCESS_ID, SLURM_PROCID).",
                       **fv)
  flags.DEFINE_float("merge_timeout", 86400.0, "Several processes: seconds process 0 waits for "
                     "the other parts before giving up (a rerun finishes the pass).", **fv)
  flags.DEFINE_bool("progress", True, "Show a progress bar.", **fv)
  flags.adopt_module_key_flags(common, flag_values)  # --help lists --workdir, --step, --splits.


def _log(message: str) -> None:
  print(f"[infer_latents {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def default_latents_path(workdir: str, fmt: str = "csv", inverse_normal: bool = False) -> str:
  """DIR/latents/latents.csv (raw codes as CSV; _int for the transformed codes, .pheno for the
  PLINK format)."""
  if fmt not in FORMATS:
    raise ValueError(f"unknown latents format {fmt!r} (one of {FORMATS})")
  name = "latents" + ("_int" if inverse_normal else "") + (".csv" if fmt == "csv" else ".pheno")
  return os.path.join(workdir, "latents", name)


def _checkpoint_signature(workdir: str) -> tuple:
  directory = os.path.join(workdir, "checkpoints")
  try:
    return tuple(sorted((e.name, e.stat().st_mtime_ns) for e in os.scandir(directory)))
  except OSError:
    return ()


_ENCODERS: "collections.OrderedDict[tuple, EncoderRun]" = collections.OrderedDict()


def load_encoder(workdir: str, step: Optional[int] = None) -> EncoderRun:
  """Restores the run (`common.restore_run`) and keeps its EMA encoder only
  (`latent_store.encoder_run`). The last two are cached in this process, keyed by the workdir,
  the step and the checkpoint directory's listing (so a rerun of the same analysis does not
  restore and compile again)."""
  import jax
  if jax.process_count() > 1:
    raise ValueError("infer_latents runs in a single process (its partial store is not "
                     f"shared), but JAX sees {jax.process_count()} processes")
  key = (os.path.realpath(workdir), step, _checkpoint_signature(workdir))
  if key in _ENCODERS:
    _ENCODERS.move_to_end(key)
    return _ENCODERS[key]
  require_encoder_run(workdir)
  config, family, state, mesh = common.restore_run(workdir, step)
  run = latent_store.encoder_run(workdir, config, family, state, mesh,
                                 common.step_selection(step))
  del state  # UNet, optimizer moments: not needed here.
  _ENCODERS[key] = run
  while len(_ENCODERS) > _ENCODER_CACHE_SIZE:
    _ENCODERS.popitem(last=False)
  return run


def eval_batches(encoder: EncoderRun) -> Callable:
  """(source, batch_size) -> the run's evaluation batches of a cine source
  (`data_pipelines.cine.eval_batches`, only the fields the encoder reads)."""
  from data_pipelines import cine

  def make_batches(source, batch_size: int):
    return cine.eval_batches(source, encoder.config.data, batch_size=batch_size,
                             fields=encoder.family.batch_fields)

  return make_batches


# ----------------------------------------------------------------------------- data

def _training_preparation(config) -> Optional[dict]:
  """The preparation config (report.json "config") of the run's training data, if present."""
  from data_pipelines import cine, prepare
  try:
    directory = cine.prepared_cine_dir(config, create=False)
  except ValueError:
    return None
  report = io.read_json(os.path.join(directory, prepare.REPORT))
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
  check_data_dir(data_dir)
  if os.path.exists(os.path.join(data_dir, prepare.SPLITS)):
    return os.path.abspath(data_dir)
  return prepare_external_cohort(config, data_dir)


def check_data_dir(data_dir: Optional[str]) -> None:
  """FileNotFoundError when --data_dir is not a directory; InvalidArgumentError when it is a
  prepared dataset of another format (a slice dataset: it used to fail with a traceback from
  the batch reader after the run was restored)."""
  from data_pipelines import prepare
  if not data_dir:
    return
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"--data_dir={data_dir} is not a directory")
  if os.path.exists(os.path.join(data_dir, prepare.SPLITS)):
    report = io.read_json(os.path.join(data_dir, prepare.REPORT)) or {}
    preparation = report.get("config") or {}
    if preparation.get("format") != "cine" and "preprocess" in preparation:  # Slices' fields.
      raise data_errors.InvalidArgumentError(
          f"--data_dir={data_dir} is a prepared slice dataset, not a prepared cine dataset: "
          "pass a cine dataset (data_pipelines.cine) or the raw cohort folder")


def select_splits(directory: str, splits: Optional[Sequence[str]] = None) -> list[str]:
  """The splits to encode: `splits` (each must hold subjects), or every non-empty split."""
  from data_pipelines import prepare
  path = os.path.join(directory, prepare.SPLITS)
  assignment = io.read_json(path)
  if assignment is None:
    raise FileNotFoundError(f"{path} is missing or unreadable: {directory} is not a prepared "
                            "cine dataset")
  if not splits:
    chosen = [s for s in ALL_SPLITS if assignment.get(s)]
    if not chosen:
      raise ValueError(f"{path}: no split holds any subject")
    return chosen
  chosen = list(dict.fromkeys(splits))
  check_split_names(chosen)
  for split in chosen:
    if not assignment.get(split):
      raise ValueError(f"{path}: split {split!r} holds no subjects")
  return chosen


def check_split_names(splits: Optional[Sequence[str]]) -> None:
  """InvalidArgumentError naming a --splits entry that is no split (before the run is
  restored: it used to be a traceback after the restore)."""
  unknown = [s for s in splits or () if s not in ALL_SPLITS]
  if unknown:
    raise data_errors.InvalidArgumentError(
        f"--splits: unknown split{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}"
        f" (one of {', '.join(ALL_SPLITS)})")


def check_arguments(output: str, *, data_dir: Optional[str] = None,
                    splits: Optional[Sequence[str]] = None,
                    batch_size: Optional[int] = None, num_processes: int = 1,
                    merge_timeout_s: float = 86400.0) -> None:
  """InvalidArgumentError naming the first argument of `run` that cannot be used: checked
  before the run is restored or a subject encoded. (A batch size of 0 used to fall back to the
  run's silently; an output under a file or naming a folder ended in a raw OSError.)"""
  common.check_output_file(output, "output")
  check_split_names(splits)
  check_data_dir(data_dir)
  if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
    raise data_errors.InvalidArgumentError(f"--batch_size={batch_size}: must be >= 1")
  if num_processes > 1 and not (merge_timeout_s > 0 and merge_timeout_s != float("inf")):
    raise data_errors.InvalidArgumentError(
        f"--merge_timeout={merge_timeout_s}: must be a finite number of seconds > 0")


def data_identity(directory: str, splits: Sequence[str], sizes: dict, family) -> dict:
  """What the codes were computed from (part of the partial store's manifest and the meta)."""
  from data_pipelines import prepare
  report = io.read_json(os.path.join(directory, prepare.REPORT)) or {}
  with open(os.path.join(directory, prepare.SPLITS), "rb") as f:
    splits_digest = hashlib.sha256(f.read()).hexdigest()
  preparation = json.dumps(report.get("config"), sort_keys=True)
  return {"directory": os.path.realpath(directory), "splits": list(splits),
          "num_examples": {s: int(sizes[s]) for s in splits},
          "splits_sha256": splits_digest,
          "preparation_sha256": hashlib.sha256(preparation.encode()).hexdigest(),
          "field": family.field, "num_frames": family.num_frames,
          "image_size": family.image_size}


# ----------------------------------------------------------------------------- computing

def make_plan(encoder: EncoderRun, data_dir: Optional[str] = None,
              splits: Optional[Sequence[str]] = None) -> Plan:
  from data_pipelines import prepare
  directory = resolve_data(encoder.config, data_dir)
  chosen = select_splits(directory, splits)
  sources = {split: prepare.load_split(directory, split) for split in chosen}
  sizes = {split: len(source) for split, source in sources.items()}
  return Plan(directory=directory, splits=chosen, sources=sources, sizes=sizes,
              data=data_identity(directory, chosen, sizes, encoder.family))


def compute_latents(workdir: str, *, data_dir: Optional[str] = None,
                    splits: Optional[Sequence[str]] = None, batch_size: Optional[int] = None,
                    step: Optional[int] = None, progress: bool = False
                    ) -> tuple[list[str], list[str], Any]:
  """(subjects, splits, z (N, D) float32): the EMA z_sem of every subject of the run's data
  (or data_dir's; module docstring), in memory, without files."""
  encoder = load_encoder(workdir, step)
  plan = make_plan(encoder, data_dir, splits)
  return latent_store.encode_plan(
      encoder, plan, batch_size or int(encoder.config.train.eval_batch_size),
      progress=progress, make_batches=eval_batches(encoder))


# ----------------------------------------------------------------------------- the program

def run(workdir: str, output: Optional[str] = None, *, fmt: str = "csv",
        inverse_normal: bool = False, data_dir: Optional[str] = None,
        splits: Optional[Sequence[str]] = None, batch_size: Optional[int] = None,
        step: Optional[int] = None, overwrite: bool = False, progress: bool = True,
        log: Callable[[str], None] = _log, process_id: int = 0, num_processes: int = 1,
        merge_timeout_s: float = 86400.0) -> Optional[dict]:
  """Computes (resumably) and writes the latents file; returns its meta (module docstring,
  `latent_store.write_latents`). With `num_processes` > 1 this is process `process_id`'s
  share (`latent_store.write_latents_part`): the meta on process 0, None on the others."""
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r} (one of {FORMATS})")
  output = os.path.abspath(output or default_latents_path(workdir, fmt, inverse_normal))
  check_arguments(output, data_dir=data_dir, splits=splits, batch_size=batch_size,
                  num_processes=num_processes, merge_timeout_s=merge_timeout_s)
  encoder = load_encoder(workdir, step)
  plan = make_plan(encoder, data_dir, splits)
  options = dict(make_batches=eval_batches(encoder), fmt=fmt, inverse_normal=inverse_normal,
                 batch_size=batch_size, overwrite=overwrite, progress=progress, log=log)
  if num_processes > 1:
    return latent_store.write_latents_part(encoder, plan, output, process_id=process_id,
                                           num_processes=num_processes,
                                           merge_timeout_s=merge_timeout_s, **options)
  return latent_store.write_latents(encoder, plan, output, **options)


def require_encoder_run(workdir: str) -> None:
  """FamilyCapabilityError (one line) unless the run's family can encode subjects (`invert`)."""
  from cardiac_jax import families
  families.require(common.load_run_config(workdir).model.family, "invert",
                   "latent inference (semantic codes of a diffusion autoencoder)",
                   os.path.join(workdir, "config.json"))


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
    require_encoder_run(workdir)  # A run of another family is refused before any message.
    if missing:
      log(f"{path} is missing: encoding the run's subjects first")
    run(workdir, path, log=log, **{"overwrite": True, "progress": False, **kwargs})
  return phenotypes.read_latents(path)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
  f = flag_values
  common.start_command(argv, quiet=f is flags.FLAGS, workdir=f.workdir)
  from cardiac_jax import distributed
  try:
    process_id, num_processes = distributed.process_slot(f.num_processes, f.process_id)
  except ValueError as e:  # One line naming the flags (or the variables they came from).
    raise data_errors.InvalidArgumentError(f"--num_processes/--process_id: {e}") from None
  run(f.workdir, f.output, fmt=f.format, inverse_normal=f.inverse_normal, data_dir=f.data_dir,
      splits=f.splits, batch_size=f.batch_size, step=f.step, overwrite=f.overwrite,
      progress=f.progress, process_id=process_id, num_processes=num_processes,
      merge_timeout_s=f.merge_timeout)


if __name__ == "__main__":
  define_flags()
  app.run(main)
