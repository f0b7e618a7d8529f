"""Trait manipulation of a subject's cine by a diffae3d run:
`python -m experiments.manipulate --workdir=DIR --trait=lv_edv_ml`.

  python -m experiments.manipulate --workdir=DIR --trait=lv_edv_ml [--kind=linear|logistic]
      [--shift=pattern|filter] [--subject=ID] [--steps=-2,-1,0,1,2] [--inversion_steps=N]
      [--decode_steps=N] [--latents=FILE] [--output_dir=DIR/manipulate/<trait>]
      [--blood_threshold=0.7] [--segment] [--segmenter_steps=1500]

Latent manipulation as in Ometto et al. 2024:
1. Direction. The latents z (N, D) of the training split (DIR/latents/latents.csv, computed
   when missing: `experiments.infer_latents.load_or_compute`) of the subjects with a
   trait value are standardised per dimension, z_std = (z - mean) / std (`association.
   standardise`, training-split mean and SD), and a sparse model of the trait is fitted on
   them (`association.trait_direction`): Lasso with 5-fold CV for a continuous attributes.csv
   column (kind "linear"), L1-logistic regression with stratified 5-fold CV for a binary trait
   column:value such as group:DCM (kind "logistic"); w = its coefficient vector, beta = w / |w|.
2. Edit. The subject's cine x_0 (default: the first test subject of splits.json) is encoded
   with the EMA encoder, z = Enc(x_0) (batch of one), and inverted under its own z to x_T by
   DDIM (--inversion_steps, default config.eval.inversion_steps). For every m of --steps
     z_std' = z_std + m u,   z' = mean + std z_std' = z + m std * u,
   (the second form, computed in float64 and cast to float32, gives z' = z bit for bit at
   m = 0, so the m = 0 cine is exactly the plain reconstruction decode(x_T, z)) and the cine
   is decoded from (x_T, z') by DDIM (--decode_steps, default config.eval.decode_steps), one
   m at a time, with the compiled functions of `ddim_functions`, which a reconstruction in the
   same process reuses. The unit shift u (--shift):
   - "pattern" (default): the activation pattern of the fitted model over the training codes,
     u = cov(z_std, s) / sd(s) with s = z_std w (`association.activation_pattern`): m is the
     change of the model's prediction (or logit) in its standard deviations over the training
     subjects, along the direction in which the codes of subjects with a larger trait lie,
     the shortest such shift in Mahalanobis distance (one unit per m).
   - "filter": u = sqrt(D) beta, the reference's z' = z + m sqrt(D) beta. With correlated
     latents the filter can point where the codes hardly vary, far outside what the decoder
     saw (measured on the default run: README, 3D diffusion autoencoder).
   direction.json reports, for both kinds, the model's prediction at every m and the shift's
   Mahalanobis length (pseudo-inverse of the training codes' covariance).
3. Check. (a) The LV blood pool segmented (`experiments.long_axis_segmenter`, trained once
   per run on the training split's 4-chamber frames and labels, kept in DIR/segmenter_la_4ch)
   in every frame of the input and of each decoded cine: its area at ED (frame 0: cines are
   resampled from ED) and over the cycle, the change from m = 0, Spearman rho of m and the ED
   area, next to the input's true and segmented areas (--segment, on by default; skipped with
   a warning when the prepared cine has no 4-chamber labels). (b) A label-free proxy: the
   number of pixels of the decoded cine on [0, 1] ((x + 1) / 2) above --blood_threshold at ED
   and over the cycle (every bright blood pool, not the LV alone).

Writes --output_dir (default DIR/manipulate/<trait>, ':' replaced by '_'):
- strip.png: rows = the input cine, then one row per m; columns = up to 8 evenly spaced frames
  (t = 0 is ED); all on [0, 1], with the outline of the segmented LV blood pool in red;
- manipulation.gif: one GIF frame per cardiac frame, the input and every m side by side
  (labelled above), upscaled so that a panel is at least 96 px;
- direction.json: trait, kind, the direction (beta, coefficients, alpha or C, non-zeros, CV
  score and metric, empty-model fallback), the shift (kind, unit u, the model's prediction
  and the Mahalanobis length at every m), training subjects, the standardisation, subject
  (split, trait value), m values and latent shift norms, DDIM steps, checkpoint step, the LV
  segmentation (segmenter folder and validation scores; LV areas per m at ED in px and
  mm^2, their change from m = 0 in %, Spearman rho, the area curves, the input's true and
  segmented curves), the proxy (threshold, ED areas per m, change, Spearman rho, curves, the
  input's ED area), and the largest difference between the subject's fresh z and its row of
  the latents file (a large one means the file is from another checkpoint);
- manipulation.npz: steps (M,), input (T, S, S) and cines (M, T, S, S) in [-1, 1] as the
  model produced them, z (D,), x_T (T, S, S).
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Optional, Sequence

from absl import app, flags, logging
import numpy as np

from cardiac_jax import io
from data_pipelines.errors import InvalidArgumentError, InvalidInputError

from experiments import long_axis_segmenter

DEFAULT_STEPS = (-2.0, -1.0, 0.0, 1.0, 2.0)
STRIP_FRAMES = 8
GIF_MIN_PANEL_PX = 96
GIF_FPS = 8.0
DEFAULT_BLOOD_THRESHOLD = 0.7
SHIFTS = ("pattern", "filter")


def output_name(trait: str) -> str:
  """Folder name of a trait: group:DCM -> group_DCM."""
  return "".join(c if c.isalnum() or c in "._-" else "_" for c in trait)


def blood_pool_area(cine: np.ndarray, threshold: float) -> np.ndarray:
  """(T,) number of pixels above `threshold` in each frame of a (T, S, S) cine on [0, 1]."""
  return np.sum(np.asarray(cine) > threshold, axis=(1, 2)).astype(np.int64)


def load_subject_batch(config, directory: str, subject: str, split: str) -> dict:
  """The evaluation batch (batch size 1, resized to data.image_size) of one subject."""
  from data_pipelines import cine, prepare  # pylint: disable=g-import-not-at-top
  source = prepare.load_split(directory, split)
  for index in range(len(source)):
    example = source[index]
    name = example["subject"]
    name = name.decode("utf-8") if isinstance(name, bytes) else str(name)
    if name == subject:
      return next(iter(cine.eval_batches([example], config.data, batch_size=1)))
  raise InvalidArgumentError(f"{directory}: --subject={subject} is not in the prepared {split} "
                             "split")


def subject_split(directory: str, subject: Optional[str]) -> tuple[str, str]:
  """(subject, split) from splits.json; the first test subject when `subject` is None."""
  from data_pipelines import prepare  # pylint: disable=g-import-not-at-top
  path = os.path.join(directory, prepare.SPLITS)
  with open(path, encoding="utf-8") as f:
    assignment = json.load(f)
  if subject is None:
    if not assignment.get("test"):
      raise InvalidInputError(f"{path}: the test split is empty; give --subject=ID")
    return assignment["test"][0], "test"
  for split in ("train", "val", "test"):
    if subject in assignment.get(split, []):
      return subject, split
  raise InvalidArgumentError(f"{path}: subject {subject!r} is in no split (--subject)")


def _label_row(labels: Sequence[str], panel: int, gap: int, height: int) -> np.ndarray:
  """(height, width) grey strip with each label drawn above its panel (white on black)."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  width = len(labels) * panel + (len(labels) - 1) * gap
  image = Image.new("L", (width, height), 0)
  draw = ImageDraw.Draw(image)
  for k, label in enumerate(labels):
    draw.text((k * (panel + gap) + 2, 1), label, fill=255)
  return np.asarray(image, np.float32) / 255.0


