"""Latent-space interpretability metrics for continuous attributes (AR-VAE definitions).

Given codes z (N, D) of an evaluated split and continuous clinical attributes a (N, A) (e.g.
lv_edv_ml, rv_edv_ml, myo_ed_ml), this module computes the metrics reported by the
attribute-regularised VAE papers (Pati & Lerch 2021, AR-VAE; the AR-SIVAE cardiac papers):

- Interpretability: d* = argmax_d MI(z_d; a); score = R^2 of the 1-D least-squares fit
  a ~ z_d* with intercept, on the same samples (in-sample R^2, equal to corr(z_d*, a)^2).
- MIG (Chen et al. 2018, continuous version): m = MI matrix (codes x attributes),
  H_a = MI(a; a) with the same estimator; MIG_a = (m_(1),a - m_(2),a) / H_a.
- SAP (Kumar et al. 2018, continuous version): S_ia = Cov(z_i, a)^2 / (Var z_i Var a) (0 when
  Var z_i <= 1e-12); SAP_a = top-1 minus top-2 of S_.a over codes.
- SCC: S_ia = |Spearman rho(z_i, a)| if its two-sided p-value <= 0.05 else 0; SCC_a = max_i S_ia.
- Modularity (Ridgeway & Mozer 2018): per code theta_i = max_a m_ia^2,
  delta_i = (sum_a m_ia^2 - theta_i) / (theta_i (A - 1)), mod_i = 1 - delta_i (0 if theta_i = 0);
  score = mean over codes.

and two disentanglement_lib metrics (Locatello et al. 2019):

- Binned MIG: every code and every attribute cut into 20 equal-width bins over the evaluated
  samples (the library's histogram discretiser; it has discrete factors, our attributes are
  volumes, so they are binned too), MI of the bin labels with sklearn's `mutual_info_score`,
  MIG_a = (m_(1),a - m_(2),a) / H(binned a).
- DCI (Eastwood & Williams 2018): one gradient-boosted tree ensemble per attribute
  (sklearn's defaults, as the library) predicts the attribute from all codes; the attributes
  stay continuous, so the learner is `GradientBoostingRegressor` (squared error) instead of the
  library's classifier, and informativeness is the R^2 on a held-out third of the samples
  (the library's 10000 / 5000 train / test proportion) instead of the accuracy. Importance
  R_ia = the impurity importance of code i for attribute a; disentanglement
  D = sum_i rho_i (1 - H_A(P_i.)), completeness C = sum_a rho_a (1 - H_D(P_.a)) with P the
  row / column normalised R, rho the share of total importance and H_K the entropy in base K.

The reference evaluations (ar-vae `ImageVAETrainer.compute_representations`, AR-SIVAE
`DownstreamEvaluator.compute_latent_representations`) compute their metrics on one unseeded
draw z ~ q(z|x) per test image, not on the posterior means: ar-vae on its test split, AR-SIVAE
on the ACDC test subjects, one basal slice each. `posterior_codes` makes those codes, one draw
per subject (one slice per subject here too) from a seeded generator, and
`posterior_code_metrics` reports every metric for the sampled codes and for the means side by
side (disentanglement_lib itself scores the means). AR-SIVAE scores SAP, SCC and modularity
against every column of its attribute table; here all metrics use the given attributes.

Mutual information uses the Kraskov-Stoegbauer-Grassberger estimator (Phys. Rev. E 69, 066138,
2004, algorithm 1) with k = 3 neighbours, implemented here rather than taken from
`sklearn.feature_selection.mutual_info_regression`, whose results have changed across sklearn
versions. It follows the same conventions as that function: both variables are scaled to unit
standard deviation, tiny Gaussian noise (1e-10 of the scale, from a fixed seed) breaks ties,
and negative estimates are clipped to 0. MI is in nats.

Everything here is numpy/scipy/scikit-learn on the host; results are plain python floats and
ints so that they can be written to JSON directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import spatial, special, stats

# Codes whose variance is below this are treated as collapsed (the AR-VAE SAP convention).
_MIN_CODE_VARIANCE = 1e-12
_SCC_P_THRESHOLD = 0.05
# Relative amplitude of the tie-breaking noise recommended by Kraskov et al. for data with
# repeated values (quantised attributes, collapsed codes).
_TIE_BREAK_NOISE = 1e-10
# disentanglement_lib's histogram discretiser setting for MIG.
DEFAULT_NUM_BINS = 20
# Share of the samples DCI holds out for informativeness (disentanglement_lib: 5000 of 15000).
DCI_HELD_OUT_FRACTION = 1.0 / 3.0
# disentanglement_lib adds this to the importances so that a code (or attribute) with zero
# total importance has a defined, maximal entropy.
_DCI_ENTROPY_OFFSET = 1e-11
# What evaluate's --codes selects: one draw from q(z|x) per subject, or its mean.
CODE_PROTOCOLS = ("sampled", "mean")


def _as_matrix(values, name: str) -> np.ndarray:
  """Returns a finite float64 (N, K) matrix; a 1-D input becomes (N, 1)."""
  array = np.asarray(values, dtype=np.float64)
  if array.ndim == 1:
    array = array[:, None]
  if array.ndim != 2:
    raise ValueError(f"{name} must be a (N, K) matrix, got shape {array.shape}")
  if not np.all(np.isfinite(array)):
    bad = np.argwhere(~np.isfinite(array))[0]
    raise ValueError(f"{name} holds a non-finite value at row {bad[0]}, column {bad[1]}")
  return array


def _prepare_for_knn(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Scales to unit standard deviation and adds tie-breaking noise (as KSG recommend)."""
  std = x.std()
  if std > 0:
    x = x / std
  return x + _TIE_BREAK_NOISE * max(1.0, float(np.mean(np.abs(x)))) * rng.standard_normal(x.size)


