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


# ----------------------------------------------------------------------------- frozen numbers
# The values below were computed by the hand-written least squares, Newton-Raphson and BH of
# this module before they were replaced by statsmodels; the tests fail if the library code
# drifts from them. Rows: (beta, se, stat, p, n, converged, iterations, note).

NAN = float("nan")
_RANK_NOTE = ("rank-deficient design: the latent is constant or collinear with the "
              "covariates")
# Under separation the estimate does not exist: beta and the iteration count are where a
# diverging path was stopped, so only the sign of beta and the note's start are frozen.
_SEPARATION_NOTE = "separation: fitted logits reach"
_SEPARATED = ("complete_separation", "quasi_separation")


def _ols_cases() -> dict:
  """name -> (y, x, covariates) of the frozen OLS comparisons."""
  cases = {}
  for seed, effect in [(0, 0.0), (1, 0.3), (2, 1.5), (3, -0.8)]:
    rng = np.random.default_rng(100 + seed)
    x = rng.normal(size=40)
    cases[f"plain_seed{seed}"] = (effect * x + rng.normal(size=40) + 3.0, x, None)
  for seed in (4, 5, 6):
    rng = np.random.default_rng(100 + seed)
    c = rng.normal(size=(60, 2))
    x = 0.5 * c[:, 0] + rng.normal(size=60)
    y = 0.25 * x + c @ np.array([1.0, -2.0]) + rng.normal(size=60)
    cases[f"covariates_seed{seed}"] = (y, x, c)
  rng = np.random.default_rng(107)
  c = rng.normal(size=30)
  x = rng.normal(size=30)
  cases["vector_covariate"] = (x - c + rng.normal(size=30), x, c)
  cases["tiny_n3"] = (np.array([1.0, 2.5, 2.0]), np.array([0.0, 1.0, 2.0]), None)
  cases["tiny_n4_covariate"] = (np.array([1.0, 2.5, 2.0, 4.0]), np.array([0.0, 1.0, 2.0, 3.5]),
                                np.array([1.0, -1.0, 0.5, 0.0]))
  cases["too_few"] = (np.array([1.0, 2.0]), np.array([0.0, 1.0]), None)
  rng = np.random.default_rng(108)
  y = rng.normal(size=20)
  c = rng.normal(size=20)
  cases["constant_latent"] = (y, np.ones(20), None)
  cases["collinear_latent"] = (y, 2.0 * c + 1.0, c)
  cases["zero_covariate"] = (y, c, np.zeros(20))
  cases["perfect_fit"] = (np.array([1.0, 3.0, 5.0, 7.0]), np.array([0.0, 1.0, 2.0, 3.0]), None)
  return cases


def _logistic_cases() -> dict:
  """name -> (y, x, covariates) of the frozen logistic comparisons."""
  cases = {}
  for seed, effect in [(0, 0.0), (1, 0.5), (2, 1.2), (3, -0.7)]:
    rng = np.random.default_rng(200 + seed)
    x = rng.normal(size=200)
    y = (rng.random(200) < 1.0 / (1.0 + np.exp(-(0.3 + effect * x)))).astype(float)
    cases[f"plain_seed{seed}"] = (y, x, None)
  for seed in (4, 5, 6):
    rng = np.random.default_rng(200 + seed)
    c = rng.normal(size=(150, 2))
    x = 0.4 * c[:, 1] + rng.normal(size=150)
    logit = -0.5 + 0.6 * x + c @ np.array([0.6, -0.3])
    y = (rng.random(150) < 1.0 / (1.0 + np.exp(-logit))).astype(float)
    cases[f"covariates_seed{seed}"] = (y, x, c)
  cases["tiny_n6"] = (np.array([0.0, 1.0, 0.0, 1.0, 1.0, 0.0]),
                      np.array([0.1, 0.4, 0.5, 0.9, 1.3, 1.1]), None)
  x = np.arange(12, dtype=float)
  cases["complete_separation"] = ((x > 5.5).astype(float), x, None)
  cases["quasi_separation"] = (np.r_[(x > 5.0).astype(float), 1.0], np.r_[x, 5.0], None)
  cases["one_class"] = (np.ones(12), x, None)
  cases["too_few"] = (np.array([0.0, 1.0]), np.array([0.0, 1.0]), None)
  rng = np.random.default_rng(207)
  c = rng.normal(size=30)
  y = (rng.random(30) < 0.5).astype(float)
  cases["constant_latent"] = (y, np.full(30, 2.0), None)
  cases["collinear_latent"] = (y, 3.0 * c - 1.0, c)
  return cases


