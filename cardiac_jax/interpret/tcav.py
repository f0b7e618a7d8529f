"""Testing with concept activation vectors (TCAV) on a layer of a classifier.

Kim et al. 2018, "Interpretability beyond feature attribution: quantitative testing with concept
activation vectors", as used by Clough et al. 2019 on the 64-unit concept layer of the temporal
VAE-classifier (`cardiac_jax.models.temporal_classifier`):

- CAV: an L2-regularised logistic regression separates the layer activations of a concept set
  (label 1) from those of a negative set (label 0), both truncated to the same size; a third
  (`test_fraction` = 0.33) of each set is held out to measure the CAV's accuracy. The CAV is
  the normal vector of the decision boundary, pointing toward the concept, not normalised.
- Directional derivative S_c(x) = grad_a logit(a(x)) . v_c, the gradient of the class logit
  with respect to the layer activation a (jax.grad of a pure function of a).
- TCAV score = fraction of examples with S_c(x) > 0; Clough et al. also report mean_x S_c(x).
- Significance: with N random sets drawn from the same pool, the CAVs "concept vs random_j" and
  "random_i vs random_j" (i = j + 1 mod N) give N concept and N random TCAV scores; a two-sided
  Student t-test compares them, and a concept is significant when p < alpha / (number of
  concepts) (Bonferroni). The spread (standard deviation) of the concept scores across the
  random runs is reported because TCAV scores are unstable with few random sets.
- Concepts from a continuous biomarker (Clough et al.): in a held-out set, the examples with the
  lowest (or highest) `fraction` of its values are the concept set, those at the other end the
  negative set ("low EF" = lowest EF vs highest EF). That set and the random sets come from one
  pool of examples the classifier never trained on, all of one class (Clough et al.: 5,000
  CAD-negative subjects). In a pool of both classes any concept that tracks the class label
  separates the classes, so its CAV is close to the classifier's own decision direction and it
  comes out significant whatever it means.

Everything is numpy except the gradients (JAX). The logistic regression is solved by Newton's
method (the problem is small and strictly convex with the L2 term), so a CAV is deterministic
given the seed that draws the truncation and the held-out split.

The concepts of Clough et al. (`CONCEPTS`) are ends of cardiac function biomarkers of a
subject's segmentation sequence (`subject_biomarkers`, `biomarker_rows`), with control concepts
built to be irrelevant; `analyse` runs TCAV for all of them on a classifier family.

Moving latents along a CAV (`interpolate_along_cav`): the CAV lives in the concept layer, the
decoder reads the per-frame latents M. The walk takes small minimal-norm steps,
M <- M + d g / |g|^2 with g = grad_M (a(M) . v / |v|), each moving the projection of the concept
activation on the unit CAV by d to first order (re-linearised at every step).
"""

from __future__ import annotations

import dataclasses
import warnings
import zlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats


@dataclasses.dataclass(frozen=True)
class CAV:
  """vector: (D,) normal toward the concept; intercept; accuracy: held-out accuracy in [0, 1]."""
  vector: np.ndarray
  intercept: float
  accuracy: float


def _check_activations(x, name: str) -> np.ndarray:
  x = np.asarray(x, dtype=np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f"{name}: expected (N, D) activations with N >= 2, got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name}: activations have non-finite values")
  return x