def _count_strictly_within(sorted_values: np.ndarray, centres: np.ndarray,
                           radii: np.ndarray) -> np.ndarray:
  """For each centre, how many other values lie strictly within `radius` of it (1-D)."""
  upper = np.searchsorted(sorted_values, centres + radii, side="left")
  lower = np.searchsorted(sorted_values, centres - radii, side="right")
  # The centre itself is always inside its own open interval.
  return upper - lower - 1


def _ksg_prepared(x: np.ndarray, y: np.ndarray, n_neighbors: int) -> float:
  """KSG algorithm 1 on already scaled and jittered 1-D samples."""
  n = x.size
  joint = np.stack([x, y], axis=1)
  # k + 1 because the query point itself is returned at distance 0.
  distances, _ = spatial.cKDTree(joint).query(joint, k=n_neighbors + 1, p=np.inf)
  eps = distances[:, -1]
  n_x = _count_strictly_within(np.sort(x), x, eps)
  n_y = _count_strictly_within(np.sort(y), y, eps)
  mi = (special.digamma(n) + special.digamma(n_neighbors)
        - np.mean(special.digamma(n_x + 1) + special.digamma(n_y + 1)))
  return max(0.0, float(mi))


def _check_sample_count(n: int, n_neighbors: int) -> None:
  if n_neighbors < 1:
    raise ValueError(f"n_neighbors must be >= 1, got {n_neighbors}")
  if n <= n_neighbors:
    raise ValueError(f"the kNN mutual information estimator needs more than n_neighbors="
                     f"{n_neighbors} samples, got {n}")


def ksg_mutual_information(x, y, n_neighbors: int = 3, seed: int = 0) -> float:
  """Kraskov (KSG, algorithm 1) estimate of MI(x; y) in nats between two 1-D samples.

  Args:
    x, y: (N,) samples of two continuous variables.
    n_neighbors: k of the estimator (3 in the AR-VAE evaluation).
    seed: seed of the tie-breaking noise; the estimate is deterministic given it.

  Returns:
    max(0, psi(N) + psi(k) - <psi(n_x + 1) + psi(n_y + 1)>).
  """
  x = _as_matrix(x, "x")[:, 0]
  y = _as_matrix(y, "y")[:, 0]
  if x.size != y.size:
    raise ValueError(f"x and y have different numbers of samples: {x.size} vs {y.size}")
  _check_sample_count(x.size, n_neighbors)
  rng = np.random.default_rng(seed)
  return _ksg_prepared(_prepare_for_knn(x, rng), _prepare_for_knn(y, rng), n_neighbors)