_FROZEN_OLS = {
    "plain_seed0": (0.09276995422180406, 0.16225860953173357,
        0.5717413361887628, 0.5708640011508406, 40, True, 0, ''),
    "plain_seed1": (0.13400083890443543, 0.18225068145388146,
        0.7352556261269417, 0.46669773929336233, 40, True, 0, ''),
    "plain_seed2": (1.4413367951396723, 0.12448248452803576,
        11.578631327968527, 4.989956593549237e-14, 40, True, 0, ''),
    "plain_seed3": (-0.6950799685867342, 0.16798372951737542,
        -4.137781501718822, 0.00018723149782845687, 40, True, 0, ''),
    "covariates_seed4": (0.048384169245921156, 0.1627156375498919,
        0.2973541447796349, 0.7672964288549, 60, True, 0, ''),
    "covariates_seed5": (0.02721310306767631, 0.12009892886911296,
        0.22658905723742034, 0.8215683856352893, 60, True, 0, ''),
    "covariates_seed6": (0.5691686227052024, 0.16645242532066967,
        3.4194072066459964, 0.0011771224253198408, 60, True, 0, ''),
    "vector_covariate": (0.8683294270653472, 0.1549287206743938,
        5.604702751598092, 6.031351700904924e-06, 30, True, 0, ''),
    "tiny_n3": (0.5, 0.5773502691896258,
        0.8660254037844385, 0.5456289483429901, 3, True, 0, ''),
    "tiny_n4_covariate": (0.6946308724832215, 0.21837878393991877,
        3.1808532859782344, 0.19391288495980277, 4, True, 0, ''),
    "too_few": (NAN, NAN,
        NAN, NAN, 2, True, 0, '2 subjects for 2 coefficients: no residual degrees of freedom'),
    "constant_latent": (NAN, NAN,
        NAN, NAN, 20, True, 0, _RANK_NOTE),
    "collinear_latent": (NAN, NAN,
        NAN, NAN, 20, True, 0, _RANK_NOTE),
    "zero_covariate": (NAN, NAN,
        NAN, NAN, 20, True, 0, _RANK_NOTE),
    "perfect_fit": (2.0, NAN,
        NAN, NAN, 4, True, 0, 'perfect fit: zero residual variance'),
}

_FROZEN_LOGISTIC = {
    "plain_seed0": (-0.14923813291750895, 0.13570798320388086,
        -1.099700470040153, 0.27146264990068814, 200, True, 3, ''),
    "plain_seed1": (0.5832221365294424, 0.15485682724808186,
        3.7662022843533784, 0.000165749517575175, 200, True, 4, ''),
    "plain_seed2": (1.5595927899626243, 0.23580015715718175,
        6.614044743502936, 3.739586286830874e-11, 200, True, 5, ''),
    "plain_seed3": (-0.8885299638905736, 0.17922618126632786,
        -4.957590222659652, 7.137290077828578e-07, 200, True, 4, ''),
    "covariates_seed4": (0.2156451890316355, 0.17553925379562854,
        1.2284727453763717, 0.21926955445675222, 150, True, 4, ''),
    "covariates_seed5": (1.10313253348844, 0.2293742090421884,
        4.8093137327638384, 1.5144934679044948e-06, 150, True, 5, ''),
    "covariates_seed6": (0.6700984221130598, 0.2023682068155864,
        3.311283094600455, 0.0009286920520816072, 150, True, 4, ''),
    "tiny_n6": (1.8506677345447873, 2.186702824150115,
        0.8463279573730228, 0.3973698157387656, 6, True, 4, ''),
    "complete_separation": (7.123530717200769, NAN,
        NAN, NAN, 12, False, 7, _SEPARATION_NOTE),
    "quasi_separation": (5.607788084613047, NAN,
        NAN, NAN, 13, False, 8, _SEPARATION_NOTE),
    "one_class": (NAN, NAN,
        NAN, NAN, 12, True, 0, 'only one class (12 cases of 12): nothing to test'),
    "too_few": (NAN, NAN,
        NAN, NAN, 2, True, 0, _RANK_NOTE),
    "constant_latent": (NAN, NAN,
        NAN, NAN, 30, True, 0, _RANK_NOTE),
    "collinear_latent": (NAN, NAN,
        NAN, NAN, 30, True, 0, _RANK_NOTE),
}