def fit_logistic_regression(x: np.ndarray, y: np.ndarray, l2: float = 0.01,
                            max_iterations: int = 100,
                            tolerance: float = 1e-10) -> tuple[np.ndarray, float]:
  """Minimises mean_i logloss(y_i, w . x_i + b) + l2/2 |w|^2 (b unpenalised) by Newton's method.

  Args:
    x: (N, D) features; y: (N,) labels in {0, 1}.
  Returns:
    (w (D,), b).
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  n, d = x.shape
  design = np.concatenate([x, np.ones((n, 1))], axis=1)
  penalty = np.full(d + 1, float(l2))
  penalty[-1] = 1e-8  # Keeps the Hessian invertible for the (effectively free) intercept.
  theta = np.zeros(d + 1)
  for _ in range(max_iterations):
    p = 1.0 / (1.0 + np.exp(-(design @ theta)))
    gradient = design.T @ (p - y) / n + penalty * theta
    hessian = (design * (p * (1 - p))[:, None]).T @ design / n + np.diag(penalty)
    step = np.linalg.solve(hessian, gradient)
    theta -= step
    if np.max(np.abs(step)) < tolerance:
      break
  return theta[:-1], float(theta[-1])


def train_cav(concept_activations, negative_activations, seed: int = 0,
              test_fraction: float = 0.33, l2: float = 0.01) -> CAV:
  """CAV separating concept (N_c, D) from negative (N_n, D) activations (module docstring)."""
  concept = _check_activations(concept_activations, "concept set")
  negative = _check_activations(negative_activations, "negative set")
  if concept.shape[1] != negative.shape[1]:
    raise ValueError(f"concept ({concept.shape[1]}) and negative ({negative.shape[1]}) "
                     "activations have different widths")
  if not 0 < test_fraction < 1:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  rng = np.random.default_rng(seed)
  size = min(len(concept), len(negative))
  concept = concept[rng.permutation(len(concept))[:size]]
  negative = negative[rng.permutation(len(negative))[:size]]
  num_test = max(1, int(round(test_fraction * size)))
  if size - num_test < 1:
    raise ValueError(f"sets of {size} examples are too small to hold out {test_fraction:.0%}")
  train_x = np.concatenate([concept[num_test:], negative[num_test:]])
  train_y = np.concatenate([np.ones(size - num_test), np.zeros(size - num_test)])
  test_x = np.concatenate([concept[:num_test], negative[:num_test]])
  test_y = np.concatenate([np.ones(num_test), np.zeros(num_test)])
  w, b = fit_logistic_regression(train_x, train_y, l2)
  accuracy = float(np.mean(((test_x @ w + b) > 0) == (test_y > 0.5)))
  return CAV(vector=w, intercept=b, accuracy=accuracy)


def logit_gradients(logit_fn: Callable[[jax.Array], jax.Array], activations) -> np.ndarray:
  """grad_a logit(a) for every row of (N, D) activations; logit_fn maps (D,) -> scalar."""
  a = jnp.asarray(_check_activations(activations, "activations"), jnp.float32)
  return np.asarray(jax.jit(jax.vmap(jax.grad(logit_fn)))(a), np.float64)


def directional_derivatives(gradients, cav_vector) -> np.ndarray:
  """(N, D) logit gradients . (D,) CAV -> (N,) S_c(x)."""
  return np.asarray(gradients, np.float64) @ np.asarray(cav_vector, np.float64)


def tcav_score(derivatives) -> float:
  """Fraction of examples whose directional derivative is positive."""
  return float(np.mean(np.asarray(derivatives) > 0))


def concept_sets(values, activations, fraction: float = 0.2,
                 direction: str = "low") -> tuple[np.ndarray, np.ndarray]:
  """(concept, negative) activations from a biomarker over a held-out set.

  Args:
    values: (N,) biomarker values; NaN entries (not measurable) are ignored.
    activations: (N, D) layer activations of the same examples.
    fraction: share of the measurable examples in each set (0.2 = 1000 of 5000 in the paper).
    direction: "low" (concept = lowest values, e.g. low EF) or "high".
  """
  values = np.asarray(values, np.float64)
  activations = np.asarray(activations)
  if values.shape != activations.shape[:1]:
    raise ValueError(f"{values.shape[0]} biomarker values for {activations.shape[0]} "
                     "activation rows")
  if direction not in ("low", "high"):
    raise ValueError(f"direction must be 'low' or 'high', got {direction!r}")
  if not 0 < fraction <= 0.5:
    raise ValueError(f"fraction must be in (0, 0.5], got {fraction}")
  valid = np.flatnonzero(np.isfinite(values))
  count = int(fraction * len(valid))
  if count < 2:
    raise ValueError(f"only {len(valid)} measurable values: a {fraction:.0%} concept set would "
                     "hold fewer than 2 examples")
  # Stable sort: ties keep the example order, so the sets are reproducible.
  order = valid[np.argsort(values[valid], kind="stable")]
  low, high = activations[order[:count]], activations[order[-count:]]
  return (low, high) if direction == "low" else (high, low)


def random_sets(pool_activations, num_sets: int, size: int, seed: int = 0) -> list[np.ndarray]:
  """`num_sets` random subsets (without replacement) of `size` rows of the (N, D) pool."""
  pool = _check_activations(pool_activations, "random pool")
  if size > len(pool) or size < 2:
    raise ValueError(f"random sets of {size} rows need 2 <= size <= pool size {len(pool)}")
  rng = np.random.default_rng(seed)
  return [pool[rng.choice(len(pool), size, replace=False)] for _ in range(num_sets)]


@dataclasses.dataclass(frozen=True)
class ConceptResult:
  """TCAV of one concept.

  score: fraction of examples with S > 0 for the concept-vs-negative CAV; mean_derivative:
  mean S; cav_accuracy: its held-out accuracy; random_run_scores: (N,) scores of the
  concept-vs-random_j CAVs, random_baseline_scores: (N,) of the random_i-vs-random_j CAVs;
  spread: std of random_run_scores; p_value (two-sided t-test of the two); significant:
  p < alpha / number of concepts.
  """
  name: str
  score: float
  mean_derivative: float
  cav_accuracy: float
  cav: CAV
  random_run_scores: np.ndarray
  random_baseline_scores: np.ndarray
  spread: float
  p_value: float
  significant: bool


def two_sided_t_test(a, b) -> float:
  """p-value of Student's two-sample t-test (equal variances) of a vs b.

  Two sets without variance give p = 0 when their means differ and 1 when they are equal
  (scipy returns NaN there): constant TCAV scores of 1.0 against constant 0.0 are a clear
  difference, identical constants none.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if np.ptp(a) == 0 and np.ptp(b) == 0:
    return 0.0 if a[0] != b[0] else 1.0
  with warnings.catch_warnings():
    # One constant sample (all scores 1.0) is a normal outcome, not a precision problem.
    warnings.filterwarnings("ignore", "Precision loss", RuntimeWarning)
    return float(stats.ttest_ind(a, b, equal_var=True).pvalue)