def mutual_information_matrix(latents, attributes, n_neighbors: int = 3,
                              seed: int = 0) -> np.ndarray:
  """KSG mutual information between every code and every attribute.

  Args:
    latents: (N, D) codes.
    attributes: (N, A) continuous attributes.
    n_neighbors: k of the estimator.
    seed: seed of the tie-breaking noise.

  Returns:
    (D, A) matrix m with m[d, a] = MI(z_d; a) in nats.
  """
  latents = _as_matrix(latents, "latents")
  attributes = _as_matrix(attributes, "attributes")
  _check_same_rows(latents, attributes)
  _check_sample_count(latents.shape[0], n_neighbors)
  rng = np.random.default_rng(seed)
  # Each column is scaled and jittered once so that every pair sees the same samples.
  codes = [_prepare_for_knn(latents[:, d], rng) for d in range(latents.shape[1])]
  attrs = [_prepare_for_knn(attributes[:, a], rng) for a in range(attributes.shape[1])]
  return np.array([[_ksg_prepared(z, a, n_neighbors) for a in attrs] for z in codes])


def attribute_self_information(attributes, n_neighbors: int = 3, seed: int = 0) -> np.ndarray:
  """H_a = MI(a; a) per attribute with the KSG estimator (the MIG normaliser of AR-VAE).

  Both copies of a receive independent tie-breaking noise, as when the estimator is called on
  (a, a); the value is close to psi(N) - psi(k).

  Args:
    attributes: (N, A) continuous attributes.

  Returns:
    (A,) self-information in nats.
  """
  attributes = _as_matrix(attributes, "attributes")
  _check_sample_count(attributes.shape[0], n_neighbors)
  rng = np.random.default_rng(seed)
  return np.array([
      _ksg_prepared(_prepare_for_knn(column, rng), _prepare_for_knn(column, rng), n_neighbors)
      for column in attributes.T])


def _rank_columns(values: np.ndarray) -> np.ndarray:
  return stats.rankdata(values, axis=0)


def _pearson_matrix(left: np.ndarray, right: np.ndarray) -> np.ndarray:
  """Pearson r between every column of left (N, D) and right (N, A); 0 for constant columns."""
  left = left - left.mean(axis=0)
  right = right - right.mean(axis=0)
  norms = np.outer(np.sqrt((left ** 2).sum(axis=0)), np.sqrt((right ** 2).sum(axis=0)))
  with np.errstate(invalid="ignore", divide="ignore"):
    r = (left.T @ right) / norms
  r = np.where(norms > 0, r, 0.0)
  return np.clip(r, -1.0, 1.0)


def spearman_matrix(latents, attributes) -> tuple[np.ndarray, np.ndarray]:
  """Spearman rank correlation and its two-sided p-value for every (code, attribute) pair.

  Ties get average ranks; p-values come from the t distribution with N - 2 degrees of freedom
  (the `scipy.stats.spearmanr` convention). A constant column gets rho = 0 and p = 1.

  Args:
    latents: (N, D) codes.
    attributes: (N, A) attributes.

  Returns:
    rho (D, A) and p (D, A).
  """
  latents = _as_matrix(latents, "latents")
  attributes = _as_matrix(attributes, "attributes")
  _check_same_rows(latents, attributes)
  n = latents.shape[0]
  if n < 3:
    raise ValueError(f"Spearman p-values need at least 3 samples, got {n}")
  rho = _pearson_matrix(_rank_columns(latents), _rank_columns(attributes))
  dof = n - 2
  with np.errstate(divide="ignore"):
    t = np.abs(rho) * np.sqrt(dof / np.maximum(1.0 - rho ** 2, 0.0))
  p = 2.0 * stats.t.sf(t, dof)
  return rho, np.minimum(p, 1.0)


def squared_correlation_matrix(latents, attributes) -> np.ndarray:
  """SAP score matrix S_ia = Cov(z_i, a)^2 / (Var z_i Var a), 0 for collapsed codes.

  Args:
    latents: (N, D) codes.
    attributes: (N, A) attributes.

  Returns:
    (D, A) matrix of squared Pearson correlations.
  """
  latents = _as_matrix(latents, "latents")
  attributes = _as_matrix(attributes, "attributes")
  _check_same_rows(latents, attributes)
  scores = _pearson_matrix(latents, attributes) ** 2
  collapsed = latents.var(axis=0) <= _MIN_CODE_VARIANCE
  scores[collapsed, :] = 0.0
  return scores


