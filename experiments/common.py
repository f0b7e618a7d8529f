"""Glue shared by the experiment entry points: where data lives, and how a config's data becomes
the iterators the training loop consumes.

Data resolution (config.data.dataset):
- "synthetic": the synthetic cine cohort (data_pipelines.synthetic) of
  data.synthetic.num_subjects subjects and seed data.synthetic.seed is generated once into
  <cache>/synthetic/n<N>_seed<S>/raw, then prepared into .../prepared/<preparation key>.
- "acdc": data.source_dir (ACDC layout) is prepared into <cache>/acdc/<hash of path>/<key>.
- "prepared": data.prepared_dir is used as it is.
Both generation and preparation skip work already done, so every run after the first starts at
once; the first announces each phase in one line (what, where, how many subjects). <cache> is data.cache_dir, else $CARDIAC_JAX_CACHE, else ~/.cache/cardiac_jax.
"""

from __future__ import annotations

import csv
import os
import sys

from cardiac_jax import runtime

# Before TensorFlow is first imported: the modules of some commands import it before main().
if not runtime.verbose_requested():
  runtime.quiet_tensorflow_environment()

import jax  # pylint: disable=g-import-not-at-top
from absl import flags, logging

from cardiac_jax import (checkpointing, config_checks, families, latent_store,
                         metric_logging, phenotypes, run_config)
from cardiac_jax import workdir as workdir_lib
from cardiac_jax.training import DataSource
from data_pipelines import errors as data_errors

# Errors whose message says what is wrong and how to fix it: a command prints the message as
# one line instead of a traceback (`start_command`).
USER_ERRORS = (FileNotFoundError, NotADirectoryError, config_checks.ConfigError,
               checkpointing.CheckpointMismatchError, checkpointing.CorruptCheckpointError,
               run_config.WorkdirConflictError, workdir_lib.WorkdirError,
               workdir_lib.WorkdirLockedError, metric_logging.MetricsFileError,
               data_errors.InvalidInputError, data_errors.InvalidArgumentError,
               families.FamilyCapabilityError, phenotypes.LatentsFileError,
               latent_store.LatentStoreConflictError)


def _report_user_errors(previous_hook):
  """A sys.excepthook printing USER_ERRORS as `error: <message>` (tracebacks with -v)."""
  def hook(kind, value, traceback):
    if issubclass(kind, USER_ERRORS) and not flags.FLAGS["verbosity"].present:
      print(f"error: {value}", file=sys.stderr)
    else:
      previous_hook(kind, value, traceback)
  hook.reports_user_errors = True
  return hook


def verbose() -> bool:
  """Whether this command keeps every library's logs: --verbosity (-v) was given or
  CARDIAC_JAX_VERBOSE=1 (`cardiac_jax.runtime.verbose_requested`)."""
  return runtime.verbose_requested(flags.FLAGS["verbosity"].present)


def quiet_logs() -> None:
  """INFO logs of orbax/TensorFlow and the notices, config dumps and progress bars of
  TensorFlow and tensorflow-datasets drown a command's own lines and its progress bar: absl
  shows warnings and the libraries are silenced (`runtime.quiet_library_logs`), unless
  `verbose()`."""
  if not verbose():
    logging.set_verbosity(logging.WARNING)
    runtime.quiet_library_logs()


def start_command(argv, quiet: bool = True, **required) -> None:
  """The start of every command's main(): the XLA:CPU setting applied before JAX computes
  anything (`cardiac_jax.runtime.configure_xla_cpu`), no positional arguments, every flag named
  in `required` (name=value) set, and quiet logs (`quiet_logs`; off for in-process calls with
  their own flag values). Raises absl's UsageError otherwise."""
  from absl import app  # pylint: disable=g-import-not-at-top
  runtime.configure_xla_cpu()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for name, value in required.items():
    if value is None or isinstance(value, str) and not value:
      available = ""
      if name == "config":
        from experiments import configs  # pylint: disable=g-import-not-at-top
        available = f"; available: {', '.join(configs.available_configs())}"
      raise app.UsageError(f"--{name} is required{available}")
  if quiet:
    quiet_logs()
    if not getattr(sys.excepthook, "reports_user_errors", False):
      sys.excepthook = _report_user_errors(sys.excepthook)


