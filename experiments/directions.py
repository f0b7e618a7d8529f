"""Latent directions of a trained generator scored against the cohort's ground-truth factors.

  python -m experiments.directions --workdir=DIR --method=voynov|pca|sefa|ganspace
  python -m experiments.directions --workdir=DIR --methods=pca,sefa,voynov
  python -m experiments.directions --compare=DIR/directions/pca,OTHER/directions/voynov

The generator is the DCGAN generator of a `dcgan` run or the decoder of a `vae`-family run,
both fed z ~ N(0, I) (`load_generator_run`, the family's `generator` hook).

1. Segmenter (DIR/directions/segmenter/, `experiments.short_axis_segmenter`): a small
   U-Net trained on the run's prepared training split (image and label channel 0, the run's
   augmentation) for --segmenter_steps steps, saved with its pooled Dice on the val split, the
   agreement of every factor measured on its predictions with the factor on the true labels
   (Spearman, median absolute error), and the spread of every factor over the cohort as the
   model saw it (true labels of augmented training batches), which with the measurement error
   gives each factor's resolution (`direction_scoring.factor_resolution`; the prepared slices
   are aligned and intensity-normalised, so rotation and intensity hardly vary in the cohort).
   DIR/directions/cohort_factors.md: the Spearman correlation of every pair of factors over
   those labels (factors that go together in the cohort are hard to separate).
2. Directions (DIR/directions/<method>/directions.npz, reused when the settings match):
   voynov: `VoynovDiscovery` trained for --voynov_steps steps; directions ranked by the
     reconstructor's accuracy on each (`evaluate`, also written: overall accuracy, chance,
     shift error);
   pca: PCA of the posterior means of the training split (VAE); for a GAN there is no encoder,
     and PCA of the generator's first-block features (GANSpace) is used;
   ganspace: PCA of the first-block features for z ~ N(0, I) (GAN: after the first linear map,
     BatchNorm and ReLU; VAE decoder: ReLU(z W + b) of its first Dense layer "from_latent");
   sefa: eigenvectors of the first linear map (GAN: generator "from_latent"; VAE: decoder
     "from_latent" kernel).
   An edit of t moves z by t * scale_k * v_k (`DirectionSet`: t standard deviations for PCA and
   GANSpace, latent units for SeFa and Voynov).
3. Scoring (`cardiac_jax.direction_scoring`, whose docstring has the formulas): for
   --num_base_latents base latents and --num_shifts shifts in [-R, R], rho (Spearman of every
   factor with the shift) and the range in resolutions; a direction controls its main factor
   by --rho_threshold, --min_effect, --other_threshold, --other_range_threshold,
   --main_factor_by, --min_finite_fraction and --joint_position.
4. Outputs, DIR/directions/<method>/: scores.csv (every direction: ranking value, main and
   second factor with rho, the largest other |rho| and relative range, the other factors that
   change, and rho, mean |rho|, finite fraction and relative range of every factor),
   scores.md, results.json (settings, segmenter Dice, resolutions, reconstructor accuracy for
   voynov, the table, how many directions control a factor and how many distinct factors are
   controlled, the best direction per factor), factor_values.npz (every measurement,
   (K, N, S, F)) and grid.png (rows: --grid_rows directions, columns: shifts, from the first
   base latent; row labels: main factor and rho).
   --methods runs several methods and writes DIR/directions/comparison.{md,csv,json};
   --compare only reads existing results.json files into one comparison.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Sequence

from absl import app, flags

from cardiac_jax import direction_scoring as scoring
from cardiac_jax.direction_scoring import Criteria
from cardiac_jax import io
from cardiac_jax import runtime
from experiments import common, short_axis_segmenter

METHODS = ("voynov", "pca", "sefa", "ganspace")
CRITERIA_KEYS = tuple(f.name for f in dataclasses.fields(Criteria) if f.name != "joint_position")
CHANNEL = scoring.CHANNEL  # Image and label channel that is segmented and measured.


def define_flags() -> None:
  """The command-line flags; defined only when run as a program, so that importing this module
  (tests, other entry points) never collides with another entry point's flags."""
  common.define_workdir_flag("dcgan or vae run directory.")
  flags.DEFINE_enum("method", None, list(METHODS), "Direction discovery method.")
  flags.DEFINE_list("methods", None, "Several methods, then one comparison table of them.")
  flags.DEFINE_list("compare", None, "Method folders (with results.json) to compare only.")
  flags.DEFINE_string("compare_out", None, "Folder of the comparison files (default: the "
                      "folders' common parent; DIR/directions for --methods).")
  common.define_step_flag()
  flags.DEFINE_integer("num_directions", 16, "Directions found and scored (at most latent_dim "
                       "but for voynov; 0: latent_dim).", lower_bound=0)
  flags.DEFINE_integer("num_base_latents", 32, "Base latents z ~ N(0, I).", lower_bound=1)
  flags.DEFINE_integer("num_shifts", 9, "Shifts per direction (grid columns; at least 3 for a "
                       "Spearman over the shifts).", lower_bound=3)
  flags.DEFINE_float("shift_range", 3.0, "Shifts span [-R, R] edit units.")
  flags.DEFINE_integer("segmenter_steps", 1000, "Segmenter training steps.", lower_bound=1)
  flags.DEFINE_integer("segmenter_batch_size", 16, "Segmenter batch size.", lower_bound=1)
  flags.DEFINE_list("segmenter_channels", ["8", "16", "32"], "U-Net channels per level.")
  flags.DEFINE_bool("segmenter_augment", True, "Segmenter training with random 90-degree "
                    "rotations, reflections, intensity scales and noise.")
  flags.DEFINE_bool("retrain_segmenter", False, "Train a new segmenter even if one is saved.")
  flags.DEFINE_integer("voynov_steps", 3000, "Voynov training steps.", lower_bound=1)
  flags.DEFINE_enum("voynov_deformator", "proj", ["linear", "proj", "ortho", "identity",
                                                  "random"], "Voynov deformator.")
  flags.DEFINE_enum("voynov_reconstructor", "lenet", ["lenet", "resnet"],
                    "Voynov reconstructor.")
  flags.DEFINE_integer("voynov_batch_size", 32, "Voynov batch size.", lower_bound=1)
  flags.DEFINE_float("voynov_learning_rate", 1e-4, "Voynov Adam learning rate.")
  flags.DEFINE_integer("ganspace_samples", 4096, "GANSpace samples of z.", lower_bound=1)
  flags.DEFINE_float("rho_threshold", 0.8,
                     "|rho| of the main factor for a direction to control it.")
  flags.DEFINE_float("other_threshold", 0.5, "To control, every other factor needs |rho| "
                     "below this, or a relative range below --other_range_threshold.")
  flags.DEFINE_float("min_effect", 0.5, "To control, the main factor's range over the shifts "
                     "must reach this many resolutions (0: no condition).")
  flags.DEFINE_float("other_range_threshold", 0.5, "Another factor whose range over the shifts "
                     "stays below this many resolutions does not count as changed (0: off).")
  flags.DEFINE_bool("joint_position", True, "Score the LV position as one 2-D factor: position "
                    "x and y do not block each other and count as one controlled factor.")
  flags.DEFINE_enum("main_factor_by", "rho", ["rho", "effect"], "Main factor: largest |rho|, "
                    "or largest |rho| * min(1, relative range).")
  flags.DEFINE_float("min_finite_fraction", 0.5, "A factor needs a finite rho for this share "
                     "of base latents to be a direction's main factor.")
  flags.DEFINE_integer("grid_rows", 8, "Directions drawn in grid.png.", lower_bound=1)
  flags.DEFINE_enum("grid_by", "rank", ["rank", "rho"],
                    "grid.png rows: the method's top directions or the largest |rho|.")
  flags.DEFINE_bool("recompute_directions", False,
                    "Find the directions again even if saved ones match.")
  common.define_seed_flag("Seed of base latents, segmenter and discovery.")
  # Flags defined by experiments.common are this command's: --help lists them.
  flags.adopt_module_key_flags(common)
  for name in ("shift_range", "voynov_learning_rate"):
    flags.register_validator(name, lambda value: 0.0 < value < float("inf"),
                             f"--{name} must be a finite number > 0")