_FROZEN_BH_P = [
    0.6369616873214543, 0.2697867137638703, 0.04097352393619469, 0.016527635528529094,
    0.8132702392002724, 0.9127555772777217, 0.6066357757671799, 0.7294965609839984,
    0.5436249914654229, 0.9350724237877682, 0.8158535541215322, 0.002738500170148095,
    0.39729570692344424, 1.4352142963366408e-09, 0.15090616114364183, 2.9374623240489504e-05,
    0.4136232679474252, 0.02520020919363657, NAN, 0.02, 0.02, 0.0, 1.0]
_FROZEN_BH_Q = [
    0.8758223200669997, 0.5395734275277406, 0.10015750295514257, 0.06285714285714286,
    0.9446725363512477, 0.9795996820633762, 0.8758223200669997, 0.9440543730381156,
    0.8542678437313789, 0.9795996820633762, 0.9446725363512477, 0.015061750935814522,
    0.6999778380648733, 1.578735725970305e-08, 0.33199355451601203, 0.0002154139037635897,
    0.6999778380648733, 0.06930057528250057, NAN, 0.06285714285714286, 0.06285714285714286, 0.0,
    1.0]


def _assert_matches(result, expected, rtol):
  beta, se, stat, p, n, converged, iterations, note = expected
  assert (result.n, result.converged, result.iterations) == (n, converged, iterations)
  assert result.note == note
  np.testing.assert_allclose([result.beta, result.se, result.stat, result.p],
                             [beta, se, stat, p], rtol=rtol, atol=0.0, equal_nan=True)


@pytest.mark.parametrize("name", sorted(_FROZEN_OLS))
def test_ols_matches_the_frozen_numbers(name):
  y, x, covariates = _ols_cases()[name]
  _assert_matches(association.ols_association(y, x, covariates), _FROZEN_OLS[name], rtol=1e-10)


@pytest.mark.parametrize("name", sorted(_FROZEN_LOGISTIC))
def test_logistic_matches_the_frozen_numbers(name):
  y, x, covariates = _logistic_cases()[name]
  result = association.logistic_association(y, x, covariates)
  expected = _FROZEN_LOGISTIC[name]
  if name in _SEPARATED:
    assert result.note.startswith(_SEPARATION_NOTE) and not result.converged
    assert np.sign(result.beta) == np.sign(expected[0]) and result.iterations >= 1
    assert np.all(np.isnan([result.se, result.stat, result.p])) and result.n == expected[4]
    return
  # The old Newton stopped at a relative deviance change of 1e-10: its estimates are exact to
  # about 1e-9, so that is the tolerance of the comparison.
  _assert_matches(result, expected, rtol=1e-7)


def test_benjamini_hochberg_matches_the_frozen_numbers():
  q = association.benjamini_hochberg(_FROZEN_BH_P)
  np.testing.assert_allclose(q, _FROZEN_BH_Q, rtol=1e-12, atol=0.0, equal_nan=True)
  # Any shape: the same q-values, in the shape of p.
  grid = association.benjamini_hochberg(np.reshape(_FROZEN_BH_P[:22], (2, 11)))
  assert grid.shape == (2, 11)
  np.testing.assert_allclose(grid.ravel(), association.benjamini_hochberg(_FROZEN_BH_P[:22]),
                             rtol=0.0, atol=0.0, equal_nan=True)