def check_output_file(path: str, flag: str) -> None:
  """InvalidArgumentError when a flag naming an output file names a folder or lies under a
  file: refused before any work instead of a raw OSError when the file is written."""
  if os.path.isdir(path):
    raise data_errors.InvalidArgumentError(f"--{flag}={path} is a folder: name a file")
  parent = os.path.dirname(os.path.abspath(path))
  while parent and not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if parent and not os.path.isdir(parent):
    raise data_errors.InvalidArgumentError(f"--{flag}={path} lies under {parent}, which is a "
                                           "file")


def cache_root(config) -> str:
  """The config's data cache (`data_pipelines.cache.cache_root`); InvalidArgumentError naming
  where it came from (data.cache_dir or $CARDIAC_JAX_CACHE) when it is a file or lies under
  one, before anything is generated into it."""
  from data_pipelines import cache
  root = cache.cache_root(config.data.get("cache_dir"))
  where = (f"data.cache_dir={config.data.cache_dir}" if config.data.get("cache_dir") else
           f"${cache.CACHE_ENV}={os.environ[cache.CACHE_ENV]}"
           if os.environ.get(cache.CACHE_ENV) else f"the default data cache {root}")
  try:
    workdir_lib.check_path(root, "cache", "folder")
  except workdir_lib.WorkdirError as e:
    problem = str(e).split(": name a", 1)[0].split(" ", 1)[1]  # "is a file, not a folder", ...
    raise data_errors.InvalidArgumentError(
        f"{where} {problem}: the data cache must be a folder (set it to one)") from None
  return root


def _preprocess_config(config):
  from data_pipelines import preprocess
  p = config.data.prepare
  return preprocess.PreprocessConfig(image_size=p.image_size, spacing_mm=p.spacing_mm,
                                     slice_rule=p.slice_rule)


def prepared_dir(config, *, create: bool = True) -> str:
  """The prepared dataset of `config`, generating and preparing it first if needed (where:
  `data_pipelines.cache.prepared_slice_dir`)."""
  from data_pipelines import cache
  out = cache.prepared_slice_dir(config.data)
  dataset = config.data.dataset
  if dataset == "prepared" or not create:
    return out
  from data_pipelines import prepare
  if dataset == "synthetic":
    from data_pipelines import synthetic
    s = config.data.synthetic
    raw = cache.synthetic_raw_dir(cache_root(config), s.num_subjects, s.seed)
    # Announces the subjects it has to write, with a bar of them.
    synthetic.synthesize_cohort(raw, s.num_subjects, s.seed,
                                num_workers=min(os.cpu_count() or 1, 8))
    source = raw
  else:
    source = os.path.abspath(config.data.source_dir)
  if not prepare.is_prepared(out):
    p = config.data.prepare
    print(f"Preparing the {p.slice_rule} slices of {source} ({p.image_size} px at "
          f"{p.spacing_mm} mm) into {out} (once; later runs reuse it) ...", flush=True)
  from data_pipelines import plausibility
  prepare.prepare_dataset(source, out, _preprocess_config(config), dataset="acdc",
                          label_convention=config.data.prepare.label_convention,
                          split_seed=config.data.prepare.split_seed,
                          bounds=plausibility.bounds_of(config.data.prepare))
  return out


def split_source(config, split: str, directory: str | None = None):
  """Random-access source of one split of the config's prepared dataset (in `directory` if
  given, else wherever `prepared_dir(config)` puts it, preparing it first if needed)."""
  from data_pipelines import prepare
  return prepare.load_split(directory or prepared_dir(config), split)


def make_data_source(config, eval_split: str = "val") -> DataSource:
  """Training and evaluation iterators of this process for the training loop (cine configs,
  data.format == "cine", are served by data_pipelines.cine)."""
  runtime.quiet_tensorflow_datasets()
  if config.data.dataset != "prepared":
    cache_root(config)  # A cache that cannot be written is named before any data is made.
  if config.data.get("format", "slices") == "cine":
    from cardiac_jax import families
    from data_pipelines import cine
    # Only the cine fields the model reads are copied and augmented.
    return cine.make_data_source(config, fields=families.make_family(config).batch_fields)
  from data_pipelines import pipeline
  directory = prepared_dir(config)
  train = split_source(config, "train", directory)
  val = split_source(config, eval_split, directory)
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())

  def train_batches(start_step: int):
    return pipeline.train_batches(train, config.data, global_batch_size=config.train.batch_size,
                                  seed=config.seed, start_step=start_step, **process)

  def eval_batches():
    return pipeline.eval_batches(val, config.data, batch_size=config.train.eval_batch_size,
                                 **process)

  return DataSource(train_batches=train_batches, eval_batches=eval_batches)