def side_by_side_frames(volumes: Sequence[np.ndarray], labels: Sequence[str],
                        min_panel_px: int = GIF_MIN_PANEL_PX) -> np.ndarray:
  """(T, H, W) GIF frames: the (T, S, S) volumes on [0, 1] side by side, upscaled (nearest)
  to at least `min_panel_px` per panel, grey 2 px gaps, labels above."""
  size = volumes[0].shape[-1]
  scale = max(1, math.ceil(min_panel_px / size))
  panels = [np.repeat(np.repeat(np.clip(v, 0.0, 1.0), scale, axis=1), scale, axis=2)
            for v in volumes]
  gap = 2
  num_frames, panel = panels[0].shape[0], panels[0].shape[-1]
  separator = np.full((num_frames, panel, gap), 0.5, np.float32)
  row = [panels[0]]
  for p in panels[1:]:
    row += [separator, p]
  body = np.concatenate(row, axis=2)
  header = _label_row(labels, panel, gap, 14)
  return np.concatenate([np.broadcast_to(header, (num_frames,) + header.shape), body], axis=1)


@functools.lru_cache(maxsize=4)
def ddim_functions(family, inversion_steps: int, decode_steps: int):
  """(encode, invert, decode) of a DiffAEFamily, jitted with the step counts fixed; cached, so
  that every caller in a process (a reconstruction to compare with, another trait) reuses the
  compiled functions."""
  import jax  # pylint: disable=g-import-not-at-top
  return (jax.jit(family.encode),
          jax.jit(functools.partial(family.invert, num_steps=int(inversion_steps))),
          jax.jit(functools.partial(family.decode, num_steps=int(decode_steps))))