@dataclasses.dataclass(frozen=True)
class Settings:
  """Every knob of one directions run (the flags of the same names)."""
  num_directions: int = 16
  num_base_latents: int = 32
  num_shifts: int = 9
  shift_range: float = 3.0
  segmenter_steps: int = 1000
  segmenter_batch_size: int = 16
  segmenter_channels: tuple[int, ...] = (8, 16, 32)
  segmenter_augment: bool = True
  retrain_segmenter: bool = False
  voynov_steps: int = 3000
  voynov_deformator: str = "proj"
  voynov_reconstructor: str = "lenet"
  voynov_batch_size: int = 32
  voynov_learning_rate: float = 1e-4
  ganspace_samples: int = 4096
  criteria: Criteria = Criteria()  # When a direction controls a factor (the flags of its fields).
  grid_rows: int = 8
  grid_by: str = "rank"
  recompute_directions: bool = False
  seed: int = 0
  generate_batch_size: int = 144

  def __post_init__(self):
    from data_pipelines.errors import InvalidArgumentError
    if self.num_base_latents < 1 or self.num_shifts < 3:
      raise InvalidArgumentError(f"need num_base_latents >= 1 and num_shifts >= 3 (a Spearman "
                                 f"over the shifts), got {self.num_base_latents} and "
                                 f"{self.num_shifts}")
    if not 0.0 < self.shift_range < math.inf:
      raise InvalidArgumentError(f"shift_range must be positive, got {self.shift_range}")

  def shifts(self):
    import numpy as np
    return np.linspace(-self.shift_range, self.shift_range, self.num_shifts)

  def flat(self) -> dict:
    """The settings as one flat dict, the criteria's fields among them (results.json)."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "criteria"}
    return {**dataclasses.asdict(self.criteria), **out}


_log = runtime.phase_logger('directions')


# ------------------------------------------------------------------------------- generator
@dataclasses.dataclass
class GeneratorRun:
  """A restored generator: `generator` maps (B, latent_dim) -> (B, H, W, C) in [0, 1]."""
  generator: Callable
  latent_dim: int
  kind: str
  family: Any
  state: Any
  config: Any
  workdir: str
  step_selection: str = "latest"  # How --step chose the checkpoint (common.step_selection).


def load_generator_run(workdir: str, step: int | None = None) -> GeneratorRun:
  """The run's generator (`FamilyBase.generator`: pure, (B, latent_dim) z ~ N(0, I) ->
  (B, H, W, C) images in [0, 1], parameters closed over); ValueError naming config.json for a
  family without one, before anything is restored."""
  from cardiac_jax import families
  kind = common.load_run_config(workdir).model.family
  families.require(kind, "generator", "latent-direction discovery",
                   os.path.join(workdir, "config.json"))
  config, family, state, _ = common.restore_run(workdir, step)
  return GeneratorRun(family.generator(state), int(family.latent_dim), kind, family, state,
                      config, workdir, common.step_selection(step))


# ------------------------------------------------------------------------------ directions
def first_linear_kernel(run: GeneratorRun):
  """(latent_dim, F) kernel of the generator's first linear map."""
  import numpy as np
  return np.asarray(run.family.first_linear_kernel(run.state))


