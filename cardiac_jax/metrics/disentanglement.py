"""Disentanglement scores of latent codes against continuous attributes.

Given codes z (N, D) and continuous attributes a (N, A), the scores reported by the
attribute-regularised VAE papers (Pati & Lerch 2021, AR-VAE; the AR-SIVAE cardiac papers), from
the matrices of cardiac_jax.metrics.mutual_information:

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

Everything here is numpy/scipy/scikit-learn on the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

from cardiac_jax.metrics.mutual_information import as_matrix, check_same_rows

_SCC_P_THRESHOLD = 0.05
# disentanglement_lib's histogram discretiser setting for MIG.
DEFAULT_NUM_BINS = 20
# Share of the samples DCI holds out for informativeness (disentanglement_lib: 5000 of 15000).
DCI_HELD_OUT_FRACTION = 1.0 / 3.0
# disentanglement_lib adds this to the importances so that a code (or attribute) with zero
# total importance has a defined, maximal entropy.
_DCI_ENTROPY_OFFSET = 1e-11


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
  values = as_matrix(values, "values")
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
  latents = as_matrix(latents, "latents")
  attributes = as_matrix(attributes, "attributes")
  check_same_rows(latents, attributes)
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
  train_latents = as_matrix(train_latents, "train latents")
  train_attributes = as_matrix(train_attributes, "train attributes")
  test_latents = as_matrix(test_latents, "held-out latents")
  test_attributes = as_matrix(test_attributes, "held-out attributes")
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
  latents = as_matrix(latents, "latents")
  attributes = as_matrix(attributes, "attributes")
  check_same_rows(latents, attributes)
  names = check_names(attribute_names, attributes.shape[1], "attribute", "mean")
  train, test = dci_split(latents.shape[0], held_out_fraction, seed)
  importance, r2_train, r2_test = dci_importance(latents[train], attributes[train],
                                                 latents[test], attributes[test], seed)
  return {
      "disentanglement": dci_disentanglement(importance),
      "completeness": dci_completeness(importance),
      "informativeness": per_attribute(r2_test, names),
      "informativeness_train": per_attribute(r2_train, names),
      "importance": {name: [float(v) for v in importance[:, a]]
                     for a, name in enumerate(names)},
      "num_train": int(train.size), "num_held_out": int(test.size),
  }


def check_names(names: Sequence[str], count: int, what: str, reserved: str) -> list[str]:
  """The `count` names as strings: unique, and none the `reserved` key of the average."""
  names = [str(name) for name in names]
  if len(names) != count:
    raise ValueError(f"got {len(names)} {what} names {names} for {count} attribute columns")
  if len(set(names)) != len(names):
    raise ValueError(f"{what} names must be unique, got {names}")
  if reserved in names:
    raise ValueError(f"{reserved!r} is reserved for the average over attributes; rename that "
                     f"{what} (got {names})")
  return names


def per_attribute(values: np.ndarray, names: Sequence[str]) -> dict[str, float]:
  """{name: value, ..., "mean": mean over attributes} of (A,) per-attribute values."""
  out = {name: float(value) for name, value in zip(names, values)}
  out["mean"] = float(np.mean(values))
  return out