def random_baseline_scores(gradients, random_activation_sets: Sequence[np.ndarray],
                           seed: int = 0, test_fraction: float = 0.33,
                           l2: float = 0.01) -> np.ndarray:
  """(N,) TCAV scores of the CAVs random_{j+1 mod N} vs random_j (shared by all concepts)."""
  n = len(random_activation_sets)
  if n < 2:
    raise ValueError(f"significance needs at least 2 random sets, got {n}")
  return np.array([
      tcav_score(directional_derivatives(gradients, train_cav(
          random_activation_sets[(j + 1) % n], random_activation_sets[j], seed=seed + j,
          test_fraction=test_fraction, l2=l2).vector))
      for j in range(n)])


def run_tcav(gradients, concepts: Mapping[str, tuple[np.ndarray, np.ndarray]],
             random_activation_sets: Sequence[np.ndarray], alpha: float = 0.05, seed: int = 0,
             test_fraction: float = 0.33, l2: float = 0.01) -> dict[str, ConceptResult]:
  """TCAV with significance testing for several concepts of one layer.

  Args:
    gradients: (N, D) logit gradients at the layer for the examples being explained
      (`logit_gradients`).
    concepts: name -> (concept (N_c, D), negative (N_n, D)) activations (`concept_sets`).
    random_activation_sets: N >= 2 (N_r, D) random sets of the same layer (`random_sets`).
    alpha: family-wise significance level, Bonferroni-divided by the number of concepts.
  """
  gradients = _check_activations(gradients, "gradients")
  baseline = random_baseline_scores(gradients, random_activation_sets, seed, test_fraction, l2)
  results = {}
  for name, (concept, negative) in concepts.items():
    cav = train_cav(concept, negative, seed=seed, test_fraction=test_fraction, l2=l2)
    derivatives = directional_derivatives(gradients, cav.vector)
    runs = np.array([
        tcav_score(directional_derivatives(gradients, train_cav(
            concept, random_set, seed=seed + j, test_fraction=test_fraction, l2=l2).vector))
        for j, random_set in enumerate(random_activation_sets)])
    p_value = two_sided_t_test(runs, baseline)
    results[name] = ConceptResult(
        name=name, score=tcav_score(derivatives), mean_derivative=float(np.mean(derivatives)),
        cav_accuracy=cav.accuracy, cav=cav, random_run_scores=runs,
        random_baseline_scores=baseline, spread=float(np.std(runs)), p_value=p_value,
        significant=bool(p_value < alpha / max(len(concepts), 1)))
  return results


# ------------------------------------------------------------------------------ concepts
QC_FAILED = "qc_failed"


@dataclasses.dataclass(frozen=True)
class Concept:
  """A TCAV concept: the `direction` ("low"/"high") end of biomarker `key`."""
  name: str
  key: str
  direction: str
  description: str
  control: bool = False      # Built to be irrelevant to the label.