def first_block_features(run: GeneratorRun) -> Callable:
  """z (B, d) -> (B, F) GANSpace features (module docstring)."""
  return lambda z: run.family.first_block_features(run.state, z)


def _has_encoder(run: GeneratorRun) -> bool:
  from cardiac_jax import families
  return families.supports(run.family, "encode")


def posterior_means(run: GeneratorRun, split: str = "train"):
  """(N, latent_dim) posterior means of a VAE run's split (padding rows dropped)."""
  import jax
  import numpy as np
  encode = jax.jit(lambda x: run.family.encode(run.state, x)[0])
  means = []
  for batch in common.split_batches(run.config, run.family, split)(None):
    mu = np.asarray(encode(batch["image"]))
    means.append(mu[np.asarray(batch["mask"], bool)])
  return np.concatenate(means)


def voynov_directions(run: GeneratorRun, num_directions: int, settings: Settings, key,
                      log: Callable[[str], None] = _log):
  """Trains a Voynov-Babenko deformator (`directions.train_voynov_directions`); (DirectionSet
  ranked by the reconstructor's accuracy per direction, {"reconstructor": evaluate(),
  "history": [...], "source_index": [...]})."""
  from cardiac_jax import directions as dl
  config = dl.VoynovConfig(num_directions=num_directions, deformator=settings.voynov_deformator,
                           reconstructor=settings.voynov_reconstructor,
                           batch_size=settings.voynov_batch_size,
                           learning_rate=settings.voynov_learning_rate)
  return dl.train_voynov_directions(run.generator, run.latent_dim, config, key,
                                    settings.voynov_steps, log)


