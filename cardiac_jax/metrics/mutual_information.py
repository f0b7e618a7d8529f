"""Dependence of latent codes on continuous attributes: mutual information and correlations.

Mutual information uses the Kraskov-Stoegbauer-Grassberger estimator (Phys. Rev. E 69, 066138,
2004, algorithm 1) with k = 3 neighbours, implemented here rather than taken from
`sklearn.feature_selection.mutual_info_regression`, whose results have changed across sklearn
versions. It follows the same conventions as that function: both variables are scaled to unit
standard deviation, tiny Gaussian noise (1e-10 of the scale, from a fixed seed) breaks ties,
and negative estimates are clipped to 0. MI is in nats.

The Spearman and squared Pearson matrices are the score matrices of SCC and SAP
(cardiac_jax.metrics.disentanglement). `as_matrix` and `check_same_rows` are the input checks
every metric of this package shares. Everything here is numpy/scipy on the host.
"""

from __future__ import annotations

import numpy as np
from scipy import spatial, special, stats

# Codes whose variance is below this are treated as collapsed (the AR-VAE SAP convention).
_MIN_CODE_VARIANCE = 1e-12
# Relative amplitude of the tie-breaking noise recommended by Kraskov et al. for data with
# repeated values (quantised attributes, collapsed codes).
_TIE_BREAK_NOISE = 1e-10


def as_matrix(values, name: str) -> np.ndarray:
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


def check_same_rows(latents: np.ndarray, attributes: np.ndarray) -> None:
  """Raises unless the codes and the attributes hold the same number of samples."""
  if latents.shape[0] != attributes.shape[0]:
    raise ValueError(f"latents have {latents.shape[0]} samples but attributes have "
                     f"{attributes.shape[0]}")


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
  x = as_matrix(x, "x")[:, 0]
  y = as_matrix(y, "y")[:, 0]
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
  latents = as_matrix(latents, "latents")
  attributes = as_matrix(attributes, "attributes")
  check_same_rows(latents, attributes)
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
  attributes = as_matrix(attributes, "attributes")
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
  latents = as_matrix(latents, "latents")
  attributes = as_matrix(attributes, "attributes")
  check_same_rows(latents, attributes)
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
  latents = as_matrix(latents, "latents")
  attributes = as_matrix(attributes, "attributes")
  check_same_rows(latents, attributes)
  scores = _pearson_matrix(latents, attributes) ** 2
  collapsed = latents.var(axis=0) <= _MIN_CODE_VARIANCE
  scores[collapsed, :] = 0.0
  return scores
