"""cardiac_jax.phenotypes: inverse-normal transform, latent matching, linear probe, file formats
(analytic checks on synthetic numbers)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from scipy import stats

from cardiac_jax import phenotypes


# ----------------------------------------------------------------------------- INT

def test_inverse_normal_gives_blom_normal_scores_in_rank_order():
  rng = np.random.default_rng(0)
  x = rng.exponential(size=(50, 3)) ** 3          # Skewed, no ties.
  z = phenotypes.inverse_normal_transform(x)
  n = len(x)
  expected = stats.norm.ppf((np.arange(1, n + 1) - 0.375) / (n + 0.25))
  for j in range(3):
    np.testing.assert_allclose(np.sort(z[:, j]), expected, atol=1e-12)
    # Rank order kept: the transformed column sorts the subjects exactly like the raw one.
    np.testing.assert_array_equal(np.argsort(z[:, j]), np.argsort(x[:, j]))
  assert abs(z.mean()) < 1e-12 and stats.skew(z[:, 0]) == pytest.approx(0.0, abs=1e-12)


def test_inverse_normal_averages_ties_and_keeps_nan():
  x = np.array([3.0, np.nan, 1.0, 3.0, 2.0, np.nan])
  z = phenotypes.inverse_normal_transform(x)
  assert np.isnan(z[[1, 5]]).all() and np.isfinite(z[[0, 2, 3, 4]]).all()
  n = 4                                           # NaN are not counted.
  ranks = np.array([3.5, 1.0, 3.5, 2.0])          # Average rank for the tied 3.0s.
  np.testing.assert_allclose(z[[0, 2, 3, 4]],
                             stats.norm.ppf((ranks - 0.375) / (n + 0.25)), atol=1e-12)
  assert z[0] == z[3]
  assert np.isnan(phenotypes.inverse_normal_transform(np.full((4, 2), np.nan))).all()
  with pytest.raises(ValueError, match="shape"):
    phenotypes.inverse_normal_transform(np.zeros((2, 2, 2)))


# ----------------------------------------------------------------------------- matching

def test_matching_finds_a_permuted_sign_flipped_noisy_copy():
  rng = np.random.default_rng(1)
  n, d = 300, 16
  a = rng.normal(size=(n, d)) + 2.0               # Offset: cosine differs from Pearson.
  permutation = rng.permutation(d)
  signs = rng.choice([-1.0, 1.0], size=d)
  b = a[:, permutation] * signs + 0.3 * rng.normal(size=(n, d))
  match = phenotypes.match_latents(a, b)
  # Latent i of a is column j of b where permutation[j] == i.
  np.testing.assert_array_equal(match.best_pearson_index, np.argsort(permutation))
  assert match.best_abs_pearson.min() > 0.9
  counts = phenotypes.reproducibility_counts(match, 0.5)
  assert counts["pearson"] == d and counts["either"] == d and counts["dim"] == d
  assert counts["pearson_distinct_partners"] == d
  np.testing.assert_allclose(np.abs(match.pearson[np.arange(d), np.argsort(permutation)]),
                             match.best_abs_pearson)
  # Signs are recovered in the signed matrix.
  np.testing.assert_array_equal(
      np.sign(match.pearson[np.arange(d), np.argsort(permutation)]),
      signs[np.argsort(permutation)])


def test_matching_independent_codes_reproduce_nothing():
  rng = np.random.default_rng(2)
  a, b = rng.normal(size=(500, 16)), rng.normal(size=(500, 16))
  match = phenotypes.match_latents(a, b)
  counts = phenotypes.reproducibility_counts(match, 0.5)
  assert counts["pearson"] == 0 and counts["cosine"] == 0
  assert match.best_abs_pearson.max() < 0.25


def test_matching_cosine_is_uncentred_and_constant_columns_match_nothing():
  rng = np.random.default_rng(3)
  a = rng.normal(size=(200, 2))
  b = np.stack([a[:, 0] + 50.0, np.full(200, 7.0)], axis=1)
  match = phenotypes.match_latents(a, b)
  assert match.best_abs_pearson[0] == pytest.approx(1.0)
  assert abs(match.cosine[0, 0]) < 0.3           # The offset dominates the raw vector.
  assert match.pearson[1, 1] == 0.0 and np.isfinite(match.pearson).all()
  with pytest.raises(ValueError, match="same subjects"):
    phenotypes.match_latents(a, b[:10])
  with pytest.raises(ValueError, match="at least 3"):
    phenotypes.match_latents(a[:2], b[:2])


# ----------------------------------------------------------------------------- probe

def test_probe_recovers_a_linear_target_and_not_noise():
  rng = np.random.default_rng(4)
  z = rng.normal(size=(600, 10)) * rng.uniform(0.1, 10.0, size=10)
  w = rng.normal(size=10)
  y = z @ w + 0.01 * rng.normal(size=600)
  y[[0, 5, 400]] = np.nan                          # Missing targets are dropped and counted.
  result = phenotypes.linear_probe(z[:300], y[:300], z[300:], y[300:])
  assert result.r2 > 0.99 and result.pearson_r > 0.99
  assert (result.dropped_train, result.dropped_test) == (2, 1)
  assert (result.n_train, result.n_test) == (298, 299) and len(result.predictions) == 299
  assert result.alpha in phenotypes.DEFAULT_ALPHAS
  noise = rng.normal(size=600)
  null = phenotypes.linear_probe(z[:300], noise[:300], z[300:], noise[300:])
  assert abs(null.r2) < 0.1 and null.r2 < 0.05
  with pytest.raises(ValueError, match="training"):
    phenotypes.linear_probe(z[:2], y[1:3], z[300:], y[300:])


# ----------------------------------------------------------------------------- files

def test_latents_csv_and_plink_round_trip(tmp_path):
  rng = np.random.default_rng(5)
  z = rng.normal(size=(4, 3)).astype(np.float32)
  z[1, 2] = np.nan
  subjects, splits = ["s1", "s2", "s3", "s4"], ["train", "train", "test", "val"]
  path = str(tmp_path / "out" / "latents.csv")
  phenotypes.write_latents_csv(path, subjects, splits, z)
  with open(path) as f:
    lines = f.read().splitlines()
  assert lines[0] == "subject,split,z0,z1,z2" and lines[2].endswith(",NA")
  table = phenotypes.read_latents(path)
  assert table.subjects == subjects and table.splits == splits
  # 9 significant digits give back the float32 codes exactly.
  np.testing.assert_array_equal(table.z.astype(np.float32), z)
  assert sorted(os.listdir(tmp_path / "out")) == ["latents.csv"]   # No temporary left.

  plink = str(tmp_path / "pheno.txt")
  phenotypes.write_plink_phenotypes(plink, subjects, z)
  with open(plink) as f:
    lines = f.read().splitlines()
  assert lines[0].split() == ["FID", "IID", "z0", "z1", "z2"]
  assert lines[2].split()[:2] == ["s2", "s2"] and lines[2].split()[-1] == "NA"
  table = phenotypes.read_latents(plink)
  np.testing.assert_array_equal(table.z.astype(np.float32), z)
  assert table.subjects == subjects

  with pytest.raises(phenotypes.LatentsFileError, match="whitespace"):
    phenotypes.write_plink_phenotypes(plink, ["a b", "c", "d", "e"], z)
  with pytest.raises(phenotypes.LatentsFileError, match="duplicate"):
    phenotypes.write_latents_csv(path, ["s1", "s1", "s3", "s4"], splits, z)
  bad = tmp_path / "bad.csv"
  bad.write_text("subject,split,z0,z2\ns1,train,1,2\n")
  with pytest.raises(phenotypes.LatentsFileError, match="header"):
    phenotypes.read_latents_csv(str(bad))
  bad.write_text("subject,split,z0\ns1,train,abc\n")
  with pytest.raises(phenotypes.LatentsFileError, match="line 2.*z0"):
    phenotypes.read_latents_csv(str(bad))
  with pytest.raises(FileNotFoundError):
    phenotypes.read_latents(str(tmp_path / "absent.csv"))
  assert phenotypes.common_subjects([table, phenotypes.LatentsTable(
      ["s3", "s1"], ["", ""], np.zeros((2, 3)))]) == ["s1", "s3"]


def test_latents_table_splits_finiteness_and_path(tmp_path):
  path = str(tmp_path / "latents.csv")
  z = np.arange(8.0).reshape(4, 2)
  z[3, 1] = np.nan
  phenotypes.write_latents_csv(path, ["s1", "s2", "s3", "s4"], ["train", "test", "train", "val"],
                               z)
  table = phenotypes.read_latents(path)
  assert table.path == path
  np.testing.assert_array_equal(table.split_indices(["train", "val"]), [0, 2, 3])
  train = table.in_splits(["train"])
  assert (train.subjects, train.splits, train.path) == (["s1", "s3"], ["train"] * 2, path)
  np.testing.assert_array_equal(train.z, z[[0, 2]])
  assert table.in_splits(["absent"]).z.shape == (0, 2)
  assert train.require_finite() is train
  with pytest.raises(phenotypes.LatentsFileError,
                      match=r"latents.csv: non-finite latents for subjects \['s4'\]"):
    table.require_finite()
  assert np.isnan(phenotypes.parse_number(" na ", "x"))
  assert np.isnan(phenotypes.parse_number(None, "x"))
  assert phenotypes.parse_number("1e3", "x") == 1000.0
  with pytest.raises(phenotypes.LatentsFileError, match="cell A holds 'one', not a number"):
    phenotypes.parse_number("one", "cell A")