def split_batches(config, family, split: str):
  """(batch_size or None for train.eval_batch_size) -> evaluation batches of one split of the
  config's prepared data, every example once (`base.SplitBatches`), for slice or cine data."""
  from data_pipelines import prepare
  if config.data.get("format", "slices") == "cine":
    from data_pipelines import cine
    source = prepare.load_split(cine.prepared_cine_dir(config, create=False), split)
    return lambda batch_size=None: cine.eval_batches(
        source, config.data, batch_size=batch_size or config.train.eval_batch_size,
        fields=family.batch_fields)
  from data_pipelines import pipeline
  source = split_source(config, split)
  return lambda batch_size=None: pipeline.eval_batches(
      source, config.data, batch_size=batch_size or config.train.eval_batch_size)


def load_run_config(workdir: str):
  """The resolved config a run was trained with (workdir/config.json); ConfigError naming the
  file when it is damaged."""
  import ml_collections
  workdir_lib.check_path(workdir)
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir} is not a training run directory")
  fix = ("Delete it and rerun the run's training command (it re-creates config.json from the "
         "config recorded with the checkpoints), or restore it from a copy.")
  if not os.path.isfile(path):
    raise config_checks.ConfigError(f"{path} is not a file. {fix}")
  try:
    config = ml_collections.ConfigDict(run_config.read_config_file(path))
  except ValueError as e:
    raise config_checks.ConfigError(f"{path} is damaged: {e}. {fix}") from None
  try:  # An edited value would otherwise fail deep inside the model or the data pipeline.
    config_checks.validate(config)
  except config_checks.ConfigError as e:
    raise config_checks.ConfigError(f"{path} holds a value no run can have: {e}. {fix}") from None
  return config


STEP_CHOICES = ("latest", "best")


def parse_step(value, workdir: str = "") -> int | str | None:
  """A --step value: None or "latest" -> None (the latest checkpoint), "best" -> "best" (the
  best validation checkpoint, train.best_metric), an integer (or its text) -> that step.
  InvalidArgumentError (a one-line user error) naming the workdir otherwise."""
  if value is None or isinstance(value, int) and not isinstance(value, bool):
    step = value
  else:
    text = str(value).strip().lower()
    if text in STEP_CHOICES:
      return None if text == "latest" else text
    try:
      step = int(text)
    except ValueError:
      step = -1
  if step is not None and step < 0:
    raise data_errors.InvalidArgumentError(
        f"--step={value!r}{f' for {workdir}' if workdir else ''}: expected a checkpoint step "
        "(an integer >= 0), 'best' or 'latest'")
  return step


def step_selection(value) -> str:
  """How a --step value chose the checkpoint, for outputs beside the restored integer step:
  "latest", "best" or "explicit"."""
  step = parse_step(value)
  return "latest" if step is None else "best" if step == "best" else "explicit"


def best_step(workdir: str, config=None) -> int:
  """The step of a run's best validation checkpoint (train.best_metric); InvalidArgumentError
  naming the workdir when the run keeps none or has not saved an evaluated one yet."""
  from cardiac_jax import checkpointing
  config = config or load_run_config(workdir)
  metric = config.train.get("best_metric", "")
  if not metric:
    raise data_errors.InvalidArgumentError(
        f"--step=best: {workdir} keeps no best checkpoint (its config.json has no "
        "train.best_metric); use --step=latest or an integer step")
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), best_metric=metric,
                                  best_mode=config.train.get("best_mode", "min"),
                                  create=False) as checkpointer:
    best = checkpointer.best()
    steps = checkpointer.all_steps()
  if best is None:
    raise data_errors.InvalidArgumentError(
        f"--step=best: {workdir} has no best checkpoint yet: no saved step carries an evaluation "
        f"of {metric} (train.eval_every={config.train.get('eval_every')}; steps kept: {steps})")
  return best[0]


