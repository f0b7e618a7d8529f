"""TCAV analysis of a trained temporal VAE-classifier: `python -m experiments.tcav --workdir=DIR`.

Global interpretability (Clough et al. 2019, Table 1 and Fig. 3) of a `temporal_classifier` run:

1. Concept pool (`--concept_pool`), the subjects concepts and random sets are drawn from.
   Clough et al. use "a held out set of 5,000 CAD-negative subjects": subjects the classifier
   never trained on, all of the negative class. The default, held_out_negatives, is that
   protocol: on synthetic data a cohort of `--concept_subjects` extra NOR subjects, generated
   and prepared once like the run's cohort, numbered after its subjects and drawn from separate
   random streams (`data_pipelines.cine.held_out_cine_dir`); on other data the split
   `--concept_split` of `--concept_dir` (default: the run's prepared dataset), refused when it
   holds a positive subject. pooled_train_val pools the classifier's own train and val subjects
   of both classes, an earlier protocol kept for comparison: there any biomarker that tracks the
   label gets a CAV close to the classifier's own decision direction and a TCAV score near 1 by
   construction (the label_proxy control shows it). A pool that shares subjects with the
   classifier's training split or with the explained split is refused unless
   `--allow_overlap`, which the table header then states.
2. Activations. The posterior means M (T, latent) of every pool subject and of the explained
   split (default: test), their 64-unit concept-layer activations a(M) and the classifier logit
   (`TemporalClassifierFamily`). The pass over a split resumes from its finished batches
   (DIR/tcav/partial_*_step<N>).
3. Concepts. Cardiac function biomarkers of each subject from its stored segmentations and whole-
   stack LV volume curve (`cardiac_jax.cardiac.biomarkers`; subjects failing the volume-curve QC
   are excluded from the concept sets, with the reason, in DIR/tcav/biomarkers.csv): low EF, low
   peak ejection rate, low peak filling rate, low atrial peak filling rate, high EDV, high ESV,
   high wall-thickening variance. Controls: a per-subject random number, built to be
   irrelevant; the label proxy, the class label plus such a number, which carries nothing beyond
   the class (noise in a negatives-only pool, the label itself in a pool of both classes); for
   synthetic data, the scanner intensity scale and the image noise level of the generating
   parameters (the classifier sees label maps, so neither can matter). A concept set is the
   `tcav.concept_fraction` of the pool with the lowest (or highest) value, its negative set the
   same share at the other end; the random sets are drawn from the same pool.
4. TCAV (`cardiac_jax.interpret.tcav.run_tcav`): CAVs on the concept layer, directional
   derivatives of the logit for every subject of the explained split, TCAV score (fraction > 0),
   mean derivative, significance against `tcav.num_random_sets` random concepts (two-sided t-test,
   Bonferroni over the concepts) with the spread of the scores across the random runs.

Writes DIR/tcav/:
- protocol.json: the pool protocol, its sources, every pool subject with its split, class label,
  group and QC exclusion, its overlap with the training and explained splits, whether
  --allow_overlap was given, the explained split and its size, the concept fraction and the
  concept and random set sizes;
- table1.md, table1.csv: concept, description, TCAV score, mean derivative, spread, CAV accuracy,
  p-value, significant; the header states the pool (and any allowed overlap), the explained
  split, its AUC and the set sizes;
- results.json: the same plus the AUC and per-run scores;
- pca.png: PCA of the explained split's concept activations coloured by label, each subject's
  logit gradient as an arrow and one concept's CAV (Fig. 3 left);
- interpolation_<concept>.png and .gif: one subject's decoded segmentation sequence after moving
  its latents so that the concept activation moves along -/+ the CAV (Fig. 3 right), with the EF
  of every decoded sequence; interpolation_<concept>.json: those EFs and the logits.

Moving latents along a CAV (`cardiac_jax.interpret.tcav.interpolate_along_cav`): small
minimal-norm steps of the per-frame latents, to -/+ k standard deviations (--sigmas) of the
projection of the concept activation on the unit CAV over the concept pool. The concepts, their
biomarkers and the analysis are `cardiac_jax.interpret.tcav`'s; this command resolves the pool
and the data, runs the model and writes the outputs.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any, Iterable, Sequence

from absl import app, flags

from cardiac_jax.interpret import tcav
from cardiac_jax import io, runtime
from data_pipelines.errors import InvalidArgumentError
from experiments import common

_log = runtime.phase_logger("tcav")

_WORKDIR = common.define_workdir_flag("temporal_classifier run directory.")
_STEP = common.define_step_flag()
HELD_OUT_NEGATIVES, POOLED_TRAIN_VAL = "held_out_negatives", "pooled_train_val"
_CONCEPT_POOL = flags.DEFINE_enum(
    "concept_pool", HELD_OUT_NEGATIVES, [HELD_OUT_NEGATIVES, POOLED_TRAIN_VAL],
    "Subjects of the concept and random sets: held-out negative subjects (Clough et al.), or "
    "the classifier's own train and val subjects of both classes (needs --allow_overlap).")
_CONCEPT_SPLIT = flags.DEFINE_string(
    "concept_split", None, "Split of held-out negative subjects for the concept pool (default "
    "on synthetic data: a generated cohort of --concept_subjects NOR subjects).")
_CONCEPT_DIR = flags.DEFINE_string(
    "concept_dir", None, "Prepared cine dataset holding --concept_split (default: the run's).")
_CONCEPT_SUBJECTS = flags.DEFINE_integer(
    "concept_subjects", 500, "Subjects of the generated held-out NOR cohort (synthetic data).",
    lower_bound=2)
_ALLOW_OVERLAP = flags.DEFINE_bool(
    "allow_overlap", False, "Run even when the concept pool shares subjects with the "
    "classifier's training split or the explained split (the table header says so).")
_EXPLAIN_SPLIT = flags.DEFINE_enum("explain_split", "test", ["train", "val", "test"],
                                   "Split whose subjects are explained (TCAV scores, AUC).")
_NUM_RANDOM = flags.DEFINE_integer("num_random_sets", None,
                                   "Random concepts (default: the run's tcav.num_random_sets).",
                                   lower_bound=1)
_FRACTION = flags.DEFINE_float("concept_fraction", None,
                               "Concept-set share (default: the run's tcav.concept_fraction).")
flags.register_validator("concept_fraction", lambda value: value is None or 0.0 < value < 1.0,
                         "--concept_fraction must be in (0, 1)")
_INTERPOLATE = flags.DEFINE_string("interpolate", "low_ef", "Concept of the interpolation.")
_SUBJECT = flags.DEFINE_string("subject", None,
                               "Subject of the interpolation (default: the first positive "
                               "subject of the explained split).")
_SIGMAS = flags.DEFINE_list("sigmas", ["-2", "-1", "0", "1", "2"],
                            "Interpolation targets in standard deviations of the projection.")
_SEED = common.define_seed_flag("Seed of the CAV splits and random sets.")
# Flags defined by experiments.common are this command's: --help lists them.
flags.adopt_module_key_flags(common)

# ------------------------------------------------------------------------------ biomarkers
def synthetic_parameters(prepared_dir: str) -> dict[str, dict[str, float]]:
  """{subject: {intensity_scale, noise_level}} of the synthetic cohort a prepared dataset was
  made from (its report.json); {} for other data or when the cohort's parameters.csv is gone."""
  from data_pipelines import prepare, synthetic
  recorded = (io.read_json(os.path.join(prepared_dir, prepare.REPORT)) or {}).get(
      "config") or {}
  if recorded.get("dataset") != "synthetic" or not recorded.get("input_dir"):
    return {}
  path = os.path.join(recorded["input_dir"], synthetic.PARAMETERS_CSV)
  if not os.path.exists(path):
    return {}
  return {p.subject: {"intensity_scale": p.intensity_scale, "noise_level": p.noise_level}
          for p in synthetic.read_parameters_csv(path)}