@pytest.mark.parametrize("test", [association.ols_association, association.logistic_association])
def test_non_finite_values_are_refused(test):
  y = np.array([0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
  x = np.array([0.1, 0.4, 0.5, 0.9, 1.3, 1.1])
  for bad_y, bad_x, bad_c in [(np.r_[y[:-1], np.nan], x, None), (y, np.r_[x[:-1], np.inf], None),
                              (y, x, np.r_[x[:-1], np.nan])]:
    with pytest.raises(ValueError, match="non-finite"):
      test(bad_y, bad_x, bad_c)


def test_a_fit_exact_to_rounding_is_a_perfect_fit():
  # y = x on a design whose least-squares residuals are rounding noise (about 1e-16), not zero.
  x = np.array([0.0, 1.0, 0.0, 1.0])
  result = association.ols_association(x, x)
  assert np.isnan(result.p) and np.isnan(result.se) and "perfect fit" in result.note
  assert result.beta == pytest.approx(1.0)


def test_ols_hc3_is_the_sandwich_with_leverage_correction():
  """HC3 (MacKinnon & White 1985): (X'X)^-1 X' diag(e_i^2 / (1 - h_i)^2) X (X'X)^-1, with the
  t distribution on n - k degrees of freedom."""
  rng = np.random.default_rng(14)
  n = 50
  c = rng.normal(size=(n, 2))
  x = rng.normal(size=n)
  y = 0.3 * x + c[:, 0] + (0.5 + np.abs(x)) * rng.normal(size=n)   # Heteroscedastic.
  design = np.column_stack([np.ones(n), x, c])
  bread = np.linalg.inv(design.T @ design)
  coef = bread @ design.T @ y
  residual = y - design @ coef
  leverage = np.einsum("ij,jk,ik->i", design, bread, design)
  meat = design.T @ (design * (residual ** 2 / (1.0 - leverage) ** 2)[:, None])
  se = float(np.sqrt((bread @ meat @ bread)[1, 1]))
  robust = association.ols_association(y, x, c, cov_type="HC3")
  classical = association.ols_association(y, x, c)
  np.testing.assert_allclose(robust.beta, coef[1], rtol=1e-10)
  np.testing.assert_allclose(robust.se, se, rtol=1e-10)
  np.testing.assert_allclose(robust.p, 2 * stats.t.sf(abs(coef[1] / se), n - 4), rtol=1e-8)
  assert robust.beta == classical.beta and abs(robust.se - classical.se) > 1e-3 * classical.se
  with pytest.raises(ValueError, match="cov_type"):
    association.ols_association(y, x, c, cov_type="HC4")


def test_logistic_sandwich_covariance():
  """HC0 for the logistic fit: (X'WX)^-1 X' diag((y - pi)^2) X (X'WX)^-1 at the optimum."""
  y, x, c = _logistic_cases()["covariates_seed5"]
  result = association.logistic_association(y, x, c, cov_type="HC0")
  classical = association.logistic_association(y, x, c)
  assert result.beta == pytest.approx(classical.beta, rel=1e-12)
  assert abs(result.se - classical.se) > 1e-3 * classical.se
  # The sandwich at the unpenalised maximum-likelihood fit of scikit-learn.
  from sklearn.linear_model import LogisticRegression
  design = np.column_stack([np.ones(len(y)), x, c])
  fit = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10000).fit(np.column_stack([x, c]), y)
  pi = fit.predict_proba(np.column_stack([x, c]))[:, 1]
  bread = np.linalg.inv(design.T @ (design * (pi * (1 - pi))[:, None]))
  meat = design.T @ (design * ((y - pi) ** 2)[:, None])
  se = float(np.sqrt((bread @ meat @ bread)[1, 1]))
  np.testing.assert_allclose(result.se, se, rtol=1e-5)
  np.testing.assert_allclose(result.p, 2 * stats.norm.sf(abs(result.beta / se)), rtol=1e-4)
  with pytest.raises(ValueError, match="cov_type"):
    association.logistic_association(y, x, c, cov_type="HC3")