def find_directions(run: GeneratorRun, method: str, settings: Settings,
                    log: Callable[[str], None] = _log):
  """(DirectionSet, extra results) of `method` (module docstring)."""
  import jax
  from cardiac_jax import directions as dl
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r} (one of {METHODS})")
  k = settings.num_directions or run.latent_dim
  if method == "voynov" and settings.voynov_deformator == "ortho":
    k = run.latent_dim  # An orthogonal basis of the latent space.
  elif method != "voynov" or settings.voynov_deformator in ("identity", "random"):
    k = min(k, run.latent_dim)  # Closed forms and fixed bases have at most latent_dim.
  key = jax.random.fold_in(jax.random.key(settings.seed), 1)
  if method == "voynov":
    return voynov_directions(run, k, settings, key, log)
  if method == "sefa":
    return dl.sefa_directions(first_linear_kernel(run), k), {}
  if method == "pca" and _has_encoder(run):
    means = posterior_means(run)
    found = dl.pca_latent_directions(means, k)
    return found, {"pca_source": f"posterior means of {len(means)} training slices"}
  found = dl.ganspace_directions(first_block_features(run), key, run.latent_dim,
                                 num_samples=settings.ganspace_samples, num_components=k)
  note = "PCA of first-block features (GANSpace)"
  if method == "pca":
    note += ": a GAN has no encoder for posterior means"
  return found, {"pca_source": note}


def _directions_fingerprint(run: GeneratorRun, method: str, settings: Settings,
                            step: int) -> dict[str, Any]:
  out = {"method": method, "kind": run.kind, "step": step, "latent_dim": run.latent_dim,
         "num_directions": settings.num_directions, "seed": settings.seed}
  if method == "voynov":
    out.update({k: getattr(settings, k) for k in (
        "voynov_steps", "voynov_deformator", "voynov_reconstructor", "voynov_batch_size",
        "voynov_learning_rate")})
  if method == "ganspace" or (method == "pca" and not _has_encoder(run)):
    out["ganspace_samples"] = settings.ganspace_samples
  return out


def cached_directions(run: GeneratorRun, method: str, settings: Settings, out_dir: str,
                      log: Callable[[str], None] = _log):
  """`find_directions`, saved to out_dir/directions.npz + directions.json and reused by a rerun
  with the same settings."""
  from cardiac_jax import directions as dl
  fingerprint = _directions_fingerprint(run, method, settings, int(run.state.step))
  npz, meta_path = os.path.join(out_dir, "directions.npz"), os.path.join(out_dir,
                                                                         "directions.json")
  if not settings.recompute_directions and os.path.exists(npz) and os.path.exists(meta_path):
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
    if meta.get("fingerprint") == fingerprint:
      found = dl.load_direction_set(npz)
      log(f"{method}: {len(found.vectors)} directions reused from {npz}")
      return found, meta.get("extra", {})
  start = time.time()
  found, extra = find_directions(run, method, settings, log)
  extra = dict(extra, seconds=round(time.time() - start, 1))
  os.makedirs(out_dir, exist_ok=True)
  dl.save_direction_set(npz, found)
  io.write_json(meta_path, {"fingerprint": fingerprint, "extra": extra})
  return found, extra


