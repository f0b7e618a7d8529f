"""Latent-space interpretability metrics for continuous attributes (AR-VAE definitions).

Given codes z (N, D) of an evaluated split and continuous clinical attributes a (N, A) (e.g.
lv_edv_ml, rv_edv_ml, myo_ed_ml), `interpretability_metrics` computes the metrics reported by the
attribute-regularised VAE papers (Pati & Lerch 2021, AR-VAE; the AR-SIVAE cardiac papers): the
interpretability score below, and MIG, SAP, SCC, modularity, binned MIG and DCI
(cardiac_jax.metrics.disentanglement).

- Interpretability: d* = argmax_d MI(z_d; a); score = R^2 of the 1-D least-squares fit
  a ~ z_d* with intercept, on the same samples (in-sample R^2, equal to corr(z_d*, a)^2).

The reference evaluations (ar-vae `ImageVAETrainer.compute_representations`, AR-SIVAE
`DownstreamEvaluator.compute_latent_representations`) compute their metrics on one unseeded
draw z ~ q(z|x) per test image, not on the posterior means: ar-vae on its test split, AR-SIVAE
on the ACDC test subjects, one basal slice each. `posterior_codes` makes those codes, one draw
per subject (one slice per subject here too) from a seeded generator, and
`posterior_code_metrics` reports every metric for the sampled codes and for the means side by
side (disentanglement_lib itself scores the means). AR-SIVAE scores SAP, SCC and modularity
against every column of its attribute table; here all metrics use the given attributes.

Everything here is numpy/scipy/scikit-learn on the host; results are plain python floats and
ints so that they can be written to JSON directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cardiac_jax.metrics import disentanglement, mutual_information

# What evaluate's --codes selects: one draw from q(z|x) per subject, or its mean.
CODE_PROTOCOLS = ("sampled", "mean")


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


def interpretability_metrics(latents, attributes, attribute_names: Sequence[str],
                             n_neighbors: int = 3, seed: int = 0,
                             num_bins: int = disentanglement.DEFAULT_NUM_BINS,
                             dci_held_out_fraction: float = disentanglement.DCI_HELD_OUT_FRACTION
                             ) -> dict:
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
       "dci": the `disentanglement.dci_scores` dict,
       "methods": {metric: how it was computed, ...}}
  """
  latents = mutual_information.as_matrix(latents, "latents")
  attributes = mutual_information.as_matrix(attributes, "attributes")
  mutual_information.check_same_rows(latents, attributes)
  names = disentanglement.check_names(attribute_names, attributes.shape[1], "attribute",
                                      "mean")
  for name, column in zip(names, attributes.T):
    if np.ptp(column) == 0:
      raise ValueError(f"attribute {name!r} is constant over the {column.size} samples; "
                       f"its interpretability metrics are undefined")
  if latents.shape[1] < 2:
    raise ValueError(f"interpretability metrics need at least 2 latent codes, got "
                     f"{latents.shape[1]}")

  mi = mutual_information.mutual_information_matrix(latents, attributes, n_neighbors, seed)
  self_information = mutual_information.attribute_self_information(attributes, n_neighbors,
                                                                    seed)
  best_dims = mi.argmax(axis=0)
  scores = np.array([linear_r2(latents[:, d], attributes[:, a])
                     for a, d in enumerate(best_dims)])
  rho, p_values = mutual_information.spearman_matrix(latents, attributes)
  scc, scc_dims = disentanglement.scc_from_spearman(rho, p_values)

  interpretability = {
      name: {"dim": int(best_dims[a]), "score": float(scores[a]),
             "mutual_information": float(mi[best_dims[a], a])}
      for a, name in enumerate(names)}
  interpretability["mean"] = float(scores.mean())
  return {
      "num_samples": int(latents.shape[0]),
      "num_codes": int(latents.shape[1]),
      "interpretability": interpretability,
      "mig": disentanglement.per_attribute(
          disentanglement.mig_from_mutual_information(mi, self_information), names),
      "sap": disentanglement.per_attribute(
          disentanglement.sap_from_scores(
              mutual_information.squared_correlation_matrix(latents, attributes)),
          names),
      "scc": disentanglement.per_attribute(scc, names),
      "scc_dims": {name: int(d) for name, d in zip(names, scc_dims)},
      "modularity": disentanglement.modularity_from_mutual_information(mi),
      "self_information": {name: float(h) for name, h in zip(names, self_information)},
      "mig_binned": disentanglement.per_attribute(
          disentanglement.binned_mig(latents, attributes, num_bins)[0], names),
      "dci": disentanglement.dci_scores(latents, attributes, names, dci_held_out_fraction, seed),
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
  latents = mutual_information.as_matrix(latents, "latents")
  attributes = mutual_information.as_matrix(attributes, "attributes")
  mutual_information.check_same_rows(latents, attributes)
  names = disentanglement.check_names(names, attributes.shape[1], "regularised attribute",
                                      "mean_abs_rho")
  dims = [int(d) for d in dims]
  if len(dims) != len(names):
    raise ValueError(f"got {len(dims)} regularised dims {dims} for {len(names)} attributes "
                     f"{names}")
  for d in dims:
    if not 0 <= d < latents.shape[1]:
      raise ValueError(f"regularised dim {d} is outside the {latents.shape[1]} latent codes")
  rho, p_values = mutual_information.spearman_matrix(latents[:, dims], attributes)
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
  mu = mutual_information.as_matrix(mu, "posterior means (mu)")
  logvar = mutual_information.as_matrix(logvar, "posterior log-variances (logvar)")
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