# ------------------------------------------------------------------------------ activations
def model_outputs(family, state, mesh, batches: Iterable[dict], cache_dir: str | None = None
                  ) -> dict[str, Any]:
  """Per subject: mu (N, T, D), concept activations (N, K), logit (N,), label (N,), subject."""
  import jax
  import numpy as np
  from cardiac_jax import training
  _, outputs = training.evaluate(family, state, batches, mesh, cache_dir=cache_dir,
                                 keep=("mu", "logit", "label", "subject", "group"))
  concepts_fn = jax.jit(family.concepts)
  mu = outputs["mu"]
  activations = np.concatenate([np.asarray(concepts_fn(state, mu[i:i + 64]))
                                for i in range(0, len(mu), 64)])
  outputs["concepts"] = activations.astype(np.float64)
  outputs["subject"] = np.asarray([s.decode() if isinstance(s, bytes) else str(s)
                                   for s in outputs["subject"]])
  return outputs



def table_rows(analysis: dict) -> list[dict]:
  rows = []
  for concept in analysis["concepts"]:
    r = analysis["results"][concept.name]
    rows.append({"concept": concept.name, "description": concept.description,
                 "control": concept.control, "tcav_score": round(r.score, 4),
                 "mean_derivative": float(f"{r.mean_derivative:.4g}"),
                 "spread": round(r.spread, 4), "cav_accuracy": round(r.cav_accuracy, 4),
                 "p_value": float(f"{r.p_value:.3g}"), "significant": r.significant})
  return rows