CONCEPTS = (
    Concept("low_ef", "lv_ef", "low", "low LV ejection fraction"),
    Concept("low_per", "peak_ejection_rate_ml_s", "low", "low peak ejection rate"),
    Concept("low_pfr", "peak_filling_rate_ml_s", "low", "low peak filling rate"),
    Concept("low_apfr", "atrial_peak_filling_rate_ml_s", "low", "low atrial peak filling rate"),
    Concept("high_edv", "lv_edv_ml", "high", "high LV end-diastolic volume"),
    Concept("high_esv", "lv_esv_ml", "high", "high LV end-systolic volume"),
    Concept("high_wtv", "wall_thickening_variance", "high",
            "high variance of LV wall thickening over 6 segments"),
    Concept("random", "random_attribute", "high",
            "control: a random number per subject", control=True),
    Concept("label_proxy", "label_proxy", "high",
            "control: the class label plus a random number (nothing beyond the class)",
            control=True),
    Concept("high_intensity", "intensity_scale", "high",
            "control: scanner intensity scale (synthetic)", control=True),
    Concept("high_noise", "noise_level", "high",
            "control: image noise level (synthetic)", control=True),
)
BIOMARKER_KEYS = ("lv_edv_ml", "lv_esv_ml", "lv_ef", "peak_ejection_rate_ml_s",
                  "peak_filling_rate_ml_s", "atrial_peak_filling_rate_ml_s",
                  "wall_thickening_variance")



def random_attribute(subject: str, salt: str = "") -> float:
  """A uniform number in [0, 1) that depends only on the subject id and `salt` (controls)."""
  return float(np.random.default_rng(zlib.crc32((salt + subject).encode("utf-8"))).random())


def label_proxy(subject: str, label: int) -> float:
  """The class label plus a uniform number in [0, 1) of the subject: orders every positive
  above every negative and carries nothing else (a control concept)."""
  return float(label) + random_attribute(subject, salt="label_proxy:")


def subject_biomarkers(labels, volumes_ml, pixel_spacing_mm: float, slice_thickness_mm: float,
                       frame_interval_s: float, window_length: int, polyorder: int
                       ) -> dict[str, Any]:
  """Biomarkers of one subject (T, S, S, 3) label sequence; NaN values and the reason when the
  volume-curve QC fails or a measurement is impossible."""
  from cardiac_jax import cardiac
  spacing = (float(pixel_spacing_mm), float(pixel_spacing_mm), float(slice_thickness_mm))
  try:
    values = cardiac.biomarkers(np.asarray(labels), spacing, frame_interval_s, window_length,
                                polyorder, volumes_ml=np.asarray(volumes_ml, np.float64))
  except ValueError as e:
    return {**{k: float("nan") for k in BIOMARKER_KEYS}, QC_FAILED: f"not measurable: {e}"}
  out = {k: float(values[k]) for k in BIOMARKER_KEYS}
  if not values["qc_passed"]:
    out = {k: float("nan") for k in BIOMARKER_KEYS}
    out[QC_FAILED] = values["qc_reason"]
  else:
    out[QC_FAILED] = ""
  return out



def biomarker_rows(examples: Iterable[dict], frame_interval_s: float, window_length: int,
                   polyorder: int, parameters: dict[str, dict[str, float]],
                   positive_groups: Sequence[int]) -> list[dict]:
  """One row per stored cine example: subject, group, class label (group in the group indices
  `positive_groups`), biomarkers, control attributes."""
  rows = []
  for example in examples:
    subject = example["subject"]
    subject = subject.decode("utf-8") if isinstance(subject, bytes) else str(subject)
    group = int(example["group"])
    row = {"subject": subject, "group": group, "label": int(group in positive_groups)}
    row.update(subject_biomarkers(example["sa_label"], example["lv_volume_ml"],
                                  example["pixel_spacing_mm"], example["slice_thickness_mm"],
                                  frame_interval_s, window_length, polyorder))
    row["random_attribute"] = random_attribute(subject)
    row["label_proxy"] = label_proxy(subject, row["label"])
    extra = parameters.get(subject, {})
    row["intensity_scale"] = float(extra.get("intensity_scale", float("nan")))
    row["noise_level"] = float(extra.get("noise_level", float("nan")))
    rows.append(row)
  return rows


