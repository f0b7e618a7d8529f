"""Tests of cardiac_jax.metrics: reconstruction metrics against numpy/scipy references and the
interpretability metrics on cases whose answer is known."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage, stats

from cardiac_jax.metrics import disentanglement
from cardiac_jax.metrics import interpretability as interp
from cardiac_jax.metrics import mutual_information as mutual_info
from cardiac_jax.metrics import reconstruction as rec


# ----------------------------------------------------------------------------------------------
# Reconstruction
# ----------------------------------------------------------------------------------------------

def _reference_ssim(x: np.ndarray, y: np.ndarray, data_range: float = 1.0,
                    sigma: float = 1.5, radius: int = 5, k1: float = 0.01,
                    k2: float = 0.03) -> float:
  """SSIM of two 2-D float64 images straight from Wang et al. eq. 13 with scipy filtering.

  gaussian_filter truncated at `radius` pixels is an 11-tap window; positions closer than
  `radius` to the border (where the reflected padding would enter) are dropped.
  """
  def blur(image):
    return ndimage.gaussian_filter(image, sigma, truncate=radius / sigma, mode="reflect")
  mu_x, mu_y = blur(x), blur(y)
  var_x = blur(x * x) - mu_x ** 2
  var_y = blur(y * y) - mu_y ** 2
  cov = blur(x * y) - mu_x * mu_y
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)
              / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)))
  return float(ssim_map[radius:-radius, radius:-radius].mean())


@pytest.fixture(scope="module")
def image_pair():
  rng = np.random.default_rng(0)
  # Smooth structure plus noise so that SSIM is neither ~0 nor ~1.
  x = ndimage.gaussian_filter(rng.random((3, 32, 28, 2)), sigma=(0, 2, 2, 0))
  x = (x - x.min()) / (x.max() - x.min())
  y = np.clip(x + 0.08 * rng.standard_normal(x.shape), 0.0, 1.0)
  return x.astype(np.float32), y.astype(np.float32)


def test_mse_and_psnr_match_numpy(image_pair):
  x, y = image_pair
  expected_mse = ((x.astype(np.float64) - y) ** 2).mean(axis=(1, 2))
  np.testing.assert_allclose(rec.mse(x, y), expected_mse, rtol=1e-5)
  np.testing.assert_allclose(rec.psnr(x, y), 10 * np.log10(1.0 / expected_mse), rtol=1e-5)
  np.testing.assert_allclose(rec.psnr(x, y, data_range=2.0),
                             10 * np.log10(4.0 / expected_mse), rtol=1e-5)
  assert rec.mse(x, y).shape == (3, 2)


def test_mse_psnr_hand_computed():
  x = np.zeros((1, 2, 2, 1), np.float32)
  y = np.array([0.0, 0.5, 0.5, 1.0], np.float32).reshape(1, 2, 2, 1)
  # (0 + 0.25 + 0.25 + 1) / 4 = 0.375
  np.testing.assert_allclose(rec.mse(x, y), [[0.375]], rtol=1e-6)
  np.testing.assert_allclose(rec.psnr(x, y), [[10 * np.log10(1 / 0.375)]], rtol=1e-6)


def test_ssim_of_identical_images_is_one(image_pair):
  x, _ = image_pair
  np.testing.assert_allclose(rec.ssim(x, x), np.ones((3, 2)), atol=1e-6)


def test_ssim_matches_direct_formula(image_pair):
  x, y = image_pair
  ours = np.asarray(rec.ssim(x, y))
  expected = np.array([[_reference_ssim(x[b, ..., c].astype(np.float64),
                                        y[b, ..., c].astype(np.float64))
                        for c in range(x.shape[-1])] for b in range(x.shape[0])])
  assert 0.2 < expected.min() and expected.max() < 0.95  # a non-trivial regime
  np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_ssim_random_images_match_reference():
  rng = np.random.default_rng(1)
  x = rng.random((2, 24, 24, 1)).astype(np.float32)
  y = rng.random((2, 24, 24, 1)).astype(np.float32)
  expected = [[_reference_ssim(x[b, ..., 0].astype(np.float64), y[b, ..., 0].astype(np.float64))]
              for b in range(2)]
  np.testing.assert_allclose(rec.ssim(x, y), expected, atol=1e-4)


def test_ssim_decreases_with_noise(image_pair):
  x, _ = image_pair
  rng = np.random.default_rng(2)
  noise = rng.standard_normal(x.shape).astype(np.float32)
  values = [float(jnp.mean(rec.ssim(x, x + level * noise))) for level in (0.0, 0.02, 0.05,
                                                                          0.1, 0.2, 0.4)]
  assert values[0] == pytest.approx(1.0, abs=1e-6)
  assert all(a > b for a, b in zip(values, values[1:])), values


def test_ssim_channels_are_independent(image_pair):
  x, y = image_pair
  mixed = y.copy()
  mixed[..., 1] = x[..., 1]  # channel 1 now perfect, channel 0 unchanged
  values = np.asarray(rec.ssim(x, mixed))
  np.testing.assert_allclose(values[:, 1], 1.0, atol=1e-6)
  np.testing.assert_allclose(values[:, 0], np.asarray(rec.ssim(x, y))[:, 0], atol=1e-7)


def test_metrics_are_jittable(image_pair):
  x, y = image_pair
  jitted = jax.jit(rec.reconstruction_metrics)(x, y)
  eager = rec.reconstruction_metrics(x, y)
  assert set(jitted) == {"mse", "psnr", "ssim", "mse_ch0", "mse_ch1", "psnr_ch0", "psnr_ch1",
                         "ssim_ch0", "ssim_ch1"}
  for key in eager:
    np.testing.assert_allclose(jitted[key], eager[key], rtol=1e-5)
  np.testing.assert_allclose(jax.jit(rec.ssim)(x, y), rec.ssim(x, y), rtol=1e-5)


def test_reconstruction_metrics_reduction(image_pair):
  x, y = image_pair
  out = rec.reconstruction_metrics(x, y)
  per_image = np.asarray(rec.ssim(x, y))
  assert float(out["ssim"]) == pytest.approx(per_image.mean(), rel=1e-6)
  assert float(out["ssim_ch1"]) == pytest.approx(per_image[:, 1].mean(), rel=1e-6)
  assert float(out["psnr"]) == pytest.approx(np.asarray(rec.psnr(x, y)).mean(), rel=1e-6)


def test_ssim3d_matches_formula_and_reduces_to_2d_for_static_volumes():
  rng = np.random.default_rng(3)
  x = ndimage.gaussian_filter(rng.random((2, 9, 20, 20, 1)), sigma=(0, 1, 1, 1, 0))
  x = ((x - x.min()) / (x.max() - x.min())).astype(np.float32)
  y = np.clip(x + 0.05 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
  # Direct formula with a 5x11x11 window (sigma 1 in time, 1.5 in space).
  def blur(v):
    out = ndimage.gaussian_filter1d(v, 1.0, axis=0, truncate=2.0, mode="reflect")
    out = ndimage.gaussian_filter1d(out, 1.5, axis=1, truncate=5 / 1.5, mode="reflect")
    return ndimage.gaussian_filter1d(out, 1.5, axis=2, truncate=5 / 1.5, mode="reflect")
  expected = []
  for b in range(2):
    xb, yb = x[b, ..., 0].astype(np.float64), y[b, ..., 0].astype(np.float64)
    mx, my = blur(xb), blur(yb)
    vx, vy, cxy = blur(xb * xb) - mx ** 2, blur(yb * yb) - my ** 2, blur(xb * yb) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    m = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    expected.append([m[2:-2, 5:-5, 5:-5].mean()])
  ours = rec.ssim3d(x, y, filter_size=(5, 11, 11), filter_sigma=(1.0, 1.5, 1.5))
  np.testing.assert_allclose(ours, expected, atol=1e-4)
  # A volume whose frames are all the same image: 3D SSIM = 2D SSIM of that image.
  static_x = np.repeat(x[:, :1], 7, axis=1)
  static_y = np.repeat(y[:, :1], 7, axis=1)
  np.testing.assert_allclose(rec.ssim3d(static_x, static_y, filter_size=(3, 11, 11)),
                             rec.ssim(x[:, 0], y[:, 0]), atol=1e-5)


def test_reconstruction_bad_input_messages():
  with pytest.raises(ValueError, match="differ"):
    rec.mse(np.zeros((1, 8, 8, 1)), np.zeros((1, 8, 8, 2)))
  with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
    rec.ssim(np.zeros((8, 8)), np.zeros((8, 8)))
  with pytest.raises(ValueError, match="does not fit"):
    rec.ssim(np.zeros((1, 8, 8, 1)), np.zeros((1, 8, 8, 1)))


# ----------------------------------------------------------------------------------------------
# Interpretability
# ----------------------------------------------------------------------------------------------

NAMES = ("lv_edv_ml", "myo_ed_ml", "rv_edv_ml")


@pytest.fixture(scope="module")
def structured_cohort():
  """Three independent attributes; code 0 = exp(a0), code 2 = linear in a1, codes 1, 3 noise."""
  rng = np.random.default_rng(10)
  n = 400
  attributes = np.stack([rng.normal(150, 30, n), rng.normal(110, 15, n),
                         rng.normal(160, 35, n)], axis=1)
  latents = np.stack([np.exp(attributes[:, 0] / 40.0), rng.standard_normal(n),
                      0.05 * attributes[:, 1] - 3.0, rng.standard_normal(n)], axis=1)
  metrics = interp.interpretability_metrics(latents, attributes, NAMES)
  return latents, attributes, metrics


def test_ksg_estimator_matches_gaussian_mi_and_sklearn():
  from sklearn.feature_selection import mutual_info_regression
  rng = np.random.default_rng(11)
  x = rng.standard_normal(2000)
  for rho in (0.0, 0.6, 0.9):
    y = rho * x + np.sqrt(1 - rho ** 2) * rng.standard_normal(2000)
    ours = mutual_info.ksg_mutual_information(x, y)
    exact = -0.5 * np.log(1 - rho ** 2)
    assert ours == pytest.approx(exact, abs=0.05)
    sklearn_value = mutual_info_regression(x[:, None], y, n_neighbors=3, random_state=0)[0]
    assert ours == pytest.approx(sklearn_value, abs=2e-3)
  # Deterministic given the seed.
  assert mutual_info.ksg_mutual_information(x, y) == mutual_info.ksg_mutual_information(x, y)


def test_monotone_code_gives_scc_one_and_is_picked(structured_cohort):
  latents, attributes, metrics = structured_cohort
  assert metrics["scc"]["lv_edv_ml"] == pytest.approx(1.0, abs=1e-12)
  assert metrics["scc_dims"]["lv_edv_ml"] == 0
  assert metrics["interpretability"]["lv_edv_ml"]["dim"] == 0
  # Score is the linear R^2 of a ~ exp(a / 40): high but below 1 because of the curvature.
  expected_r2 = np.corrcoef(latents[:, 0], attributes[:, 0])[0, 1] ** 2
  assert metrics["interpretability"]["lv_edv_ml"]["score"] == pytest.approx(expected_r2,
                                                                            rel=1e-10)
  assert 0.5 < expected_r2 < 0.95
  assert metrics["interpretability"]["myo_ed_ml"]["dim"] == 2
  assert metrics["interpretability"]["myo_ed_ml"]["score"] == pytest.approx(1.0, abs=1e-12)
  # MIG of a perfect code is large; rv_edv_ml has no code and a near-zero MIG.
  assert metrics["mig"]["lv_edv_ml"] > 0.6
  assert metrics["mig"]["rv_edv_ml"] < 0.05
  assert metrics["scc"]["rv_edv_ml"] < 0.2


def test_metrics_dict_is_json_serialisable(structured_cohort):
  _, _, metrics = structured_cohort
  decoded = json.loads(json.dumps(metrics))
  assert decoded == metrics
  assert set(decoded) >= {"interpretability", "mig", "sap", "scc", "modularity"}
  for key in ("mig", "sap", "scc"):
    assert set(decoded[key]) == {*NAMES, "mean"}
    assert decoded[key]["mean"] == pytest.approx(np.mean([decoded[key][n] for n in NAMES]))
  assert decoded["interpretability"]["mean"] == pytest.approx(
      np.mean([decoded["interpretability"][n]["score"] for n in NAMES]))
  assert set(decoded["mig_binned"]) == {*NAMES, "mean"}
  assert set(decoded["dci"]["informativeness"]) == {*NAMES, "mean"}
  assert set(decoded["methods"]) == {"mig", "mig_binned", "dci"}
  assert "GradientBoostingRegressor" in decoded["methods"]["dci"]


def test_noise_latents_give_near_zero_metrics():
  rng = np.random.default_rng(12)
  n = 600
  latents = rng.standard_normal((n, 6))
  attributes = rng.standard_normal((n, 3))
  metrics = interp.interpretability_metrics(latents, attributes, NAMES)
  assert metrics["mig"]["mean"] < 0.02
  assert metrics["sap"]["mean"] < 0.02
  assert metrics["scc"]["mean"] < 0.15
  assert metrics["interpretability"]["mean"] < 0.03


def test_sap_of_linear_code_is_one_minus_second_best():
  rng = np.random.default_rng(13)
  a = rng.standard_normal(500)
  second = a + rng.standard_normal(500)
  latents = np.stack([3.0 * a + 2.0, second, rng.standard_normal(500)], axis=1)
  scores = mutual_info.squared_correlation_matrix(latents, a[:, None])
  expected = 1.0 - np.corrcoef(second, a)[0, 1] ** 2
  assert disentanglement.sap_from_scores(scores)[0] == pytest.approx(expected, abs=1e-10)


def test_sap_ignores_collapsed_codes():
  rng = np.random.default_rng(14)
  a = rng.standard_normal(100)
  latents = np.stack([a, np.full(100, 0.3), 0.5 * a + rng.standard_normal(100)], axis=1)
  scores = mutual_info.squared_correlation_matrix(latents, a[:, None])
  assert scores[1, 0] == 0.0
  assert scores[0, 0] == pytest.approx(1.0)


def test_sap_and_modularity_hand_computed():
  scores = np.array([[0.9, 0.1],
                     [0.4, 0.7],
                     [0.2, 0.6]])
  # attribute 0: 0.9 - 0.4; attribute 1: 0.7 - 0.6
  np.testing.assert_allclose(disentanglement.sap_from_scores(scores), [0.5, 0.1], atol=1e-12)
  mi = np.array([[1.0, 0.0, 0.0],
                 [0.5, 0.5, 0.0],
                 [0.0, 0.0, 0.0],
                 [2.0, 1.0, 0.0]])
  # code 0: delta 0 -> 1; code 1: theta .25, delta (.5-.25)/(.25*2) = .5 -> .5;
  # code 2: uninformative -> 0; code 3: theta 4, delta (5-4)/(4*2) = .125 -> .875.
  assert disentanglement.modularity_from_mutual_information(mi) == pytest.approx(
      (1.0 + 0.5 + 0.0 + 0.875) / 4)
  mig = disentanglement.mig_from_mutual_information(mi, np.array([4.0, 2.0, 1.0]))
  np.testing.assert_allclose(mig, [(2.0 - 1.0) / 4.0, (1.0 - 0.5) / 2.0, 0.0])


def test_modularity_is_one_when_codes_depend_on_one_attribute_each():
  rng = np.random.default_rng(15)
  n = 500
  attributes = rng.standard_normal((n, 3))
  latents = np.stack([np.tanh(attributes[:, 0]), attributes[:, 1] ** 3,
                      -attributes[:, 2], np.exp(attributes[:, 0])], axis=1)
  mi = mutual_info.mutual_information_matrix(latents, attributes)
  assert disentanglement.modularity_from_mutual_information(mi) > 0.995
  # Mixing two attributes into one code lowers it.
  mixed = latents.copy()
  mixed[:, 0] = attributes[:, 0] + attributes[:, 1]
  mixed_mi = mutual_info.mutual_information_matrix(mixed, attributes)
  assert disentanglement.modularity_from_mutual_information(mixed_mi) < 0.9


def test_spearman_matrix_matches_scipy():
  rng = np.random.default_rng(16)
  latents = rng.standard_normal((50, 3))
  attributes = np.round(latents[:, :2] + rng.standard_normal((50, 2)), 1)  # with ties
  rho, p = mutual_info.spearman_matrix(latents, attributes)
  for d in range(3):
    for a in range(2):
      expected = stats.spearmanr(latents[:, d], attributes[:, a])
      assert rho[d, a] == pytest.approx(expected.statistic, abs=1e-12)
      assert p[d, a] == pytest.approx(expected.pvalue, rel=1e-8)


def test_regularized_dimension_correlations():
  rng = np.random.default_rng(17)
  attributes = rng.standard_normal((80, 2))
  latents = rng.standard_normal((80, 4))
  latents[:, 2] = np.exp(attributes[:, 0])
  latents[:, 0] = -attributes[:, 1] ** 3
  out = interp.regularized_dimension_correlations(latents, attributes, [2, 0],
                                                  ["lv_edv_ml", "rv_edv_ml"])
  assert out["lv_edv_ml"]["dim"] == 2
  assert out["lv_edv_ml"]["spearman_rho"] == pytest.approx(1.0)
  assert out["rv_edv_ml"]["spearman_rho"] == pytest.approx(-1.0)
  assert out["rv_edv_ml"]["p_value"] < 1e-10
  assert out["mean_abs_rho"] == pytest.approx(1.0)
  json.dumps(out)
  with pytest.raises(ValueError, match="outside"):
    interp.regularized_dimension_correlations(latents, attributes, [2, 9], ["a", "b"])


def test_interpretability_bad_input_messages():
  latents = np.zeros((20, 3))
  latents[:, 0] = np.arange(20)
  attributes = np.arange(40, dtype=float).reshape(20, 2)
  with pytest.raises(ValueError, match="2 attribute columns"):
    interp.interpretability_metrics(latents, attributes, ["lv_edv_ml"])
  with pytest.raises(ValueError, match="samples"):
    interp.interpretability_metrics(latents[:10], attributes, ["a", "b"])
  attributes[:, 1] = 5.0
  with pytest.raises(ValueError, match="'b' is constant"):
    interp.interpretability_metrics(latents, attributes, ["a", "b"])
  attributes[3, 1] = np.nan
  with pytest.raises(ValueError, match="non-finite value at row 3, column 1"):
    interp.interpretability_metrics(latents, attributes, ["a", "b"])


# ----------------------------------------------------------------------------------------------
# Sampled codes (the reference protocol), binned MIG, DCI
# ----------------------------------------------------------------------------------------------

def _wide_posterior_cohort(n=200):
  """Posterior means equal to the standardised attributes (plus two noise codes); code 0's
  posterior has SD 2, the others SD 0.01."""
  rng = np.random.default_rng(20)
  attributes = rng.normal([150.0, 110.0, 160.0], [30.0, 15.0, 35.0], size=(n, 3))
  standardised = (attributes - attributes.mean(axis=0)) / attributes.std(axis=0)
  mu = np.concatenate([standardised, rng.standard_normal((n, 2))], axis=1)
  logvar = np.full(mu.shape, np.log(1e-4))
  logvar[:, 0] = np.log(4.0)
  return mu, logvar, attributes


def test_sampled_codes_are_the_default_and_score_a_wide_posterior_lower():
  """The references score one draw z ~ q(z|x) per subject: a code whose mean follows the
  attribute exactly but whose posterior is wide scores lower than its mean would."""
  mu, logvar, attributes = _wide_posterior_cohort()
  out = interp.posterior_code_metrics(mu, logvar, attributes, NAMES, regularized_dims=(0, 1, 2))
  assert set(out) == {"interpretability", "regularized", "interpretability_mean_codes",
                      "regularized_mean_codes"}
  sampled, means = out["interpretability"], out["interpretability_mean_codes"]
  assert sampled["codes"] == out["regularized"]["codes"] == "sampled"
  assert sampled["seed"] == 0 and "q(z|x)" in sampled["protocol"] and "seed 0" in sampled["protocol"]
  assert means["codes"] == "mean" and means["protocol"] == "posterior means z = mu"
  # The headline block is computed on the seeded draw itself.
  z = mu + np.exp(0.5 * logvar) * np.random.default_rng(0).standard_normal(mu.shape)
  assert sampled["interpretability"]["lv_edv_ml"]["dim"] == 0
  assert sampled["interpretability"]["lv_edv_ml"]["score"] == pytest.approx(
      np.corrcoef(z[:, 0], attributes[:, 0])[0, 1] ** 2, rel=1e-10)
  # Mean code: exact; draw: mean + N(0, 4) noise on a unit-variance mean, R^2 about 1/5.
  assert means["interpretability"]["lv_edv_ml"]["score"] == pytest.approx(1.0)
  assert sampled["interpretability"]["lv_edv_ml"]["score"] < 0.4
  for key in ("mig", "mig_binned", "sap", "scc"):
    assert sampled[key]["lv_edv_ml"] < means[key]["lv_edv_ml"] - 0.3, key
  assert (sampled["dci"]["informativeness"]["lv_edv_ml"]
          < means["dci"]["informativeness"]["lv_edv_ml"] - 0.3)
  assert (abs(out["regularized"]["lv_edv_ml"]["spearman_rho"])
          < out["regularized_mean_codes"]["lv_edv_ml"]["spearman_rho"] - 0.3)
  # The narrow posteriors barely move.
  assert sampled["interpretability"]["myo_ed_ml"]["score"] > 0.99
  # Seeded: the same seed gives the same draw, another seed another one.
  np.testing.assert_array_equal(interp.posterior_codes(mu, logvar, seed=0)[0], z)
  other, protocol = interp.posterior_codes(mu, logvar, seed=1)
  assert "seed 1" in protocol and not np.allclose(other[:, 0], z[:, 0])


def test_mean_codes_protocol_swaps_the_blocks():
  mu, logvar, attributes = _wide_posterior_cohort(n=60)
  out = interp.posterior_code_metrics(mu, logvar, attributes, NAMES, codes="mean")
  assert set(out) == {"interpretability", "interpretability_sampled_codes"}
  assert out["interpretability"]["codes"] == "mean" and "seed" not in out["interpretability"]
  assert out["interpretability_sampled_codes"]["codes"] == "sampled"
  np.testing.assert_array_equal(interp.posterior_codes(mu, logvar, "mean")[0], mu)
  with pytest.raises(ValueError, match="codes must be one of"):
    interp.posterior_code_metrics(mu, logvar, attributes, NAMES, codes="median")
  with pytest.raises(ValueError, match=r"shape \(60, 5\) but log-variances \(60, 4\)"):
    interp.posterior_codes(mu, logvar[:, :4])
  with pytest.raises(ValueError, match="reserved"):
    interp.posterior_code_metrics(mu, logvar, attributes, ["lv", "codes", "rv"], (0, 1, 2))


def test_binned_mig_matches_mutual_info_score_by_hand():
  from sklearn.metrics import mutual_info_score
  rng = np.random.default_rng(22)
  n = 120
  attributes = rng.normal(size=(n, 2))
  latents = np.stack([attributes[:, 0] + 0.3 * rng.standard_normal(n), attributes[:, 1] ** 3,
                      rng.standard_normal(n)], axis=1)

  def bins(x):  # disentanglement_lib's histogram discretiser, written out.
    return np.digitize(x, np.histogram(x, 20)[1][:-1])

  expected_mi = np.array([[mutual_info_score(bins(attributes[:, a]), bins(latents[:, d]))
                           for a in range(2)] for d in range(3)])
  expected_entropy = np.array([stats.entropy(np.bincount(bins(attributes[:, a])))
                               for a in range(2)])
  ordered = np.sort(expected_mi, axis=0)
  mig, mi, entropy = disentanglement.binned_mig(latents, attributes)
  np.testing.assert_allclose(mi, expected_mi, rtol=1e-12)
  np.testing.assert_allclose(entropy, expected_entropy, rtol=1e-12)
  np.testing.assert_allclose(mig, (ordered[-1] - ordered[-2]) / expected_entropy, rtol=1e-12)
  assert disentanglement.histogram_discretize(latents).max() == 19


def test_binned_mig_of_a_disentangled_code_is_near_one_and_mixing_lowers_it():
  rng = np.random.default_rng(23)
  n = 2000
  attributes = rng.uniform(size=(n, 3)) * [100.0, 50.0, 120.0] + [80.0, 60.0, 90.0]
  latents = np.stack([0.1 * attributes[:, 2] - 3.0, 2.0 * attributes[:, 0], -attributes[:, 1],
                      rng.standard_normal(n)], axis=1)
  mig = disentanglement.binned_mig(latents, attributes)[0]
  assert mig.min() > 0.9
  np.testing.assert_allclose(disentanglement.binned_mig(latents[:, [3, 1, 0, 2]], attributes)[0],
                             mig, rtol=1e-12)
  mixed = latents.copy()
  mixed[:, 1] = attributes[:, 0] / 100.0 + attributes[:, 1] / 50.0
  mixed[:, 2] = attributes[:, 0] / 100.0 - attributes[:, 1] / 50.0
  mixed_mig = disentanglement.binned_mig(mixed, attributes)[0]
  assert mixed_mig[0] < 0.3 and mixed_mig[1] < 0.3 and mixed_mig[2] > 0.9


def test_dci_of_a_disentangled_code_is_one_and_mixing_lowers_it():
  rng = np.random.default_rng(24)
  n = 240
  attributes = rng.uniform(size=(n, 3))
  latents = np.stack([np.exp(attributes[:, 1]), 2.0 * attributes[:, 0] - 1.0,
                      -attributes[:, 2], rng.standard_normal(n)], axis=1)
  out = disentanglement.dci_scores(latents, attributes, NAMES)
  assert out["disentanglement"] > 0.99 and out["completeness"] > 0.99
  assert out["informativeness"]["mean"] > 0.95
  assert out["num_train"] == 160 and out["num_held_out"] == 80
  importance = np.array([out["importance"][name] for name in NAMES]).T
  assert list(importance.argmax(axis=0)) == [1, 0, 2]
  # Permuting the codes permutes the importance rows and leaves the scores unchanged.
  permuted = disentanglement.dci_scores(latents[:, [3, 2, 0, 1]], attributes, NAMES)
  for key in ("disentanglement", "completeness"):
    assert permuted[key] == pytest.approx(out[key], abs=1e-5)
  assert permuted["informativeness"]["mean"] == pytest.approx(out["informativeness"]["mean"],
                                                              abs=1e-5)
  mixed = latents.copy()
  mixed[:, 0] = attributes[:, 0] + attributes[:, 1]
  mixed[:, 1] = attributes[:, 0] - attributes[:, 1]
  mixed_out = disentanglement.dci_scores(mixed, attributes, NAMES)
  assert mixed_out["disentanglement"] < 0.8 and mixed_out["completeness"] < 0.8


def test_dci_scores_of_hand_computed_importances():
  # Code 0 serves factor 0 only, code 1 both equally: D = 0.5 * 1 + 0.5 * 0 = 0.5.
  importance = np.array([[1.0, 0.0], [0.5, 0.5]])
  assert disentanglement.dci_disentanglement(importance) == pytest.approx(0.5, abs=1e-9)
  # Factor 0 spread 2/3 : 1/3 over the codes (weight 0.75), factor 1 on code 1 only (0.25).
  spread = -(2 / 3 * np.log2(2 / 3) + 1 / 3 * np.log2(1 / 3))
  assert disentanglement.dci_completeness(importance) == pytest.approx(
      0.75 * (1 - spread) + 0.25, abs=1e-9)
  assert disentanglement.dci_disentanglement(np.eye(3)) == pytest.approx(1.0, abs=1e-9)
  assert disentanglement.dci_completeness(np.ones((4, 2))) == pytest.approx(0.0, abs=1e-9)
  with pytest.raises(ValueError, match="2 training and 2 held-out"):
    disentanglement.dci_split(4)