# --------------------------------------------------------------------------------- outputs
def write_method_outputs(out_dir: str, run: GeneratorRun, method: str, found, extra: dict,
                         scores: dict, settings: Settings, base_latents, seg_meta: dict,
                         log: Callable[[str], None] = _log) -> dict:
  """scores.csv, scores.md, factor_values.npz, grid.png and results.json; returns the latter."""
  import numpy as np
  from cardiac_jax import directions as dl
  from cardiac_jax import factors
  os.makedirs(out_dir, exist_ok=True)
  rows, summary = scores["rows"], scores["summary"]
  shifts = settings.shifts()
  if "source_index" in extra:
    for row in rows:
      row["source_index"] = extra["source_index"][row["direction"]]
  io.write_csv(os.path.join(out_dir, "scores.csv"), rows)
  value_name = {"voynov": "reconstructor accuracy", "sefa": "eigenvalue"}.get(
      found.method, "variance")
  dice = seg_meta.get("quality", {}).get("dice", {})
  header = (
      f"Latent directions of {os.path.basename(os.path.abspath(run.workdir))} "
      f"({run.kind}, step {int(run.state.step)}) by {found.method}: {len(rows)} directions "
      f"(value: {value_name}), {settings.num_base_latents} base latents z ~ N(0, I), "
      f"{settings.num_shifts} shifts in [-{settings.shift_range:g}, {settings.shift_range:g}] "
      f"edit units. rho: Spearman of the factor over the shift, mean over base latents; "
      f"segmenter Dice {scoring.format_value(dice.get('mean'), '.3f')}. Range / resolution: the "
      f"factor's mean range over the shifts in units of the larger of its spread over the "
      f"cohort and the segmenter's measurement error. {scoring.criteria_sentence(summary)}: "
      f"{summary['num_controlling_directions']} directions, "
      f"{summary['num_distinct_factors_controlled']} distinct factors "
      f"({', '.join(sorted(summary['controlled_factors'])) or 'none'}).")
  io.write_text(os.path.join(out_dir, "scores.md"), scoring.markdown_table(rows, header))
  with open(os.path.join(out_dir, "factor_values.npz.tmp"), "wb") as f:
    np.savez(f, values=scores["values"], rho=scores["rho"],
             relative_range=scores["relative_range"], shifts=shifts, base_latents=base_latents,
             directions=found.scaled(), factors=np.asarray(factors.FACTORS))
  os.replace(os.path.join(out_dir, "factor_values.npz.tmp"),
             os.path.join(out_dir, "factor_values.npz"))

  shown = scoring.grid_directions(rows, settings.grid_rows, settings.grid_by)
  images = dl.shift_grid(run.generator, base_latents[0], found.scaled()[shown], shifts)
  labels = [f"#{k} {rows[k]['main_factor'] or '?'} {scoring.format_value(rows[k]['main_rho'])}"
            for k in shown]
  dl.save_direction_grid(os.path.join(out_dir, "grid.png"), images, shifts, labels,
                         channel=CHANNEL,
                         title=f"{found.method} directions from the first base latent "
                               f"(columns: edit units)")
  result = {
      "workdir": os.path.abspath(run.workdir), "config": run.config.name, "kind": run.kind,
      "method": found.method, "requested_method": method, "step": int(run.state.step),
      "step_selection": run.step_selection,
      "latent_dim": run.latent_dim, "image_size": int(run.config.data.image_size),
      "settings": settings.flat(), "shifts": shifts.tolist(),
      "segmenter": {"dice": dice, "split": seg_meta.get("quality", {}).get("split"),
                    "factor_agreement": seg_meta.get("quality", {}).get("factor_agreement"),
                    "mm_per_pixel": seg_meta.get("mm_per_pixel")},
      "cohort_spread": seg_meta.get("cohort_spread"),
      "resolution": scoring.factor_resolution(seg_meta),
      "factor_units": dict(scoring.FACTOR_UNITS),
      **{k: v for k, v in extra.items() if k != "source_index"},
      **summary, "table": rows}
  io.write_json(os.path.join(out_dir, "results.json"), result)
  log(f"{found.method}: {summary['num_controlling_directions']} controlling directions, "
      f"{summary['num_distinct_factors_controlled']} distinct factors; wrote {out_dir}")
  return result


def compare(result_dirs: Sequence[str], out_dir: str | None = None) -> list[dict]:
  """One row per method folder (its results.json, `direction_scoring.comparison_row`): directions,
  controlling directions, distinct factors controlled, and the best rho per factor with its
  direction. Writes out_dir/comparison.{md,csv,json} (out_dir: the folders' common parent by
  default)."""
  results = []
  for d in result_dirs:
    path = os.path.join(d, "results.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} not found: run experiments.directions for {d} first")
    with open(path, encoding="utf-8") as f:
      results.append(json.load(f))
  if not results:
    raise ValueError("nothing to compare: give at least one method folder")
  out_dir = out_dir or os.path.commonpath([os.path.abspath(d) for d in result_dirs])
  if len(result_dirs) == 1:
    out_dir = os.path.dirname(os.path.abspath(result_dirs[0]))
  rows = [scoring.comparison_row(r) for r in results]
  os.makedirs(out_dir, exist_ok=True)
  io.write_csv(os.path.join(out_dir, "comparison.csv"), rows)
  io.write_json(os.path.join(out_dir, "comparison.json"),
                {"folders": [os.path.abspath(d) for d in result_dirs], "rows": rows,
                 "criteria": [{k: r.get(k) for k in CRITERIA_KEYS} for r in results]})
  io.write_text(os.path.join(out_dir, "comparison.md"),
                scoring.comparison_markdown(rows, results))
  return rows