def markdown_table(rows: Sequence[dict], header: str) -> str:
  """`header`, then Table 1: one row per concept."""
  cells = [[r["concept"], r["description"], f"{r['tcav_score']:.3f}",
            f"{r['mean_derivative']:.3g}", f"{r['spread']:.3f}", f"{r['cav_accuracy']:.2f}",
            f"{r['p_value']:.2g}", "yes" if r["significant"] else "no"] for r in rows]
  return f"{header}\n\n" + io.markdown_table(
      ["Concept", "Description", "TCAV score (S > 0)", "mean S", "spread", "CAV acc.",
       "p-value", "significant"], cells, "llrrrrrl")




def label_colours(labels):
  """(..., H, W) canonical labels -> (..., H, W, 3) RGB in [0, 1] (viz.overlay_labels colours)."""
  import numpy as np
  from cardiac_jax import viz
  labels = np.asarray(labels)
  flat = labels.reshape((-1,) + labels.shape[-2:])
  rgb = [viz.overlay_labels(np.zeros(f.shape), f, alpha=1.0) for f in flat]
  return np.stack(rgb).reshape(labels.shape + (3,))


def save_interpolation(out_dir: str, name: str, decoded, targets: Sequence[float],
                       efs: Sequence[float], logits: Sequence[float], subject: str,
                       num_columns: int = 8) -> tuple[str, str]:
  """Strip (rows: targets, columns: frames, middle slice) and a GIF with the targets side by
  side, of (len(targets), T, S, S, 3) decoded label sequences."""
  import numpy as np
  from cardiac_jax import viz
  decoded = np.asarray(decoded)
  t = decoded.shape[1]
  frames = np.unique(np.linspace(0, t - 1, min(num_columns, t)).astype(int))
  rgb = label_colours(decoded[..., 1])                       # Middle slice, (N, T, S, S, 3).
  rows = [[rgb[i, f] for f in frames] for i in range(len(targets))]
  titles = [f"{k:+g}\u03c3: EF {ef:.0f}%, logit {lg:+.2f}"
            for k, ef, lg in zip(targets, efs, logits)]
  png = viz.save_image_grid(os.path.join(out_dir, f"interpolation_{name}.png"), rows,
                            row_titles=titles, col_titles=[f"frame {f}" for f in frames],
                            title=f"{subject}: latents moved along the '{name}' CAV")
  pad = np.ones(rgb.shape[2:3] + (2, 3))
  movie = [np.concatenate([np.concatenate([rgb[i, f], pad], axis=1)
                           for i in range(len(targets))], axis=1) for f in range(t)]
  gif = viz.save_cine_gif(os.path.join(out_dir, f"interpolation_{name}.gif"), np.stack(movie),
                          fps=8, scale=4)
  return png, gif


