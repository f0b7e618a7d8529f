"""TCAV (cardiac_jax.interpret.tcav) on constructed layers whose concept directions are known."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from cardiac_jax.interpret import tcav

DIM = 8


@pytest.fixture(scope="module")
def pool():
  return np.random.default_rng(0).normal(size=(600, DIM))


def _linear_logit(a):
  """logit = 2 a_0 - a_3: the concept "high a_0" raises it, "high a_3" lowers it."""
  return 2.0 * a[0] - a[3]


def _curved_logit(a):
  """logit = a_0 + 0.5 a_1^2: a gradient that varies between examples along e_1."""
  return a[0] + 0.5 * jnp.square(a[1])


def test_logistic_regression_matches_its_optimality_condition():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(200, 3))
  y = (x @ np.array([1.0, -2.0, 0.5]) + 0.3 + rng.normal(size=200) > 0).astype(float)
  w, b = tcav.fit_logistic_regression(x, y, l2=0.01)
  p = 1 / (1 + np.exp(-(x @ w + b)))
  # Zero gradient of mean logloss + l2/2 |w|^2.
  assert np.allclose(x.T @ (p - y) / len(y) + 0.01 * w, 0.0, atol=1e-8)
  assert abs(np.mean(p - y)) < 1e-6
  assert np.corrcoef(w, [1.0, -2.0, 0.5])[0, 1] > 0.95


def test_cav_points_toward_the_concept_and_is_accurate(pool):
  concept, negative = tcav.concept_sets(pool[:, 2], pool, fraction=0.2, direction="high")
  assert len(concept) == len(negative) == 120
  assert concept[:, 2].min() >= negative[:, 2].max()
  cav = tcav.train_cav(concept, negative, seed=0)
  unit = cav.vector / np.linalg.norm(cav.vector)
  assert unit[2] > 0.9                      # Along +e_2, toward the concept.
  assert cav.accuracy == 1.0
  # Unequal sets are truncated to the smaller one; the held-out third is scored.
  cav_small = tcav.train_cav(concept[:30], negative, seed=0)
  assert cav_small.accuracy * 20 == pytest.approx(round(cav_small.accuracy * 20))


def test_concept_sets_low_high_and_nan(pool):
  values = pool[:, 0].copy()
  values[:100] = np.nan                     # Not measurable: never in a set.
  low, high = tcav.concept_sets(values, pool, fraction=0.1, direction="low")
  assert len(low) == 50
  assert np.all(low[:, 0] <= np.nanpercentile(values, 10) + 1e-12)
  assert not any((row == pool[:100]).all(axis=1).any() for row in low)
  high2, low2 = tcav.concept_sets(values, pool, fraction=0.1, direction="high")
  assert np.array_equal(high, high2) and np.array_equal(low, low2)
  with pytest.raises(ValueError, match="direction"):
    tcav.concept_sets(values, pool, direction="up")


def test_logit_gradients_and_directional_derivatives(pool):
  grads = tcav.logit_gradients(_curved_logit, pool[:5])
  expected = np.zeros((5, DIM))
  expected[:, 0] = 1.0
  expected[:, 1] = pool[:5, 1]
  assert np.allclose(grads, expected, atol=1e-5)
  derivatives = tcav.directional_derivatives(grads, np.eye(DIM)[1])
  assert np.allclose(derivatives, pool[:5, 1], atol=1e-5)
  assert tcav.tcav_score(np.array([1.0, -1.0, 0.0, 2.0])) == 0.5


def test_known_linear_logit_scores_and_significance(pool):
  grads = tcav.logit_gradients(_linear_logit, pool)
  concepts = {
      "high a0": tcav.concept_sets(pool[:, 0], pool, 0.2, "high"),
      "low a0": tcav.concept_sets(pool[:, 0], pool, 0.2, "low"),
      "high a3": tcav.concept_sets(pool[:, 3], pool, 0.2, "high"),
  }
  # With a constant gradient every random CAV scores 0 or 1; 30 runs make that baseline clear.
  randoms = tcav.random_sets(pool, num_sets=30, size=120, seed=3)
  results = tcav.run_tcav(grads, concepts, randoms, alpha=0.05, seed=0)
  high, low, negative = results["high a0"], results["low a0"], results["high a3"]
  assert high.score == 1.0 and low.score == 0.0 and negative.score == 0.0
  # S = grad . v with grad = (2, 0, 0, -1, ...) for every example.
  assert high.mean_derivative == pytest.approx(2 * high.cav.vector[0] - high.cav.vector[3])
  assert high.mean_derivative > 0 > low.mean_derivative
  for result in results.values():
    assert result.significant, (result.name, result.p_value, result.random_run_scores)
    assert result.cav_accuracy > 0.95
    assert len(result.random_run_scores) == 30 and result.spread == pytest.approx(
        np.std(result.random_run_scores))
  assert np.all(high.random_run_scores == 1.0)
  assert 0 < np.mean(high.random_baseline_scores) < 1   # Random directions: both signs.


def test_irrelevant_concept_is_not_significant(pool):
  grads = tcav.logit_gradients(_curved_logit, pool)
  concepts = {
      "high a0": tcav.concept_sets(pool[:, 0], pool, 0.2, "high"),
      # a_5 never enters the logit: its CAV is about as useful as a random one.
      "high a5": tcav.concept_sets(pool[:, 5], pool, 0.2, "high"),
  }
  # A concept that is itself a random draw of the pool.
  rng = np.random.default_rng(7)
  concepts["random"] = (pool[rng.choice(600, 120, replace=False)],
                        pool[rng.choice(600, 120, replace=False)])
  randoms = tcav.random_sets(pool, num_sets=12, size=120, seed=5)
  results = tcav.run_tcav(grads, concepts, randoms, alpha=0.05, seed=0)
  assert results["high a0"].significant and results["high a0"].score > 0.9
  assert not results["high a5"].significant, results["high a5"]
  assert not results["random"].significant, results["random"]
  assert results["high a5"].p_value > 0.05 / 3


def test_t_test_edge_cases_and_bad_input():
  assert tcav.two_sided_t_test([1.0, 1.0], [0.0, 0.0]) == 0.0
  assert tcav.two_sided_t_test([0.5, 0.5], [0.5, 0.5]) == 1.0
  assert tcav.two_sided_t_test([0.1, 0.2, 0.3], [0.1, 0.2, 0.3]) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="different widths"):
    tcav.train_cav(np.ones((10, 3)), np.ones((10, 4)))
  with pytest.raises(ValueError, match="non-finite"):
    tcav.train_cav(np.full((10, 3), np.nan), np.ones((10, 3)))
  with pytest.raises(ValueError, match="at least 2 random sets"):
    tcav.run_tcav(np.ones((4, 3)), {}, [np.ones((5, 3))])


def _two_class_layer(rng, num_negative: int, num_positive: int):
  """(activations (N, DIM), labels (N,)): a concept layer where the positives sit 3 units along
  e_0, the direction `_curved_logit` rises along."""
  labels = np.r_[np.zeros(num_negative), np.ones(num_positive)]
  activations = rng.normal(size=(len(labels), DIM))
  activations[:, 0] += 3.0 * labels
  return activations, labels


def test_label_proxy_is_significant_only_in_a_pool_of_both_classes():
  """A control that carries nothing beyond the class (label + a random number per example),
  over 10 draws of the layer: significant in every pool of both classes (the classifier's own
  train and val examples), about as often as a random concept in a pool of held-out negatives."""

  def label_proxy_result(rng, seed, grads, pool, labels):
    proxy = labels + rng.random(len(labels))
    concepts = {"label proxy": tcav.concept_sets(proxy, pool, 0.2, "high")}
    randoms = tcav.random_sets(pool, num_sets=10, size=len(concepts["label proxy"][0]),
                               seed=seed)
    return tcav.run_tcav(grads, concepts, randoms, alpha=0.05, seed=seed)["label proxy"]

  held_out_significant = 0
  for seed in range(10):
    rng = np.random.default_rng(100 + seed)
    explained, _ = _two_class_layer(rng, 100, 100)
    grads = tcav.logit_gradients(_curved_logit, explained)
    # Both classes: the proxy's concept set is the positives, its CAV the decision direction.
    pooled = label_proxy_result(rng, seed, grads, *_two_class_layer(rng, 300, 300))
    assert pooled.significant and pooled.score > 0.9, (seed, pooled)
    # Negatives only: the same proxy is noise.
    held_out = label_proxy_result(rng, seed, grads, *_two_class_layer(rng, 600, 0))
    assert held_out.cav_accuracy < 0.75, (seed, held_out)
    held_out_significant += held_out.significant
  # TCAV's t-test of one fixed concept set against random pairs runs a little above its nominal
  # 5 % false positives; 10 of 10 is the pooled protocol's outcome.
  assert held_out_significant <= 3
