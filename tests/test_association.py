"""cardiac_jax.association against closed forms, scipy and simulated data with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from cardiac_jax import association


def _cosine(a, b) -> float:
  return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# ----------------------------------------------------------------------------- OLS

@pytest.mark.parametrize("seed,effect", [(0, 0.0), (1, 0.3), (2, 1.5)])
def test_ols_without_covariates_matches_linregress(seed, effect):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=40)
  y = effect * x + rng.normal(size=40) + 3.0
  result = association.ols_association(y, x)
  reference = stats.linregress(x, y)
  assert result.n == 40 and result.converged
  np.testing.assert_allclose(result.beta, reference.slope, rtol=1e-10)
  np.testing.assert_allclose(result.se, reference.stderr, rtol=1e-10)
  np.testing.assert_allclose(result.p, reference.pvalue, rtol=1e-8)
  np.testing.assert_allclose(result.stat, reference.slope / reference.stderr, rtol=1e-10)


def test_ols_with_covariates_matches_frisch_waugh_lovell():
  """The latent's coefficient and t equal those of the residual-on-residual regression after
  partialling out [1, C] (with n - k degrees of freedom)."""
  rng = np.random.default_rng(3)
  n = 60
  c = rng.normal(size=(n, 2))
  x = 0.5 * c[:, 0] + rng.normal(size=n)
  y = 0.4 * x + c @ np.array([1.0, -2.0]) + rng.normal(size=n)
  result = association.ols_association(y, x, c)
  basis = np.column_stack([np.ones(n), c])
  project = basis @ np.linalg.pinv(basis)
  x_res, y_res = x - project @ x, y - project @ y
  beta = float(x_res @ y_res / (x_res @ x_res))
  rss = float(np.sum((y_res - beta * x_res) ** 2))
  se = np.sqrt(rss / (n - 4) / (x_res @ x_res))
  np.testing.assert_allclose(result.beta, beta, rtol=1e-10)
  np.testing.assert_allclose(result.se, se, rtol=1e-10)
  np.testing.assert_allclose(result.p, 2 * stats.t.sf(abs(beta / se), n - 4), rtol=1e-8)


def test_confounded_latent_loses_significance_with_the_covariate():
  rng = np.random.default_rng(4)
  n = 300
  height = rng.normal(size=n)
  latent = height + 0.3 * rng.normal(size=n)        # The latent only reflects height...
  trait = 2.0 * height + rng.normal(size=n)         # ...which alone drives the trait.
  assert association.ols_association(trait, latent).p < 1e-20
  adjusted = association.ols_association(trait, latent, height)
  assert adjusted.p > 0.01
  # A latent with its own effect stays significant after the same adjustment.
  own = latent + rng.normal(size=n)
  assert association.ols_association(trait + 1.0 * own, own, height).p < 1e-10


def test_ols_degenerate_designs_give_nan_not_errors():
  rng = np.random.default_rng(5)
  y = rng.normal(size=20)
  constant = association.ols_association(y, np.ones(20))
  assert np.isnan(constant.p) and "rank" in constant.note
  c = rng.normal(size=20)
  collinear = association.ols_association(y, 2.0 * c + 1.0, c)
  assert np.isnan(collinear.p) and "collinear" in collinear.note
  too_few = association.ols_association(y[:2], c[:2])
  assert np.isnan(too_few.p) and "degrees of freedom" in too_few.note
  with pytest.raises(ValueError, match="non-finite"):
    association.ols_association(np.r_[y[:-1], np.nan], c)


# ----------------------------------------------------------------------------- logistic

def test_logistic_recovers_a_known_coefficient():
  rng = np.random.default_rng(6)
  n = 4000
  x = rng.normal(size=n)
  c = rng.normal(size=(n, 2))
  logit = -0.5 + 0.8 * x + c @ np.array([0.6, -0.3])
  y = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(float)
  result = association.logistic_association(y, x, c)
  assert result.converged and result.iterations < 15
  assert abs(result.beta - 0.8) < 3.0 * result.se
  assert 0.02 < result.se < 0.06          # about 1 / sqrt(n var(x) E[pi (1 - pi)]).
  assert result.p < 1e-50
  # The unpenalised maximum-likelihood fit of scikit-learn agrees on the estimate.
  from sklearn.linear_model import LogisticRegression
  reference = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10000).fit(np.column_stack([x, c]),
                                                                          y)
  np.testing.assert_allclose(result.beta, reference.coef_[0, 0], rtol=1e-5)


def test_logistic_p_values_are_roughly_uniform_under_the_null():
  rng = np.random.default_rng(7)
  p = []
  for _ in range(300):
    x = rng.normal(size=150)
    c = rng.normal(size=150)
    y = (rng.random(150) < 1.0 / (1.0 + np.exp(-(0.3 + 0.7 * c)))).astype(float)
    result = association.logistic_association(y, x, c)
    assert result.converged
    p.append(result.p)
  p = np.asarray(p)
  assert 0.01 <= np.mean(p < 0.05) <= 0.10
  assert 0.4 < np.median(p) < 0.6
  assert stats.kstest(p, "uniform").pvalue > 1e-3


def test_logistic_separation_is_reported_not_raised():
  x = np.arange(12, dtype=float)
  complete = association.logistic_association((x > 5.5).astype(float), x)
  assert not complete.converged and np.isnan(complete.p) and np.isnan(complete.se)
  assert "separation" in complete.note
  assert complete.beta > 0
  # Quasi-complete: one tied point on the boundary holds both classes.
  xq = np.r_[x, 5.0]
  yq = np.r_[(x > 5.0).astype(float), 1.0]
  quasi = association.logistic_association(yq, xq)
  assert not quasi.converged and np.isnan(quasi.p)
  one_class = association.logistic_association(np.ones(12), x)
  assert np.isnan(one_class.p) and "one class" in one_class.note
  with pytest.raises(ValueError, match="0/1"):
    association.logistic_association(np.full(12, 2.0), x)


# ----------------------------------------------------------------------------- BH

def test_benjamini_hochberg_hand_computed():
  # Sorted 0.005 0.01 0.03 0.04 0.5, m = 5: m p / rank = 0.025 0.025 0.05 0.05 0.5.
  q = association.benjamini_hochberg([0.01, 0.04, 0.03, 0.005, 0.5])
  np.testing.assert_allclose(q, [0.025, 0.05, 0.05, 0.025, 0.5])
  # The running minimum from the top: 4 p / rank = 0.04 0.04 0.028 0.9 -> 0.028 0.028 0.028.
  np.testing.assert_allclose(association.benjamini_hochberg([0.01, 0.02, 0.021, 0.9]),
                             [0.028, 0.028, 0.028, 0.9])
  # NaN is not a test: m = 2 here.
  q = association.benjamini_hochberg([0.01, np.nan, 0.02])
  np.testing.assert_allclose(q[[0, 2]], [0.02, 0.02])
  assert np.isnan(q[1])
  # Capped at 1.
  np.testing.assert_allclose(association.benjamini_hochberg([0.9, 0.95]), [0.95, 0.95])


def test_benjamini_hochberg_matches_scipy_and_is_monotone():
  rng = np.random.default_rng(8)
  p = np.concatenate([rng.uniform(size=200), rng.uniform(size=50) ** 8]).reshape(25, 10)
  q = association.benjamini_hochberg(p)
  assert q.shape == p.shape
  np.testing.assert_allclose(q.ravel(), stats.false_discovery_control(p.ravel()), rtol=1e-12)
  assert np.all(q >= p)
  order = np.argsort(p.ravel())
  assert np.all(np.diff(q.ravel()[order]) >= 0)
  threshold = association.bh_threshold(p, 0.05)
  np.testing.assert_array_equal(p <= threshold, q < 0.05)
  assert association.bh_threshold([0.5, 0.9], 0.05) == pytest.approx(0.025)


# ----------------------------------------------------------------------------- directions

def test_standardise_uses_the_reference_and_inverts():
  rng = np.random.default_rng(9)
  reference = rng.normal(loc=3.0, scale=2.0, size=(50, 4))
  reference[:, 3] = 7.0                                   # A dead latent.
  z = rng.normal(size=(5, 4))
  z_std, transform = association.standardise(z, reference)
  np.testing.assert_allclose(transform.mean, reference.mean(axis=0))
  np.testing.assert_allclose(transform.std[:3], reference[:, :3].std(axis=0))
  assert transform.std[3] == 1.0
  np.testing.assert_allclose(z_std, (z - transform.mean) / transform.std)
  np.testing.assert_allclose(transform.invert(z_std), z, atol=1e-12)
  own, _ = association.standardise(reference)
  np.testing.assert_allclose(own[:, :3].mean(axis=0), 0.0, atol=1e-12)
  np.testing.assert_allclose(own[:, :3].std(axis=0), 1.0)


def test_trait_direction_recovers_a_sparse_linear_direction():
  rng = np.random.default_rng(10)
  z = rng.normal(size=(300, 32))
  truth = np.zeros(32)
  truth[[3, 11, 20]] = [1.0, -0.6, 0.4]
  y = z @ truth + 0.3 * rng.normal(size=300)
  direction = association.trait_direction(z, y, "linear")
  assert _cosine(direction.beta, truth) > 0.9
  np.testing.assert_allclose(np.linalg.norm(direction.beta), 1.0)
  assert 3 <= direction.num_nonzero < 32
  assert direction.num_nonzero == np.count_nonzero(direction.beta)
  assert direction.cv_metric == "r2" and direction.cv_score > 0.8
  assert direction.regularisation > 0 and not direction.empty_fallback


def test_trait_direction_recovers_a_sparse_logistic_direction():
  rng = np.random.default_rng(11)
  z = rng.normal(size=(400, 32))
  truth = np.zeros(32)
  truth[[5, 9]] = [1.5, -1.0]
  y = (rng.random(400) < 1.0 / (1.0 + np.exp(-(z @ truth)))).astype(float)
  direction = association.trait_direction(z, y, "logistic")
  assert _cosine(direction.beta, truth) > 0.9
  assert direction.cv_metric == "roc_auc" and direction.cv_score > 0.75
  assert 2 <= direction.num_nonzero < 32 and direction.to_dict()["C"] > 0


def test_trait_direction_falls_back_from_an_empty_model():
  from sklearn.linear_model import Lasso
  rng = np.random.default_rng(13)
  z = rng.normal(size=(40, 16))
  y = rng.normal(size=40)             # Unrelated to z: the CV picks the empty model here.
  direction = association.trait_direction(z, y, "linear")
  assert direction.empty_fallback
  assert direction.num_nonzero >= 1
  np.testing.assert_allclose(np.linalg.norm(direction.beta), 1.0)
  # The sparsest non-empty model: the next larger alpha of the path (a factor 10^(3/99)) is
  # empty.
  alpha = direction.regularisation
  assert np.any(Lasso(alpha=alpha).fit(z, y).coef_)
  assert not np.any(Lasso(alpha=alpha * 1.08).fit(z, y).coef_)
  rng = np.random.default_rng(6)
  z_noise = rng.normal(size=(40, 16))
  labels = (rng.random(40) < 0.5).astype(float)             # Unrelated to z_noise.
  logistic = association.trait_direction(z_noise, labels, "logistic")
  assert logistic.empty_fallback and logistic.num_nonzero >= 1
  np.testing.assert_allclose(np.linalg.norm(logistic.beta), 1.0)
  with pytest.raises(ValueError, match="smaller class"):
    association.trait_direction(z, np.r_[1.0, np.zeros(39)], "logistic")
  with pytest.raises(ValueError, match="kind"):
    association.trait_direction(z, y, "poisson")


def test_activation_pattern_follows_the_codes_not_the_filter():
  """Two latents share a factor; a filter w = (1, -0.9) that cancels most of it. The pattern is
  Sigma w / sqrt(w' Sigma w), moves the score by one of its SDs at Mahalanobis length 1, and no
  direction changes the score by as much at a shorter Mahalanobis length (the shift that stays
  most within the cloud of codes)."""
  rng = np.random.default_rng(0)
  f = rng.normal(size=4000)
  z = np.stack([f + 0.3 * rng.normal(size=4000), f + 0.3 * rng.normal(size=4000),
                rng.normal(size=4000)], axis=1)
  z_std, _ = association.standardise(z)
  w = np.array([1.0, -0.9, 0.0])
  a = association.activation_pattern(z_std, w)
  sigma = np.cov(z_std, rowvar=False)
  np.testing.assert_allclose(a, sigma @ w / np.sqrt(w @ sigma @ w), rtol=1e-10)
  score = z_std @ w
  assert w @ a == pytest.approx(np.std(score, ddof=1))
  assert a @ np.linalg.solve(sigma, a) == pytest.approx(1.0)
  def length_per_score(u):
    return np.sqrt(u @ np.linalg.solve(sigma, u)) / abs(w @ u)

  directions = np.concatenate([w[None], rng.normal(size=(200, 3))])
  assert min(length_per_score(u) for u in directions) >= length_per_score(a) * (1 - 1e-9)
  assert length_per_score(w) > 1.02 * length_per_score(a)
  assert abs(a[2]) < 0.1 * abs(a[0])           # The unrelated latent barely moves.
  with pytest.raises(ValueError, match="constant"):
    association.activation_pattern(z_std, np.zeros(3))
  with pytest.raises(ValueError, match="D = 2"):
    association.activation_pattern(z_std, np.ones(2))