def lv_outline(frame: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """(S, S, 3) RGB of a frame on [0, 1] with the border pixels of its LV blood pool red."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  from cardiac_jax import structures, viz  # pylint: disable=g-import-not-at-top
  lv = labels == structures.LV_BLOOD_POOL
  border = lv & ~ndimage.binary_erosion(lv)
  return viz.overlay_labels(frame, np.where(border, structures.LV_BLOOD_POOL, 0), alpha=0.8)


def lv_measurements(steps: Sequence[float], seg, input_labels: np.ndarray,
                    cine_labels: np.ndarray, batch: dict, pixel_mm: float) -> dict:
  """The "lv_segmentation" section of direction.json (module docstring) from the segmented
  input (T, S, S) and cines (M, T, S, S)."""
  from cardiac_jax import structures  # pylint: disable=g-import-not-at-top

  def area(labels):
    return np.sum(labels == structures.LV_BLOOD_POOL, axis=(-2, -1))
  true_labels = batch.get("la_label")
  true_curve = None if true_labels is None else area(np.asarray(true_labels)[0, ..., 0])
  return {
      "description": ("LV blood-pool pixels of each frame, segmented by the run's 4-chamber "
                      "segmenter"),
      "segmenter_dir": long_axis_segmenter.SEGMENTER_DIR,
      "segmenter": dict(seg.meta),
      **area_summary(steps, area(cine_labels), pixel_mm),
      "input_segmented_curve_px": area(input_labels).tolist(),
      "input_true_curve_px": (None if true_curve is None or not true_curve.any()
                              else true_curve.tolist()),
  }


def area_summary(steps: Sequence[float], curves: np.ndarray, pixel_mm: float) -> dict:
  """The fields of direction.json shared by the LV segmentation and the blood-pool proxy, from
  (M, T) area curves in pixels (one per m): ED (frame 0) areas in px and mm^2, their change
  from m = 0 in % (None without m = 0 or with a zero area there), Spearman rho of m and the ED
  area, and the curves."""
  ed = curves[:, 0]
  reference = ed[list(steps).index(0.0)] if 0.0 in steps else None
  return {
      "pixel_spacing_mm": pixel_mm, "ed_frame": 0,
      "area_ed_px": [int(a) for a in ed],
      "area_ed_mm2": [float(a * pixel_mm ** 2) for a in ed],
      "change_from_m0_percent": (None if not reference else
                                 [float(100.0 * (a - reference) / reference) for a in ed]),
      "spearman_m_vs_area_ed": _spearman(steps, ed),
      "area_curves_px": curves.tolist(),
  }


def _spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
  from scipy import stats  # pylint: disable=g-import-not-at-top
  if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return None
  return float(stats.spearmanr(x, y).statistic)


def manipulate(workdir: str, trait: str = "lv_edv_ml", kind: Optional[str] = None,
               subject: Optional[str] = None, steps: Sequence[float] = DEFAULT_STEPS,
               inversion_steps: Optional[int] = None, decode_steps: Optional[int] = None,
               latents_path: Optional[str] = None, output_dir: Optional[str] = None,
               blood_threshold: float = DEFAULT_BLOOD_THRESHOLD, seed: int = 0,
               shift: str = "pattern", segment: bool = True,
               segmenter_steps: int = long_axis_segmenter.DEFAULT_STEPS, run=None,
               checkpoint_step=None) -> dict:
  """Fits the trait direction, decodes the subject's edited cines and writes the outputs
  (module docstring); `run` is an already restored (config, family, state, mesh) of workdir
  to reuse, else `checkpoint_step` (--step, `common.parse_step`) is restored; an explicit one
  also brings the run's own latents to that checkpoint. Returns the content of direction.json
  plus "output_dir"."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from cardiac_jax import association, families, viz  # pylint: disable=g-import-not-at-top
  from cardiac_jax.families.diffae3d import to_unit_range  # pylint: disable=g-import-not-at-top
  from data_pipelines import cine  # pylint: disable=g-import-not-at-top
  from experiments import associate, common, infer_latents  # pylint: disable=g-import-not-at-top

  steps = [float(m) for m in steps]
  if not steps:
    raise InvalidArgumentError("--steps needs at least one m value")
  if not all(math.isfinite(m) for m in steps):
    raise InvalidArgumentError(f"--steps must be finite numbers, got {steps}")
  if shift not in SHIFTS:
    raise InvalidArgumentError(f"shift must be one of {SHIFTS}, got {shift!r}")
  if not 0.0 < blood_threshold < 1.0:
    raise InvalidArgumentError(f"--blood_threshold must be in (0, 1), got {blood_threshold}")
  inferred = "logistic" if ":" in trait else "linear"
  kind = kind or inferred
  if kind not in association.KINDS:
    raise InvalidArgumentError(f"kind must be one of {association.KINDS}, got {kind!r}")
  if kind == "logistic" and inferred != "logistic":
    raise InvalidArgumentError(f"trait {trait!r} is continuous; a logistic direction needs a "
                               "binary trait column:value such as group:DCM")
  run = run or common.restore_run(workdir, checkpoint_step)
  config, family, state, _ = run
  families.require(config.model.family, "invert", "manipulation (inversion and decoding of "
                   "edited codes)", workdir)
  inversion_steps = int(inversion_steps or family.inversion_steps)
  decode_steps = int(decode_steps or family.decode_steps)
  family.check_ddim_steps(inversion_steps, decode_steps, family.ddim_grid)
  directory = cine.prepared_cine_dir(config, create=False)
  subject, split = subject_split(directory, subject)  # A wrong --subject before any latent.
  latents = infer_latents.load_or_compute(workdir, latents_path,
                                          refresh=checkpoint_step is not None,
                                          step=checkpoint_step).require_finite()
  attributes_path, attributes = associate.read_attributes(directory)
  values = associate.trait_values(attributes, latents.subjects, trait, attributes_path).values

  # 1. Direction on the training split's standardised latents.
  train = latents.split_indices(["train"])
  train = train[np.isfinite(values[train])]
  if len(train) < 3:
    raise InvalidInputError(f"{latents.path}: {len(train)} training subjects with a value of "
                            f"{trait!r}; a direction needs at least 3")
  z_train_std, transform = association.standardise(latents.z[train])
  try:
    direction = association.trait_direction(z_train_std, values[train], kind, seed=seed)
  except ValueError as e:
    raise ValueError(f"{trait!r} over the {len(train)} training subjects of {latents.path}: "
                     f"{e}") from None
  if direction.empty_fallback:
    logging.warning("the cross-validated %s model of %s is empty: using the sparsest "
                    "non-empty model on the path", kind, trait)
  dim = latents.z.shape[1]
  if shift == "pattern":
    unit = association.activation_pattern(z_train_std, direction.coefficients)
  else:
    unit = math.sqrt(dim) * direction.beta
  # Mahalanobis length of one unit among the training codes (pseudo-inverse: D may exceed N).
  precision = np.linalg.pinv(np.cov(z_train_std, rowvar=False))
  mahalanobis_per_unit = float(np.sqrt(max(float(unit @ precision @ unit), 0.0)))

  # 2. The subject: encode, invert under its own z, decode for every m.
  batch = load_subject_batch(config, directory, subject, split)
  x0 = jnp.asarray(batch[family.field], jnp.float32)
  encode, invert, decode = ddim_functions(family, inversion_steps, decode_steps)
  # On the host and back: every z' below, z itself at m = 0, enters jit the same way.
  z = jnp.asarray(np.asarray(encode(state, x0)))
  x_T = invert(state, x0, z)
  z64 = np.asarray(z, np.float64)[0]
  if z64.shape[0] != dim:
    raise InvalidInputError(f"{latents.path}: D = {dim} latents, the run's encoder gives "
                            f"{z64.shape[0]}")
  unit_shift = transform.std * unit
  score = transform.apply(z64[None])[0] @ direction.coefficients + direction.intercept
  predicted = [float(score + m * (unit @ direction.coefficients)) for m in steps]
  cines = []
  for m in steps:
    z_edit = (z64 + m * unit_shift).astype(np.float32)[None]
    cines.append(np.asarray(decode(state, x_T, jnp.asarray(z_edit)))[0, ..., 0])
  cines = np.stack(cines)                                   # (M, T, S, S) in [-1, 1]
  x0_np = np.asarray(x0)[0, ..., 0]
  cines_unit = np.asarray(to_unit_range(cines))
  x0_unit = np.asarray(to_unit_range(x0_np))

  # 3. LV segmentation, then the label-free proxy: bright (blood-pool) pixels.
  pixel_mm = float(batch["pixel_spacing_mm"][0])
  lv, input_labels, cine_labels = None, None, None
  if segment and family.field != "la_image":
    logging.warning("the LV segmentation measures 4-chamber cines; this run models %s",
                    family.field)
  elif segment:
    seg = long_axis_segmenter.load_or_train(config, workdir, steps=segmenter_steps,
                                            directory=directory)
    if seg is not None:
      input_labels, cine_labels = seg.segment(x0_unit), seg.segment(cines_unit)
      lv = lv_measurements(steps, seg, input_labels, cine_labels, batch, pixel_mm)
  curves = np.stack([blood_pool_area(c, blood_threshold) for c in cines_unit])   # (M, T)
  area_ed = curves[:, 0]
  proxy = {
      "description": ("proxy of chamber size, not a segmentation: pixels of the decoded "
                      "cine on [0, 1] above the threshold (the blood pools of the 4-chamber "
                      "view) at the end-diastolic frame 0"),
      "threshold": float(blood_threshold),
      **area_summary(steps, curves, pixel_mm),
      "input_area_ed_px": int(blood_pool_area(x0_unit, blood_threshold)[0]),
  }

  row = latents.subjects.index(subject) if subject in latents.subjects else None
  csv_difference = (None if row is None
                    else float(np.max(np.abs(latents.z[row] - z64))))
  if csv_difference is not None and csv_difference > 1e-3 * max(1.0, float(np.abs(z64).max())):
    logging.warning("subject %s: its z differs from its row of %s by up to %.3g: the latents "
                    "file may be from another checkpoint", subject, latents.path,
                    csv_difference)

  out = output_dir or os.path.join(workdir, "manipulate", output_name(trait))
  os.makedirs(out, exist_ok=True)
  num_frames = cines.shape[1]
  frames = np.unique(np.linspace(0, num_frames - 1, min(STRIP_FRAMES, num_frames)).astype(int))
  labels = [f"m={m:+g}" for m in steps]
  title = (f"{config.name}: {subject} along {trait} ({kind}, {direction.num_nonzero} non-zero, "
           f"CV {direction.cv_metric} {direction.cv_score:.2f})")
  volumes = [x0_unit] + list(cines_unit)
  if lv is not None:
    segmentations = [input_labels] + list(cine_labels)
    panels = [[lv_outline(v[t], g[t]) for t in frames] for v, g in zip(volumes, segmentations)]
    row_titles = ["input"] + [f"{l} LV {a}px" for l, a in zip(labels, lv["area_ed_px"])]
  else:
    panels = [[v[t] for t in frames] for v in volumes]
    row_titles = ["input"] + [f"{l} pool {a}px" for l, a in zip(labels, area_ed)]
  viz.save_image_grid(
      os.path.join(out, "strip.png"), panels, row_titles=row_titles,
      col_titles=[f"t={t}" + (" ED" if t == 0 else "") for t in frames], vmin=0.0, vmax=1.0,
      title=title)
  viz.save_cine_gif(os.path.join(out, "manipulation.gif"),
                    side_by_side_frames([x0_unit] + list(cines_unit), ["input"] + labels),
                    fps=GIF_FPS)
  np.savez_compressed(os.path.join(out, "manipulation.npz"), steps=np.asarray(steps),
                      input=x0_np, cines=cines, z=np.asarray(z)[0],
                      x_T=np.asarray(x_T)[0, ..., 0])
  result = {
      "workdir": os.path.abspath(workdir), "checkpoint_step": int(state.step),
      "step_selection": common.step_selection(checkpoint_step),
      "trait": trait, "kind": kind, "direction": direction.to_dict(),
      "num_train_subjects": int(len(train)),
      "standardisation": {"mean": transform.mean.tolist(), "std": transform.std.tolist()},
      "subject": subject, "subject_split": split,
      "subject_trait_value": (None if row is None or not np.isfinite(values[row])
                              else float(values[row])),
      "shift": {"kind": shift, "unit": unit.tolist(),
                "mahalanobis_per_unit": mahalanobis_per_unit,
                "predicted": predicted,
                "predicted_is": "trait" if kind == "linear" else "logit"},
      "steps": steps, "sqrt_d": math.sqrt(dim),
      "latent_shift_norm": [float(np.linalg.norm(m * unit_shift)) for m in steps],
      "inversion_steps": inversion_steps, "decode_steps": decode_steps,
      "ddim_grid": family.ddim_grid,
      "latents_file": latents.path, "latents_file_max_abs_difference": csv_difference,
      "lv_segmentation": lv,
      "blood_pool_proxy": proxy,
      "outputs": {"strip": "strip.png", "gif": "manipulation.gif",
                  "arrays": "manipulation.npz"},
  }
  io.write_json(os.path.join(out, "direction.json"), result)
  return {**result, "output_dir": out}


def define_flags() -> None:
  """The command-line flags; defined only when run as a program."""
  from experiments import common  # pylint: disable=g-import-not-at-top
  common.define_workdir_flag("diffae3d run directory.")
  common.define_step_flag()
  flags.DEFINE_string("trait", "lv_edv_ml", "attributes.csv column, or column:value for a "
                      "binary trait (e.g. group:DCM).")
  flags.DEFINE_enum("kind", None, ["linear", "logistic"], "Direction model (default: logistic "
                    "for column:value traits, else linear).")
  flags.DEFINE_string("subject", None, "Subject to edit (default: the first test subject).")
  flags.DEFINE_list("steps", [f"{m:g}" for m in DEFAULT_STEPS],
                    "m values: z_std' = z_std + m u (u of --shift).")
  flags.DEFINE_enum("shift", "pattern", list(SHIFTS), "Unit shift u: the activation pattern "
                    "of the trait model (m in SDs of its prediction) or the reference's "
                    "sqrt(D) beta.")
  flags.DEFINE_integer("inversion_steps", None, "DDIM inversion steps (default: "
                       "config.eval.inversion_steps).", lower_bound=1)
  flags.DEFINE_integer("decode_steps", None, "DDIM decoding steps (default: "
                       "config.eval.decode_steps).", lower_bound=1)
  common.define_latents_flag()
  common.define_output_dir_flag("Output folder (default: DIR/manipulate/<trait>).")
  flags.DEFINE_float("blood_threshold", DEFAULT_BLOOD_THRESHOLD, "Threshold on [0, 1] of the "
                     "blood-pool area proxy.")
  common.define_seed_flag("Seed of the cross-validation folds.")
  flags.DEFINE_bool("segment", True, "Segment the LV blood pool of the 4-chamber cines (trains "
                    "DIR/segmenter_la_4ch once).")
  flags.DEFINE_integer("segmenter_steps", long_axis_segmenter.DEFAULT_STEPS,
                       "Training steps of the 4-chamber segmenter.", lower_bound=1)
  # Flags defined by experiments.common are this command's: --help lists them.
  flags.adopt_module_key_flags(common)


def main(argv):
  from experiments import common  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  common.start_command(argv, workdir=f.workdir)
  from cardiac_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  workdir_lib.check_output_dir(f.output_dir)
  try:
    steps = [float(m) for m in f.steps]
  except ValueError as e:
    raise app.UsageError(f"--steps must be numbers: {e}")
  result = manipulate(f.workdir, f.trait, kind=f.kind, subject=f.subject, steps=steps,
                      inversion_steps=f.inversion_steps, decode_steps=f.decode_steps,
                      latents_path=f.latents, output_dir=f.output_dir,
                      blood_threshold=f.blood_threshold, seed=f.seed, shift=f.shift,
                      segment=f.segment, segmenter_steps=f.segmenter_steps,
                      checkpoint_step=f.step)
  d, proxy, lv = result["direction"], result["blood_pool_proxy"], result["lv_segmentation"]
  fallback = " (empty-model fallback)" if d["empty_fallback"] else ""
  print(f"{result['trait']} ({result['kind']}): {d['num_nonzero']} non-zero coefficients, "
        f"CV {d['cv_metric']} {d['cv_score']:.3f}{fallback}; shift {result['shift']['kind']}")
  for i, m in enumerate(result["steps"]):
    lv_text = "" if lv is None else f"ED LV area {lv['area_ed_px'][i]} px, "
    print(f"  m={m:+g}: {lv_text}ED blood-pool area {proxy['area_ed_px'][i]} px, predicted "
          f"{result['shift']['predicted_is']} {result['shift']['predicted'][i]:.4g}")
  print(f"Wrote {result['output_dir']}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