# ------------------------------------------------------------------------------ figures
def save_pca_figure(path: str, activations, labels, gradients, cav_vector, concept: str,
                    title: str) -> str:
  """Fig. 3 left: PCA of concept activations, coloured by label, logit gradients as arrows,
  the CAV of `concept` from the centre."""
  import numpy as np
  from matplotlib.figure import Figure
  x = np.asarray(activations, np.float64)
  centre = x.mean(axis=0)
  _, _, vt = np.linalg.svd(x - centre, full_matrices=False)
  axes = vt[:2]
  points = (x - centre) @ axes.T
  arrows = np.asarray(gradients, np.float64) @ axes.T
  extent = np.ptp(points, axis=0).max() or 1.0
  arrows *= 0.06 * extent / (np.abs(arrows).max() or 1.0)
  cav = np.asarray(cav_vector, np.float64) @ axes.T
  cav *= 0.35 * extent / (np.linalg.norm(cav) or 1.0)
  fig = Figure(figsize=(6.0, 5.2), dpi=120, layout="constrained")
  ax = fig.add_subplot()
  labels = np.asarray(labels) > 0.5
  for flag, colour, text in ((False, "tab:grey", "negative"), (True, "tab:blue", "positive")):
    p, a = points[labels == flag], arrows[labels == flag]
    ax.scatter(p[:, 0], p[:, 1], s=14, c=colour, label=f"{text} ({len(p)})", zorder=2)
    ax.quiver(p[:, 0], p[:, 1], a[:, 0], a[:, 1], color=colour, angles="xy",
              scale_units="xy", scale=1, width=0.003, alpha=0.7, zorder=1)
  ax.annotate("", xy=tuple(cav), xytext=(0, 0),
              arrowprops=dict(arrowstyle="-|>", color="tab:red", lw=2.5), zorder=3)
  ax.text(cav[0], cav[1], f" CAV '{concept}'", color="tab:red", fontsize=9)
  # Equal, explicit limits: a (nearly) rank-one cloud must not collapse an axis to ~1e-17.
  drawn = np.concatenate([points, points + arrows, cav[None], np.zeros((1, 2))])
  middle = (drawn.max(axis=0) + drawn.min(axis=0)) / 2
  half = 0.55 * max(float(np.ptp(drawn, axis=0).max()), 1e-6)
  ax.set_xlim(middle[0] - half, middle[0] + half)
  ax.set_ylim(middle[1] - half, middle[1] + half)
  ax.set_xlabel("PC 1 of the concept layer")
  ax.set_ylabel("PC 2")
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=8, loc="best")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  return path


# ------------------------------------------------------------------------------ driver
@dataclasses.dataclass(frozen=True)
class PoolSource:
  """A part of the concept pool: split `split` of the prepared cine dataset `directory`, named
  `name` in the outputs."""
  name: str
  directory: str
  split: str


def load_split_examples(directory: str, split: str):
  """Random-access source of one split of a prepared cine dataset."""
  from data_pipelines import prepare
  return prepare.load_split(directory, split)


def split_batches(config, source):
  from data_pipelines import cine
  return cine.eval_batches(source, config.data, batch_size=config.train.eval_batch_size)