# ---------------------------------------------------------------------------------- driver
def run(workdir: str, methods: Sequence[str], settings: Settings = Settings(),
        step: int | None = None, log: Callable[[str], None] = _log) -> dict[str, dict]:
  """Segmenter, directions, scores and outputs of every method; with more than one method also
  the comparison. Returns {method: results.json content}."""
  from cardiac_jax import segmenter
  for method in methods:
    if method not in METHODS:
      raise ValueError(f"unknown method {method!r} (one of {METHODS})")
  root = os.path.join(workdir, "directions")
  generator_run = load_generator_run(workdir, step)
  params, seg_config, seg_meta = short_axis_segmenter.prepare_segmenter(
      generator_run.config, os.path.join(root, "segmenter"), settings, log)

  def segment_fn(images):
    return segmenter.segment(params, images, seg_config)

  io.write_text(os.path.join(root, "cohort_factors.md"),
                "Spearman correlation of the factors over the true labels of augmented "
                "training batches (the cohort as the model saw it).\n\n"
                + scoring.cohort_correlation_table(seg_meta["cohort_correlation"]) + "\n")
  z = scoring.base_latents(generator_run.latent_dim, settings.num_base_latents,
                           settings.seed)
  resolution = scoring.factor_resolution(seg_meta)
  results = {}
  for method in methods:
    out_dir = os.path.join(root, method)
    found, extra = cached_directions(generator_run, method, settings, out_dir, log)
    log(f"{method}: scoring {len(found.vectors)} directions")
    scores = scoring.score_directions(
        generator_run.generator, found.scaled(), segment_fn, settings.shifts(), z,
        values_ranking=found.values, scales=found.scales,
        spread=resolution, criteria=settings.criteria,
        batch_size=settings.generate_batch_size)
    results[method] = write_method_outputs(out_dir, generator_run, method, found, extra, scores,
                                           settings, z, seg_meta, log)
  if len(methods) > 1:
    compare([os.path.join(root, m) for m in methods], root)
  return results


def settings_from_flags() -> Settings:
  f = flags.FLAGS
  try:
    channels = tuple(int(c) for c in f.segmenter_channels)
  except ValueError as e:
    raise app.UsageError(f"--segmenter_channels must be integers: {e}")
  names = [field.name for field in dataclasses.fields(Settings)
           if field.name not in ("segmenter_channels", "generate_batch_size", "criteria")]
  criteria = Criteria(**{field.name: f[field.name].value for field in dataclasses.fields(Criteria)})
  return Settings(segmenter_channels=channels, criteria=criteria,
                  **{name: f[name].value for name in names})


def main(argv):
  common.start_command(argv)
  f = flags.FLAGS
  if f.compare:
    rows = compare(f.compare, f.compare_out)
    for row in rows:
      print(f"{row['run']} {row['method']}: {row['controlling']} controlling directions, "
            f"{row['distinct_factors']} distinct factors ({row['controlled'] or 'none'})")
    return
  if not f.workdir:
    raise app.UsageError("--workdir is required (or --compare=FOLDER,...)")
  if bool(f.method) == bool(f.methods):
    raise app.UsageError("give exactly one of --method and --methods")
  methods = [f.method] if f.method else list(f.methods)
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise app.UsageError(f"unknown methods {unknown} (one of {', '.join(METHODS)})")
  results = run(f.workdir, methods, settings_from_flags(), f.step)
  for method in results:
    with open(os.path.join(f.workdir, "directions", method, "scores.md"),
              encoding="utf-8") as fh:
      print(fh.read())
  if len(methods) > 1:
    with open(os.path.join(f.workdir, "directions", "comparison.md"), encoding="utf-8") as fh:
      print(fh.read())


if __name__ == "__main__":
  define_flags()
  app.run(main)