def concept_values(rows: Sequence[dict], subjects: Sequence[str], key: str):
  """(N,) values of `key` for `subjects` in order (NaN when missing or failing QC)."""
  by_subject = {r["subject"]: r for r in rows}
  missing = [s for s in subjects if s not in by_subject]
  if missing:
    raise ValueError(f"{len(missing)} subjects have no biomarker row, e.g. {missing[:3]}")
  return np.asarray([by_subject[s][key] for s in subjects], np.float64)


def analyse(family, state, pool: dict, explained: dict, rows: Sequence[dict], *,
            fraction: float, num_random_sets: int, alpha: float, seed: int = 0,
            concepts: Sequence[Concept] = CONCEPTS) -> dict[str, Any]:
  """TCAV of every measurable concept.

  Args:
    pool: `model_outputs` of the concept pool; explained: of the explained split.
    rows: `biomarker_rows` of every subject in `pool`.
  Returns:
    {"results": {name: ConceptResult}, "skipped": {name: reason}, "gradients": (N, K),
     "concepts": the Concept objects used, "auc": AUC of the explained split, "set_size": the
     size of the random sets, "concept_set_sizes": {name: [concept, negative] set sizes}}.
  """
  from cardiac_jax.metrics.classification import roc_auc
  classifier_params = state.params["classifier"]

  def logit_fn(a):
    return family.head(classifier_params, a[None])[0]

  gradients = logit_gradients(logit_fn, explained["concepts"])
  sets, used, skipped = {}, [], {}
  for concept in concepts:
    values = concept_values(rows, pool["subject"], concept.key)
    try:
      sets[concept.name] = concept_sets(values, pool["concepts"], fraction,
                                             concept.direction)
      used.append(concept)
    except ValueError as e:
      skipped[concept.name] = str(e)
  if not sets:
    raise ValueError(f"no concept could be measured: {skipped}")
  size = min(min(len(c), len(n)) for c, n in sets.values())
  randoms = random_sets(pool["concepts"], num_random_sets, size, seed=seed)
  results = run_tcav(gradients, sets, randoms, alpha=alpha, seed=seed)
  return {"results": results, "skipped": skipped, "gradients": gradients, "concepts": used,
          "auc": roc_auc(explained["logit"], explained["label"]), "set_size": size,
          "concept_set_sizes": {name: [len(c), len(n)] for name, (c, n) in sets.items()}}


def interpolate_along_cav(family, state, mu, cav_vector, sigma: float,
                          targets: Sequence[float], substeps: int = 4):
  """Latents of one subject moved so that its concept activation's projection on the unit CAV
  changes by targets[k] * sigma (module docstring, "Moving latents along a CAV").

  Args:
    mu: (T, D) posterior means of the subject.
    cav_vector: (K,) CAV in the concept layer.
    sigma: standard deviation of the projection over the concept pool.
    targets: offsets in units of sigma (0 = the subject itself).
  Returns:
    (len(targets), T, D) latents and (len(targets),) achieved projection offsets / sigma.
  """
  unit = jnp.asarray(cav_vector / np.linalg.norm(cav_vector), jnp.float32)

  def projection(m):
    return jnp.dot(family.concepts(state, m[None])[0], unit)

  value_and_grad = jax.jit(jax.value_and_grad(projection))

  @jax.jit
  def walk(m, delta):
    def body(m, _):
      _, g = jax.value_and_grad(projection)(m)
      return m + delta * g / jnp.maximum(jnp.sum(g * g), 1e-12), None
    return jax.lax.scan(body, m, None, length=substeps)[0]

  start = jnp.asarray(mu, jnp.float32)
  base = float(value_and_grad(start)[0])
  latents, achieved = [], []
  for target in targets:
    m = start
    # Walk in unit-sigma legs so a far target is approached step by step.
    legs = max(1, int(np.ceil(abs(target))))
    for _ in range(legs):
      m = walk(m, jnp.float32(target * sigma / (legs * substeps)))
    latents.append(np.asarray(m))
    achieved.append((float(value_and_grad(m)[0]) - base) / sigma)
  return np.stack(latents), np.asarray(achieved)


def decoded_lv_voxels(labels):
  """(N, T, S, S, 3) decoded label sequences -> (N, T) LV blood-pool voxels of the 3 slices
  (EF = (max - min) / max of this curve needs no spacing)."""
  from cardiac_jax import structures
  return np.sum(np.asarray(labels) == structures.LV_BLOOD_POOL, axis=(2, 3, 4)).astype(float)