def concept_pool_sources(config, run_dir: str, concept_pool: str, concept_split: str | None,
                         concept_dir: str | None, concept_subjects: int) -> list[PoolSource]:
  """Where the concept pool comes from (module docstring, step 1); generates and prepares the
  held-out synthetic cohort on first use. `run_dir`: the run's prepared cine dataset."""
  from data_pipelines import cine
  if concept_pool == POOLED_TRAIN_VAL:
    if concept_split or concept_dir:
      raise InvalidArgumentError(f"--concept_split and --concept_dir name a held-out pool; they "
                                 f"do not apply to --concept_pool={POOLED_TRAIN_VAL}")
    return [PoolSource("train", run_dir, "train"), PoolSource("val", run_dir, "val")]
  if concept_pool != HELD_OUT_NEGATIVES:
    raise InvalidArgumentError(f"--concept_pool={concept_pool!r}: expected "
                               f"{HELD_OUT_NEGATIVES} or {POOLED_TRAIN_VAL}")
  if concept_split:
    directory = os.path.abspath(concept_dir) if concept_dir else run_dir
    return [PoolSource(concept_split, directory, concept_split)]
  if concept_dir:
    raise InvalidArgumentError(f"--concept_dir={concept_dir} needs --concept_split, the split "
                               "of held-out negative subjects in it")
  if concept_subjects < 2:
    raise InvalidArgumentError(f"--concept_subjects={concept_subjects}: the generated concept "
                               "pool needs at least 2 subjects")
  try:
    directory = cine.held_out_cine_dir(config, concept_subjects)
  except ValueError as e:
    raise ValueError(f"{e}. Name a split of held-out negative subjects with --concept_split "
                     "(and --concept_dir when they are prepared apart), or use "
                     f"--concept_pool={POOLED_TRAIN_VAL} --allow_overlap") from None
  return [PoolSource("held_out", directory, cine.HELD_OUT_SPLIT)]


def check_concept_pool(rows: Sequence[dict], where: str, concept_pool: str,
                       training_subjects: Iterable[str], explain_split: str,
                       explained_subjects: Iterable[str], allow_overlap: bool
                       ) -> dict[str, list[str]]:
  """The pool's subjects in the classifier's training split ("train") and in the explained
  split; ValueError when a held-out negatives pool holds a positive subject, or when the pool
  shares subjects with either split and `allow_overlap` is False."""
  from cardiac_jax import structures
  if concept_pool == HELD_OUT_NEGATIVES:
    positives = [r for r in rows if r["label"]]
    if positives:
      groups = sorted({structures.GROUPS[r["group"]] for r in positives})
      raise ValueError(
          f"the concept pool ({where}) holds {len(positives)} positive subject(s) (groups "
          f"{groups} are in the run's data.positive_groups), e.g. "
          f"{[r['subject'] for r in positives[:5]]}: the {HELD_OUT_NEGATIVES} protocol needs "
          "a split of negative subjects only")
  pool = {r["subject"] for r in rows}
  overlap = {"train": sorted(pool & set(training_subjects)),
             explain_split: sorted(pool & set(explained_subjects))}
  shared = {split: subjects for split, subjects in overlap.items() if subjects}
  if shared and not allow_overlap:
    details = "; ".join(f"{len(v)} in the {'classifier training' if k == 'train' else k} "
                        f"split, e.g. {v[:5]}" for k, v in shared.items())
    raise ValueError(f"the concept pool ({where}) shares subjects with the run's splits: "
                     f"{details}. Concept and random sets must come from subjects the "
                     "classifier never trained on and that are not explained; pass "
                     "--allow_overlap to run anyway (the table header then says so)")
  return overlap


def _partial_dir(out_dir: str, source: PoolSource, step: int) -> str:
  """Resume folder of the model pass over one split (its dataset's path in the name, so two
  datasets with a split of the same name never share one)."""
  import hashlib
  digest = hashlib.sha1(f"{source.directory}:{source.split}".encode()).hexdigest()[:8]
  return os.path.join(out_dir, f"partial_{source.name}_{digest}_step{step}")