def _top_two_gap(matrix: np.ndarray) -> np.ndarray:
  """Per column: largest minus second largest entry over rows."""
  if matrix.shape[0] < 2:
    raise ValueError(f"gap metrics (MIG, SAP) need at least 2 latent codes, got "
                     f"{matrix.shape[0]}")
  ordered = np.sort(matrix, axis=0)
  return ordered[-1] - ordered[-2]


def mig_from_mutual_information(mi: np.ndarray, self_information: np.ndarray) -> np.ndarray:
  """MIG_a = (m_(1),a - m_(2),a) / H_a for a (D, A) MI matrix and (A,) normalisers."""
  mi = np.asarray(mi, dtype=np.float64)
  self_information = np.asarray(self_information, dtype=np.float64)
  if np.any(self_information <= 0):
    raise ValueError(f"MIG normalisers H_a must be > 0, got {self_information.tolist()}")
  return _top_two_gap(mi) / self_information


def sap_from_scores(scores: np.ndarray) -> np.ndarray:
  """SAP_a = top-1 minus top-2 over codes of a (D, A) score matrix."""
  return _top_two_gap(np.asarray(scores, dtype=np.float64))


def scc_from_spearman(rho: np.ndarray, p_values: np.ndarray,
                      p_threshold: float = _SCC_P_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
  """SCC_a = max_i |rho_ia| over codes with p_ia <= p_threshold (0 if none).

  Returns:
    (A,) SCC per attribute and (A,) index of the code attaining it.
  """
  significant = np.where(np.asarray(p_values) <= p_threshold, np.abs(np.asarray(rho)), 0.0)
  return significant.max(axis=0), significant.argmax(axis=0)


def modularity_from_mutual_information(mi: np.ndarray) -> float:
  """Ridgeway & Mozer modularity of a (D, A) MI matrix, mean over codes.

  With a single attribute no code can depend on more than one, so every informative code has
  delta_i = 0 (modularity 1); uninformative codes (theta_i = 0) score 0 as in the formula.
  """
  squared = np.asarray(mi, dtype=np.float64) ** 2
  num_attributes = squared.shape[1]
  theta = squared.max(axis=1)
  informative = theta > 0
  per_code = np.zeros(squared.shape[0])
  if num_attributes == 1:
    per_code[informative] = 1.0
  else:
    delta = ((squared.sum(axis=1)[informative] - theta[informative])
             / (theta[informative] * (num_attributes - 1)))
    per_code[informative] = 1.0 - delta
  return float(per_code.mean())


def histogram_discretize(values, num_bins: int = DEFAULT_NUM_BINS) -> np.ndarray:
  """Bin labels 0..num_bins-1 of each column in num_bins equal-width bins over its range.

  The disentanglement_lib histogram discretiser: edges from `np.histogram_bin_edges`, the
  maximum falls in the last bin; a constant column falls in one bin.

  Args:
    values: (N, K) samples.
    num_bins: bins per column (20 in disentanglement_lib).

  Returns:
    (N, K) int64 bin labels.
  """
  values = _as_matrix(values, "values")
  if num_bins < 2:
    raise ValueError(f"num_bins must be >= 2, got {num_bins}")
  binned = np.empty(values.shape, dtype=np.int64)
  for k, column in enumerate(values.T):
    edges = np.histogram_bin_edges(column, bins=num_bins)
    binned[:, k] = np.digitize(column, edges[1:-1])
  return binned


def discrete_mutual_information_matrix(binned_latents, binned_attributes) -> np.ndarray:
  """(D, A) MI in nats between every binned code and every binned attribute
  (`sklearn.metrics.mutual_info_score` of the bin labels)."""
  from sklearn.metrics import mutual_info_score
  binned_latents = np.asarray(binned_latents)
  binned_attributes = np.asarray(binned_attributes)
  return np.array([[mutual_info_score(attribute, code) for attribute in binned_attributes.T]
                   for code in binned_latents.T])


def binned_mig(latents, attributes, num_bins: int = DEFAULT_NUM_BINS
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """disentanglement_lib's MIG with codes and attributes binned (module docstring).

  Args:
    latents: (N, D) codes, D >= 2.
    attributes: (N, A) continuous attributes.
    num_bins: equal-width bins per code and per attribute.

  Returns:
    (A,) MIG per attribute, the (D, A) binned MI matrix and the (A,) entropies of the binned
    attributes, all in nats.
  """
  latents = _as_matrix(latents, "latents")
  attributes = _as_matrix(attributes, "attributes")
  _check_same_rows(latents, attributes)
  binned_attributes = histogram_discretize(attributes, num_bins)
  mi = discrete_mutual_information_matrix(histogram_discretize(latents, num_bins),
                                          binned_attributes)
  entropy = np.diag(discrete_mutual_information_matrix(binned_attributes, binned_attributes))
  if np.any(entropy <= 0):
    constant = [int(a) for a in np.flatnonzero(entropy <= 0)]
    raise ValueError(f"attribute columns {constant} fall in a single bin; their binned MIG is "
                     f"undefined")
  return _top_two_gap(mi) / entropy, mi, entropy


def dci_disentanglement(importance) -> float:
  """D = sum_i rho_i (1 - H_A(P_i.)) of a (D, A) importance matrix (Eastwood & Williams).

  With one attribute every code serves at most one factor, so each code scores 1.
  """
  importance = np.asarray(importance, dtype=np.float64)
  num_codes, num_attributes = importance.shape
  if num_attributes == 1:
    per_code = np.ones(num_codes)
  else:
    per_code = 1.0 - stats.entropy(importance.T + _DCI_ENTROPY_OFFSET, base=num_attributes)
  total = importance.sum()
  weights = importance.sum(axis=1) / total if total > 0 else np.full(num_codes, 1 / num_codes)
  return float(per_code @ weights)


def dci_completeness(importance) -> float:
  """C = sum_a rho_a (1 - H_D(P_.a)) of a (D, A) importance matrix (Eastwood & Williams)."""
  importance = np.asarray(importance, dtype=np.float64)
  num_codes, num_attributes = importance.shape
  if num_codes < 2:
    raise ValueError(f"DCI completeness needs at least 2 latent codes, got {num_codes}")
  per_attribute = 1.0 - stats.entropy(importance + _DCI_ENTROPY_OFFSET, base=num_codes)
  total = importance.sum()
  weights = (importance.sum(axis=0) / total if total > 0
             else np.full(num_attributes, 1 / num_attributes))
  return float(per_attribute @ weights)


def dci_split(num_samples: int, held_out_fraction: float = DCI_HELD_OUT_FRACTION,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Seeded (train, held-out) sample indices for DCI; each part has at least 2 samples."""
  if not 0 < held_out_fraction < 1:
    raise ValueError(f"the DCI held-out fraction must be in (0, 1), got {held_out_fraction}")
  num_test = int(round(num_samples * held_out_fraction))
  if num_test < 2 or num_samples - num_test < 2:
    raise ValueError(f"DCI needs at least 2 training and 2 held-out samples; {num_samples} "
                     f"samples with a held-out fraction of {held_out_fraction:.3g} give "
                     f"{num_samples - num_test} and {num_test}")
  order = np.random.default_rng(seed).permutation(num_samples)
  return np.sort(order[num_test:]), np.sort(order[:num_test])


def dci_importance(train_latents, train_attributes, test_latents, test_attributes,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Gradient-boosted-tree importances and R^2 of every attribute predicted from all codes.

  One `sklearn.ensemble.GradientBoostingRegressor` (default settings, `random_state=seed`)
  per attribute column, fit on the training part.

  Returns:
    (D, A) importance matrix (each column sums to 1 unless the fit found no split), (A,)
    training R^2 and (A,) held-out R^2.
  """
  from sklearn.ensemble import GradientBoostingRegressor
  from sklearn.metrics import r2_score
  train_latents = _as_matrix(train_latents, "train latents")
  train_attributes = _as_matrix(train_attributes, "train attributes")
  test_latents = _as_matrix(test_latents, "held-out latents")
  test_attributes = _as_matrix(test_attributes, "held-out attributes")
  importance = np.zeros((train_latents.shape[1], train_attributes.shape[1]))
  r2_train, r2_test = [], []
  for a in range(train_attributes.shape[1]):
    model = GradientBoostingRegressor(random_state=seed)
    model.fit(train_latents, train_attributes[:, a])
    importance[:, a] = np.abs(model.feature_importances_)
    r2_train.append(r2_score(train_attributes[:, a], model.predict(train_latents)))
    r2_test.append(r2_score(test_attributes[:, a], model.predict(test_latents)))
  return importance, np.array(r2_train), np.array(r2_test)


def dci_scores(latents, attributes, attribute_names: Sequence[str],
               held_out_fraction: float = DCI_HELD_OUT_FRACTION, seed: int = 0) -> dict:
  """DCI disentanglement, completeness and informativeness (module docstring).

  Args:
    latents: (N, D) codes, D >= 2.
    attributes: (N, A) continuous attributes, columns in the order of `attribute_names`.
    held_out_fraction: share of the samples (seeded draw) held out for informativeness.
    seed: seed of the split and of the tree ensembles.

  Returns:
    {"disentanglement": D, "completeness": C,
     "informativeness": {name: held-out R^2, ..., "mean"},
     "informativeness_train": {name: training R^2, ..., "mean"},
     "importance": {name: [R_1a, ..., R_Da], ...}, "num_train": int, "num_held_out": int}
  """
  latents = _as_matrix(latents, "latents")
  attributes = _as_matrix(attributes, "attributes")
  _check_same_rows(latents, attributes)
  names = _check_names(attribute_names, attributes.shape[1], "attribute", "mean")
  train, test = dci_split(latents.shape[0], held_out_fraction, seed)
  importance, r2_train, r2_test = dci_importance(latents[train], attributes[train],
                                                 latents[test], attributes[test], seed)
  return {
      "disentanglement": dci_disentanglement(importance),
      "completeness": dci_completeness(importance),
      "informativeness": _per_attribute(r2_test, names),
      "informativeness_train": _per_attribute(r2_train, names),
      "importance": {name: [float(v) for v in importance[:, a]]
                     for a, name in enumerate(names)},
      "num_train": int(train.size), "num_held_out": int(test.size),
  }


def linear_r2(x: np.ndarray, y: np.ndarray) -> float:
  """In-sample R^2 of the least-squares fit y ~ w x + b; 0 if x or y is constant."""
  x = np.asarray(x, dtype=np.float64)
  y = np.asarray(y, dtype=np.float64)
  x = x - x.mean()
  y = y - y.mean()
  sxx = float(x @ x)
  syy = float(y @ y)
  if sxx <= 0 or syy <= 0:
    return 0.0
  return float((x @ y) ** 2 / (sxx * syy))


def _check_same_rows(latents: np.ndarray, attributes: np.ndarray) -> None:
  if latents.shape[0] != attributes.shape[0]:
    raise ValueError(f"latents have {latents.shape[0]} samples but attributes have "
                     f"{attributes.shape[0]}")


def _check_names(names: Sequence[str], count: int, what: str, reserved: str) -> list[str]:
  names = [str(name) for name in names]
  if len(names) != count:
    raise ValueError(f"got {len(names)} {what} names {names} for {count} attribute columns")
  if len(set(names)) != len(names):
    raise ValueError(f"{what} names must be unique, got {names}")
  if reserved in names:
    raise ValueError(f"{reserved!r} is reserved for the average over attributes; rename that "
                     f"{what} (got {names})")
  return names


def _per_attribute(values: np.ndarray, names: Sequence[str]) -> dict[str, float]:
  out = {name: float(value) for name, value in zip(names, values)}
  out["mean"] = float(np.mean(values))
  return out


def interpretability_metrics(latents, attributes, attribute_names: Sequence[str],
                             n_neighbors: int = 3, seed: int = 0,
                             num_bins: int = DEFAULT_NUM_BINS,
                             dci_held_out_fraction: float = DCI_HELD_OUT_FRACTION) -> dict:
  """All interpretability metrics of a set of codes against continuous attributes.

  Args:
    latents: (N, D) codes of the evaluated split (`posterior_codes`), D >= 2.
    attributes: (N, A) attribute values, columns in the order of `attribute_names`.
    attribute_names: A names such as ("lv_edv_ml", "myo_ed_ml", "rv_edv_ml").
    n_neighbors: k of the KSG mutual information estimator.
    seed: seed of the estimator's tie-breaking noise, of the DCI split and of its trees.
    num_bins: bins per code and attribute of the binned MIG.
    dci_held_out_fraction: share of the samples DCI holds out for informativeness.

  Returns:
    A JSON-serialisable dict:
      {"num_samples": N, "num_codes": D,
       "interpretability": {name: {"dim": d*, "score": R^2, "mutual_information": MI}, ...,
                            "mean": mean score},
       "mig": {name: float, ..., "mean": float},
       "sap": {name: float, ..., "mean": float},
       "scc": {name: float, ..., "mean": float},
       "scc_dims": {name: code index attaining the SCC, ...},
       "modularity": float,
       "self_information": {name: H_a in nats, ...},
       "mig_binned": {name: float, ..., "mean": float},
       "dci": the `dci_scores` dict,
       "methods": {metric: how it was computed, ...}}
  """
  latents = _as_matrix(latents, "latents")
  attributes = _as_matrix(attributes, "attributes")
  _check_same_rows(latents, attributes)
  names = _check_names(attribute_names, attributes.shape[1], "attribute", "mean")
  for name, column in zip(names, attributes.T):
    if np.ptp(column) == 0:
      raise ValueError(f"attribute {name!r} is constant over the {column.size} samples; "
                       f"its interpretability metrics are undefined")
  if latents.shape[1] < 2:
    raise ValueError(f"interpretability metrics need at least 2 latent codes, got "
                     f"{latents.shape[1]}")

  mi = mutual_information_matrix(latents, attributes, n_neighbors, seed)
  self_information = attribute_self_information(attributes, n_neighbors, seed)
  best_dims = mi.argmax(axis=0)
  scores = np.array([linear_r2(latents[:, d], attributes[:, a])
                     for a, d in enumerate(best_dims)])
  rho, p_values = spearman_matrix(latents, attributes)
  scc, scc_dims = scc_from_spearman(rho, p_values)

  interpretability = {
      name: {"dim": int(best_dims[a]), "score": float(scores[a]),
             "mutual_information": float(mi[best_dims[a], a])}
      for a, name in enumerate(names)}
  interpretability["mean"] = float(scores.mean())
  return {
      "num_samples": int(latents.shape[0]),
      "num_codes": int(latents.shape[1]),
      "interpretability": interpretability,
      "mig": _per_attribute(mig_from_mutual_information(mi, self_information), names),
      "sap": _per_attribute(sap_from_scores(squared_correlation_matrix(latents, attributes)),
                            names),
      "scc": _per_attribute(scc, names),
      "scc_dims": {name: int(d) for name, d in zip(names, scc_dims)},
      "modularity": modularity_from_mutual_information(mi),
      "self_information": {name: float(h) for name, h in zip(names, self_information)},
      "mig_binned": _per_attribute(binned_mig(latents, attributes, num_bins)[0], names),
      "dci": dci_scores(latents, attributes, names, dci_held_out_fraction, seed),
      "methods": {
          "mig": f"KSG mutual information (k={n_neighbors}, nats) normalised by the KSG "
                 f"self-information of the attribute",
          "mig_binned": f"{num_bins} equal-width bins per code and per attribute, "
                        f"sklearn mutual_info_score (nats), normalised by the entropy of the "
                        f"binned attribute",
          "dci": f"sklearn GradientBoostingRegressor (default settings, random_state={seed}) "
                 f"per attribute on all codes, attributes kept continuous; importance = "
                 f"impurity importance; informativeness = R^2 on a seeded held-out "
                 f"{dci_held_out_fraction:.3g} of the samples",
      },
  }


def regularized_dimension_correlations(latents, attributes, dims: Sequence[int],
                                       names: Sequence[str]) -> dict:
  """Spearman correlation of each regularised latent dimension with its attribute.

  Args:
    latents: (N, D) codes.
    attributes: (N, R) values of the R regularised attributes, column r for `names[r]`.
    dims: R latent indices; dims[r] is the dimension regularised by attribute names[r].
    names: R attribute names.

  Returns:
    {name: {"dim": int, "spearman_rho": float, "p_value": float}, ...,
     "mean_abs_rho": float}.
  """
  latents = _as_matrix(latents, "latents")
  attributes = _as_matrix(attributes, "attributes")
  _check_same_rows(latents, attributes)
  names = _check_names(names, attributes.shape[1], "regularised attribute", "mean_abs_rho")
  dims = [int(d) for d in dims]
  if len(dims) != len(names):
    raise ValueError(f"got {len(dims)} regularised dims {dims} for {len(names)} attributes "
                     f"{names}")
  for d in dims:
    if not 0 <= d < latents.shape[1]:
      raise ValueError(f"regularised dim {d} is outside the {latents.shape[1]} latent codes")
  rho, p_values = spearman_matrix(latents[:, dims], attributes)
  out: dict = {
      name: {"dim": d, "spearman_rho": float(rho[r, r]), "p_value": float(p_values[r, r])}
      for r, (name, d) in enumerate(zip(names, dims))}
  out["mean_abs_rho"] = float(np.mean(np.abs(np.diag(rho))))
  return out


def posterior_codes(mu, logvar, codes: str = "sampled", seed: int = 0
                    ) -> tuple[np.ndarray, str]:
  """Codes of N subjects from their posteriors q(z|x) = N(mu, diag(exp(logvar))).

  "sampled": one draw per subject, z = mu + exp(logvar / 2) * eps, eps the (N, D) standard
  normal draw of `numpy.random.default_rng(seed)` (row i for the i-th subject in the given
  order), the codes the reference evaluations score; "mean": z = mu.

  Args:
    mu, logvar: (N, D) posterior means and log-variances.
    codes: one of CODE_PROTOCOLS.
    seed: seed of eps.

  Returns:
    (N, D) float64 codes and the sentence naming the protocol, for metrics.json.
  """
  mu = _as_matrix(mu, "posterior means (mu)")
  logvar = _as_matrix(logvar, "posterior log-variances (logvar)")
  if mu.shape != logvar.shape:
    raise ValueError(f"posterior means have shape {mu.shape} but log-variances {logvar.shape}")
  if codes == "mean":
    return mu, "posterior means z = mu"
  if codes == "sampled":
    eps = np.random.default_rng(seed).standard_normal(mu.shape)
    return (mu + np.exp(0.5 * logvar) * eps,
            f"sampled z ~ q(z|x): z = mu + exp(logvar / 2) * eps, one draw per subject, "
            f"eps from numpy default_rng seed {seed}")
  raise ValueError(f"codes must be one of {CODE_PROTOCOLS}, got {codes!r}")


def posterior_code_metrics(mu, logvar, attributes, attribute_names: Sequence[str],
                           regularized_dims: Sequence[int] = (), codes: str = "sampled",
                           seed: int = 0) -> dict:
  """Every interpretability metric for the sampled codes and for the posterior means.

  The block of the `codes` protocol goes under "interpretability" (and "regularized" with the
  Spearman rho of each regularised dimension when `regularized_dims` is given), the other
  protocol's under "interpretability_<other>_codes" (and "regularized_<other>_codes"). Every
  block says which codes produced it ("codes", "protocol", and "seed" for sampled codes).

  Args:
    mu, logvar: (N, D) posterior means and log-variances of the evaluated subjects.
    attributes: (N, A) attributes, columns in the order of `attribute_names`.
    attribute_names: A attribute names.
    regularized_dims: per attribute, the latent dimension it regularises (empty: none).
    codes: the headline protocol, one of CODE_PROTOCOLS.
    seed: seed of the sampled codes' eps.

  Returns:
    The four (or two) blocks of eval/metrics.json keyed as above.
  """
  if codes not in CODE_PROTOCOLS:
    raise ValueError(f"codes must be one of {CODE_PROTOCOLS}, got {codes!r}")
  clashing = sorted({"codes", "protocol", "seed"} & {str(name) for name in attribute_names})
  if clashing and len(regularized_dims):
    raise ValueError(f"attribute names {clashing} are reserved for the protocol of the "
                     f"regularised-dimension block; rename those attributes")
  other = next(c for c in CODE_PROTOCOLS if c != codes)
  out = {}
  for protocol, suffix in ((codes, ""), (other, f"_{other}_codes")):
    latents, sentence = posterior_codes(mu, logvar, protocol, seed)
    label = {"codes": protocol, "protocol": sentence,
             **({"seed": int(seed)} if protocol == "sampled" else {})}
    out["interpretability" + suffix] = {
        **label, **interpretability_metrics(latents, attributes, attribute_names)}
    if len(regularized_dims):
      out["regularized" + suffix] = {**label, **regularized_dimension_correlations(
          latents, attributes, regularized_dims, attribute_names)}
  return out