def restore_run(workdir: str, step=None):
  """(config, family, state, mesh) of a run's checkpoint, for evaluation and analyses; `step`
  as `parse_step` reads it (default: the latest). The restored step is int(state.step)."""
  import jax
  from cardiac_jax import checkpointing, families, parallel
  config = load_run_config(workdir)
  step = parse_step(step, workdir)
  if checkpointing.latest_step(os.path.join(workdir, "checkpoints")) is None:
    raise FileNotFoundError(
        f"{workdir} has no checkpoint yet: train it first (python -m experiments.train "
        f"--config=NAME --workdir={workdir}, NAME being the config that its config.json "
        f"records: {config.get('name') or config.model.family})")
  if step == "best":
    step = best_step(workdir, config)
  family = families.make_family(config)
  mesh = parallel.make_mesh(config.parallel.num_devices)
  abstract = parallel.abstract_state(family.init_state, jax.random.key(config.seed), mesh)
  # A reader: it creates nothing in the run directory (no empty checkpoints/ folder).
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), create=False)
  try:
    state = checkpointer.restore(abstract, step)
  finally:
    checkpointer.close()
  return config, family, state, mesh


def read_table(path: str) -> dict[str, dict[str, str]]:
  """A CSV with a `subject` column (attributes.csv, a covariates file) as {subject: row}, in
  file order. FileNotFoundError when absent; ValueError naming the file without a subject
  column or with a subject on two rows."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: file not found")
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    if not reader.fieldnames or "subject" not in reader.fieldnames:
      raise ValueError(f"{path}: needs a 'subject' column, has {reader.fieldnames}")
    table = {}
    for row in reader:
      if row["subject"] in table:
        raise ValueError(f"{path}: subject {row['subject']} has more than one row")
      table[row["subject"]] = row
  return table


# The flags every analysis command shares, defined in one place: the name, default and kind of
# each are fixed here; the help says what the flag means for the command that defines it.
STEP_HELP = "Checkpoint: a step, best (the best validation checkpoint) or latest (default)."


def define_workdir_flag(help_text: str, flag_values: flags.FlagValues = flags.FLAGS):
  """--workdir, the run directory a command reads (no default)."""
  return flags.DEFINE_string("workdir", None, help_text, flag_values=flag_values)


def define_step_flag(help_text: str = STEP_HELP, flag_values: flags.FlagValues = flags.FLAGS):
  """--step, the checkpoint of the run (`parse_step`; default: the latest)."""
  return flags.DEFINE_string("step", None, help_text, flag_values=flag_values)


def define_seed_flag(help_text: str, flag_values: flags.FlagValues = flags.FLAGS):
  """--seed (default 0)."""
  return flags.DEFINE_integer("seed", 0, help_text, flag_values=flag_values)


def define_splits_flag(help_text: str, default=None,
                       flag_values: flags.FlagValues = flags.FLAGS):
  """--splits, a comma-separated list of splits (train, val, test)."""
  return flags.DEFINE_list("splits", default, help_text, flag_values=flag_values)


def define_latents_flag(flag_values: flags.FlagValues = flags.FLAGS):
  """--latents, the latents file of a diffae3d run an analysis reads (`infer_latents`)."""
  return flags.DEFINE_string("latents", None, "Latents file (default: DIR/latents/latents.csv, "
                             "computed when missing).", flag_values=flag_values)


def define_output_dir_flag(help_text: str, flag_values: flags.FlagValues = flags.FLAGS):
  """--output_dir, the folder of a command's outputs (default: one inside the run directory,
  which the help names)."""
  return flags.DEFINE_string("output_dir", None, help_text, flag_values=flag_values)


def start_command_with_arguments(argv, usage: str, min_count: int = 1, quiet: bool = True,
                                 **required) -> list[str]:
  """`start_command` for a command whose positional arguments are run directories (compare,
  reproducibility): at least `min_count` of them (absl's UsageError(usage) otherwise).
  Returns them."""
  from absl import app  # pylint: disable=g-import-not-at-top
  arguments = list(argv[1:])
  if len(arguments) < min_count:
    raise app.UsageError(usage)
  start_command(argv[:1], quiet=quiet, **required)
  return arguments