def pool_description(concept_pool: str, sources: Sequence[PoolSource], num_subjects: int,
                     overlap: dict[str, list[str]], allow_overlap: bool) -> str:
  """The concept-pool clause of the table header."""
  names = "+".join(s.name for s in sources)
  if concept_pool == HELD_OUT_NEGATIVES:
    text = f"concept pool: {num_subjects} held-out negative subjects ({names})"
  else:
    text = f"concept pool: the classifier's own {names} subjects of both classes ({num_subjects})"
  shared = {k: v for k, v in overlap.items() if v}
  if shared:
    text += ("; OVERLAP ALLOWED (--allow_overlap): " + ", ".join(
        f"{len(v)} pool subjects in the {'classifier training' if k == 'train' else k} split"
        for k, v in shared.items()))
  elif allow_overlap:
    text += "; --allow_overlap given, no overlap with the training or explained split"
  else:
    text += "; none in the training or explained split"
  return text


def run(workdir: str, step: int | str | None = None,
        concept_pool: str = HELD_OUT_NEGATIVES, concept_split: str | None = None,
        concept_dir: str | None = None, concept_subjects: int = 500,
        allow_overlap: bool = False, explain_split: str = "test",
        num_random_sets: int | None = None, concept_fraction: float | None = None,
        interpolate: str = "low_ef", subject: str | None = None,
        sigmas: Sequence[float] = (-2, -1, 0, 1, 2), seed: int = 0) -> dict[str, Any]:
  """The whole analysis (module docstring); returns results.json's content."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from cardiac_jax import structures
  from data_pipelines import cine, prepare
  from experiments import common

  from cardiac_jax import families
  families.require(common.load_run_config(workdir).model.family, "concepts", "TCAV", workdir)
  config, family, state, mesh = common.restore_run(workdir, step)
  _log(f"{config.name} step {int(state.step)} of {workdir}")
  if family.input != "sa_label":
    raise ValueError("the interpolation decodes label maps: train with data.input=sa_label")
  tc = config.tcav
  fraction = float(concept_fraction if concept_fraction is not None else tc.concept_fraction)
  num_random = int(num_random_sets if num_random_sets is not None else tc.num_random_sets)
  out_dir = os.path.join(workdir, "tcav")
  os.makedirs(out_dir, exist_ok=True)
  frame_interval = float(tc.cycle_duration_s) / int(config.data.num_frames)
  run_dir = cine.prepared_cine_dir(config)
  splits_path = os.path.join(run_dir, prepare.SPLITS)
  splits = io.read_json(splits_path)
  if splits is None or not isinstance(splits.get("train"), list):
    raise ValueError(f"{splits_path}: missing or without a 'train' list; the concept pool "
                     "cannot be checked against the classifier's training subjects")
  sources = concept_pool_sources(config, run_dir, concept_pool, concept_split, concept_dir,
                                 concept_subjects)
  explained_source = PoolSource(explain_split, run_dir, explain_split)

  def read_rows(source):
    examples = load_split_examples(source.directory, source.split)
    rows = tcav.biomarker_rows((examples[i] for i in range(len(examples))), frame_interval,
                          int(tc.savgol_window), int(tc.savgol_order),
                          synthetic_parameters(source.directory), family.positive_groups)
    return examples, rows

  def outputs_of(source, examples):
    return model_outputs(family, state, mesh, split_batches(config, examples),
                         cache_dir=_partial_dir(out_dir, source, int(state.step)))

  _log("concept pool: biomarkers of " + ", ".join(
      f"split {s.split!r} of {s.directory}" for s in sources))
  pool_parts = [read_rows(source) for source in sources]
  rows = [r for _, part_rows in pool_parts for r in part_rows]
  where = ", ".join(f"split {s.split!r} of {s.directory}" for s in sources)
  overlap = check_concept_pool(rows, where, concept_pool, splits["train"], explain_split,
                               splits.get(explain_split, []), allow_overlap)
  _log(f"concept layer and logits of the {len(rows)} pool subjects")
  pool_outputs = [outputs_of(source, examples) for source, (examples, _) in
                  zip(sources, pool_parts)]
  pool = {k: np.concatenate([p[k] for p in pool_outputs]) for k in pool_outputs[0]}
  _log(f"concept layer, logits and their gradients of the {explain_split} split")
  explained_examples, explained_rows = read_rows(explained_source)
  explained = outputs_of(explained_source, explained_examples)
  split_of = {r["subject"]: source.name for source, (_, part_rows) in zip(sources, pool_parts)
              for r in part_rows}
  io.write_csv(os.path.join(out_dir, "biomarkers.csv"),
               [dict(r, split=split_of[r["subject"]]) for r in rows]
               + [dict(r, split=explain_split) for r in explained_rows])
  excluded = {r["subject"]: r[tcav.QC_FAILED] for r in rows if r[tcav.QC_FAILED]}

  _log(f"CAVs of {len(tcav.CONCEPTS)} concepts and {num_random} random sets, their TCAV "
       "scores and tests")
  analysis = tcav.analyse(family, state, pool, explained, rows, fraction=fraction,
                     num_random_sets=num_random, alpha=float(tc.alpha), seed=seed)
  table = table_rows(analysis)
  pool_text = pool_description(concept_pool, sources, len(rows), overlap, allow_overlap)
  protocol = {
      "concept_pool": concept_pool, "allow_overlap": bool(allow_overlap),
      "sources": [dict(dataclasses.asdict(s), num_subjects=len(part_rows))
                  for s, (_, part_rows) in zip(sources, pool_parts)],
      "generated_subjects": (concept_subjects if concept_pool == HELD_OUT_NEGATIVES
                             and not concept_split else None),
      "overlap": overlap,
      "explained": {"split": explain_split, "directory": run_dir,
                    "num_subjects": len(explained["logit"]),
                    "num_positive": int(np.sum(explained["label"] > 0.5))},
      "concept_fraction": fraction, "concept_set_sizes": analysis["concept_set_sizes"],
      "num_random_sets": num_random, "random_set_size": analysis["set_size"],
      "subjects": [{"subject": r["subject"], "split": split_of[r["subject"]],
                    "label": r["label"],
                    "group": (structures.GROUPS[r["group"]]
                              if 0 <= r["group"] < len(structures.GROUPS) else "unknown"),
                    "excluded_by_qc": r[tcav.QC_FAILED]} for r in rows],
  }
  io.write_json(os.path.join(out_dir, "protocol.json"), protocol)
  header = (f"TCAV of the concept layer, {config.name} step {int(state.step)}: "
            f"{len(explained['logit'])} {explain_split} subjects explained (AUC "
            f"{analysis['auc']:.3f}); {pool_text}; {len(excluded)} excluded by QC; concept "
            f"sets of {analysis['set_size']} or more subjects, {num_random} random sets of "
            f"{analysis['set_size']}; Bonferroni over {len(table)} concepts at alpha "
            f"{float(tc.alpha)}.")
  io.write_text(os.path.join(out_dir, "table1.md"), markdown_table(table, header))
  io.write_csv(os.path.join(out_dir, "table1.csv"), table)

  # Figures: PCA with gradients and the CAV, and the decoded interpolation.
  if interpolate not in analysis["results"]:
    raise InvalidArgumentError(f"--interpolate={interpolate!r} is not a measured concept; "
                               f"measured: {sorted(analysis['results'])}")
  _log(f"figures: PCA of the concept layer, decoded interpolation along {interpolate!r}")
  cav = analysis["results"][interpolate].cav.vector
  save_pca_figure(os.path.join(out_dir, "pca.png"), explained["concepts"], explained["label"],
                  analysis["gradients"], cav, interpolate,
                  f"{explain_split} subjects: PCA of the concept layer, logit gradients, "
                  f"AUC {analysis['auc']:.3f}")
  subjects = list(explained["subject"])
  if subject is None:
    positives = np.flatnonzero(explained["label"] > 0.5)
    index = int(positives[0]) if len(positives) else 0
  elif subject in subjects:
    index = subjects.index(subject)
  else:
    raise InvalidArgumentError(f"--subject={subject} is not in the {explain_split} split")
  unit = cav / np.linalg.norm(cav)
  sigma = float(np.std(pool["concepts"] @ unit)) or 1.0
  targets = [float(s) for s in sigmas]
  latents, achieved = tcav.interpolate_along_cav(family, state, explained["mu"][index], cav,
                                                 sigma, targets)
  decoded = np.asarray(jax.jit(family.decode_labels)(state, jnp.asarray(latents)))
  logits = np.asarray(jax.jit(family.logits)(state, jnp.asarray(latents)))
  volumes = tcav.decoded_lv_voxels(decoded)
  efs = [100.0 * (v.max() - v.min()) / max(v.max(), 1e-9) for v in volumes]
  save_interpolation(out_dir, interpolate, decoded, targets, efs, logits, subjects[index])
  interpolation = {"concept": interpolate, "subject": subjects[index], "sigma": sigma,
                   "targets_sigma": targets, "achieved_sigma": achieved.tolist(),
                   "decoded_ef_percent": [float(e) for e in efs],
                   "logit": logits.tolist()}
  io.write_json(os.path.join(out_dir, f"interpolation_{interpolate}.json"), interpolation)

  result = {"workdir": os.path.abspath(workdir), "step": int(state.step),
            "step_selection": common.step_selection(step),
            "explain_split": explain_split, "concept_pool": concept_pool,
            "pool_sources": protocol["sources"], "allow_overlap": bool(allow_overlap),
            "auc": analysis["auc"], "set_size": analysis["set_size"],
            "num_random_sets": num_random, "excluded_by_qc": excluded,
            "skipped_concepts": analysis["skipped"], "table": table,
            "random_run_scores": {k: r.random_run_scores.tolist()
                                  for k, r in analysis["results"].items()},
            "random_baseline_scores": next(iter(
                analysis["results"].values())).random_baseline_scores.tolist(),
            "interpolation": interpolation}
  io.write_json(os.path.join(out_dir, "results.json"), result)
  for source in [*sources, explained_source]:
    shutil.rmtree(_partial_dir(out_dir, source, int(state.step)), ignore_errors=True)
  return result


def main(argv):
  from experiments import common
  common.start_command(argv, workdir=_WORKDIR.value)
  try:
    sigmas = [float(s) for s in _SIGMAS.value]
  except ValueError as e:
    raise app.UsageError(f"--sigmas must be numbers: {e}")
  result = run(_WORKDIR.value, _STEP.value, concept_pool=_CONCEPT_POOL.value,
               concept_split=_CONCEPT_SPLIT.value, concept_dir=_CONCEPT_DIR.value,
               concept_subjects=_CONCEPT_SUBJECTS.value, allow_overlap=_ALLOW_OVERLAP.value,
               explain_split=_EXPLAIN_SPLIT.value, num_random_sets=_NUM_RANDOM.value,
               concept_fraction=_FRACTION.value, interpolate=_INTERPOLATE.value,
               subject=_SUBJECT.value, sigmas=sigmas,
               seed=_SEED.value)
  with open(os.path.join(_WORKDIR.value, "tcav", "table1.md"), encoding="utf-8") as f:
    print(f.read())
  inter = result["interpolation"]
  print(f"interpolation of {inter['subject']} along '{inter['concept']}': decoded EF "
        + ", ".join(f"{t:+g}\u03c3 {e:.0f}%" for t, e in zip(inter["targets_sigma"],
                                                          inter["decoded_ef_percent"])))


if __name__ == "__main__":
  app.run(main)
