"""experiments.directions: scoring an analytic generator whose latent coordinates provably
control known factors, the summary's thresholds, and the command end to end on smoke-trained
DCGAN and VAE runs (segmenter, voynov / pca / sefa / ganspace, grid, tables, comparison)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from cardiac_jax import direction_scoring as scoring
from cardiac_jax import factors, structures
from experiments import directions as experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64
ROTATION_DEG_PER_UNIT = 60.0   # z1 in [-3.5, 3.5] turns the RV across the +-180 degree seam.


def toy_generator(z):
  """(B, 4) -> (B, 64, 64, 1): z0 sets the LV radius, z1 turns the RV about the LV, z2 moves
  the heart right, z3 sets the LV brightness; the myocardial ring and RV keep their size."""
  yy, xx = jnp.mgrid[:SIZE, :SIZE].astype(jnp.float32)
  radius = (7.0 + 0.8 * z[:, 0])[:, None, None]
  angle = jnp.radians(ROTATION_DEG_PER_UNIT * z[:, 1])[:, None, None]
  cx, cy = (31.5 + 1.5 * z[:, 2])[:, None, None], 31.5
  brightness = (0.88 + 0.1 * jnp.tanh(z[:, 3] / 3.0))[:, None, None]
  d = jnp.hypot(yy - cy, xx - cx)
  reach = radius + 3.0 + 4.5 + 1.0
  rv = jnp.hypot(yy - (cy + reach * jnp.sin(angle)), xx - (cx - reach * jnp.cos(angle))) < 4.5
  image = jnp.where(d < radius, brightness,
                    jnp.where(d < radius + 3.0, 0.3, jnp.where(rv, 0.6, 0.0)))
  return image[..., None]


def oracle_segmenter(images):
  """Labels of the toy generator's images from their intensity levels."""
  images = np.asarray(images)
  return np.where(images > 0.72, structures.LV_BLOOD_POOL,
                  np.where(images > 0.45, structures.RV_BLOOD_POOL,
                           np.where(images > 0.15, structures.LV_MYOCARDIUM, 0))).astype(np.uint8)


def test_toy_generator_directions_score_their_known_factors():
  directions = np.concatenate([np.eye(4), [[1.0, 0.0, 1.0, 0.0]]]).astype(np.float32)
  base = np.random.default_rng(0).uniform(-1.5, 1.5, (6, 4)).astype(np.float32)
  shifts = np.linspace(-2.0, 2.0, 7)
  scores = scoring.score_directions(toy_generator, directions, oracle_segmenter, shifts,
                                    base, values_ranking=np.arange(5.0, 0.0, -1.0))
  assert scores["values"].shape == (5, 6, 7, len(factors.FACTORS))
  assert scores["rho"].shape == (5, 6, len(factors.FACTORS))
  rows = {r["direction"]: r for r in scores["rows"]}
  expected = {0: "lv_area", 1: "rotation", 2: "position_x", 3: "intensity"}
  for k, name in expected.items():
    assert rows[k]["main_factor"] == name, rows[k]
    assert rows[k]["main_rho"] > 0.97, rows[k]
    assert rows[k]["main_finite_fraction"] == 1.0
    assert rows[k]["max_other_abs_rho"] < 0.5, rows[k]
    assert rows[k]["controls"]
  # The measured rotation really crossed the seam, and still counts as monotonic.
  rotation = scores["values"][1, :, :, factors.FACTORS.index("rotation")]
  assert np.nanmax(np.abs(rotation)) > 170.0
  # The z2 direction moves the LV by 1.5 px per unit: 6 px over the shifts.
  x = factors.FACTORS.index("position_x")
  np.testing.assert_allclose(np.ptp(scores["values"][2, :, :, x], axis=1), 6.0, atol=0.3)
  # A mixed direction changes LV size and position: high rho, but it controls nothing alone.
  assert rows[4]["main_factor"] in ("lv_area", "position_x")
  assert rows[4]["max_other_abs_rho"] > 0.9 and not rows[4]["controls"]
  summary = scores["summary"]
  assert summary["num_controlling_directions"] == 4
  assert summary["num_distinct_factors_controlled"] == 4
  # position_x is counted as the cohort's one 2-D position factor.
  assert summary["controlled_factors"] == {"lv_area": [0], "rotation": [1], "position": [2],
                                           "intensity": [3]}
  assert summary["best_per_factor"]["lv_area"]["direction"] in (0, 4)
  assert rows[0]["value"] == 5.0


def test_summary_counts_distinct_factors_and_applies_the_thresholds():
  f = len(factors.FACTORS)
  lv, rv, rot, x = (factors.FACTORS.index(n)
                    for n in ("lv_area", "rv_area", "rotation", "position_x"))
  rho = np.zeros((6, 3, f))
  rho[0, :, lv] = 0.9
  rho[1, :, lv] = -0.85            # The same factor again: one distinct factor so far.
  rho[2, :, rv] = 0.95
  rho[2, :, rot] = 0.6             # Above the other-factor threshold of 0.5: not controlling.
  rho[3, :, rot] = 1.0
  rho[3, 1:, rot] = np.nan         # Finite for only a third of the base latents.
  rho[3, :, rv] = 0.3
  rho[4, :, x] = 1.0               # Monotonic, but moves position_x by a tenth of a resolution.
  rho[5, :, x] = 0.9
  rho[5, :, rot] = 0.99            # A monotonic side effect, too small to count (below).
  ranges = np.ones((6, f))
  ranges[4, x] = 0.1
  ranges[5, rot] = 0.2
  ranges[5, x] = 3.0
  rows, summary = scoring.summarize_scores(rho, ranges, np.arange(6.0))
  assert [r["main_factor"] for r in rows] == ["lv_area", "lv_area", "rv_area", "rv_area",
                                              "position_x", "rotation"]
  assert [r["controls"] for r in rows] == [True, True, False, False, False, False]
  assert rows[2]["max_other_factor"] == "rotation" and rows[2]["changed_others"] == "rotation"
  assert rows[2]["max_other_abs_rho"] == pytest.approx(0.6)
  assert summary["num_controlling_directions"] == 2
  assert summary["num_distinct_factors_controlled"] == 1
  assert summary["controlled_factors"] == {"lv_area": [0, 1]}
  # Ranked by effect, direction 5's main factor is the one it moves a lot: position_x, and the
  # rotation drift (0.2 resolutions) does not count as a change.
  rows, summary = scoring.summarize_scores(
      rho, ranges, np.arange(6.0), scoring.Criteria(main_factor_by="effect"))
  assert rows[5]["main_factor"] == "position_x" and rows[5]["changed_others"] == ""
  assert rows[5]["controls"] and not rows[4]["controls"]
  assert summary["controlled_factors"] == {"lv_area": [0, 1], "position": [5]}
  # Rho conditions only: direction 4 controls position_x, direction 5's drift blocks it.
  rows, _ = scoring.summarize_scores(
      rho, ranges, np.arange(6.0),
      scoring.Criteria(min_effect=0.0, other_range_threshold=0.0, main_factor_by="effect"))
  assert rows[4]["controls"] and not rows[5]["controls"]
  _, lenient = scoring.summarize_scores(rho, ranges, np.arange(6.0),
                                        scoring.Criteria(other_threshold=0.7))
  assert lenient["num_distinct_factors_controlled"] == 2
  assert lenient["best_per_factor"]["rv_area"] == {
      "direction": 2, "rho": pytest.approx(0.95), "relative_range": 1.0,
      "is_main_factor": True, "controls": True, "max_other_abs_rho": pytest.approx(0.6)}
  with pytest.raises(ValueError, match="main_factor_by"):
    scoring.Criteria(main_factor_by="size")


def test_position_is_one_2d_factor_unless_asked_otherwise():
  """A diagonal translation (position y and x both monotonic and large) controls "position";
  an x and a y translation count as one distinct factor; --nojoint_position splits them."""
  f = len(factors.FACTORS)
  x, y, rot = (factors.FACTORS.index(n) for n in ("position_x", "position_y", "rotation"))
  rho = np.zeros((3, 2, f))
  rho[0, :, y], rho[0, :, x] = 0.95, 0.9     # Diagonal.
  rho[1, :, x] = -0.9                         # Along x only.
  rho[2, :, y], rho[2, :, rot] = 0.9, 0.85   # Moves y and rotates: not a clean edit.
  ranges = np.full((3, f), 2.0)
  rows, summary = scoring.summarize_scores(rho, ranges, np.arange(3.0))
  assert [r["main_factor"] for r in rows] == ["position_y", "position_x", "position_y"]
  assert [r["controls"] for r in rows] == [True, True, False]
  assert rows[0]["max_other_factor"] != "position_x" and rows[2]["changed_others"] == "rotation"
  assert summary["controlled_factors"] == {"position": [0, 1]}
  assert summary["num_distinct_factors_controlled"] == 1
  rows, summary = scoring.summarize_scores(rho, ranges, np.arange(3.0),
                                           scoring.Criteria(joint_position=False))
  assert [r["controls"] for r in rows] == [False, True, False]
  assert rows[0]["changed_others"] == "position_x"
  assert summary["controlled_factors"] == {"position_x": [1]}
  assert factors.factor_group("position_y") == "position"
  assert factors.factor_group("position_y", joint=False) == "position_y"
  assert factors.factor_group("rotation") == "rotation"


# ------------------------------------------------------------------------------ end to end
TINY = dict(num_directions=3, num_base_latents=2, num_shifts=3, segmenter_steps=3,
            segmenter_batch_size=4, segmenter_channels=(4, 8), segmenter_augment=False,
            voynov_steps=3, voynov_batch_size=4, ganspace_samples=64, grid_rows=2,
            generate_batch_size=8)


def _untrained_run(spec: str, workdir: str) -> str:
  """The workdir of an untrained smoke run, written by the project's own writers (config.json
  by the training loop's check, a step-0 checkpoint by its Checkpointer). Parameters are drawn
  with numpy (kernels N(0, 0.02^2), scales and variances 1, the rest 0): the directions need a
  generator, not a good one, and compiling the random initialisers of two models costs most of
  a minute on a loaded CPU."""
  import jax
  from cardiac_jax import checkpointing, families, run_config, training
  from experiments.configs import get_config
  config = get_config(spec)
  family = families.make_family(config)
  abstract = jax.eval_shape(family.init_state, jax.random.key(config.seed))
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = str(getattr(path[-1], "key", getattr(path[-1], "name", ""))) if path else ""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return jax.random.key(config.seed)
    if not np.issubdtype(leaf.dtype, np.floating):
      return np.zeros(leaf.shape, leaf.dtype)
    if name == "kernel":
      return (0.02 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
    return np.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, leaf.dtype)

  state = jax.tree_util.tree_map_with_path(fill, abstract)
  run_config.check_workdir_config(workdir, config)
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")) as checkpointer:
    checkpointer.save(0, state, force=True)
    checkpointer.wait()
  return workdir


@pytest.fixture(scope="module")
def smoke_cohort():
  """The smoke cohort prepared in the session's cache (shared with other end-to-end tests)."""
  from experiments import common
  from experiments.configs import get_config
  return common.prepared_dir(get_config("vae:smoke"))


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, smoke_cohort):
  return _untrained_run("vae:smoke", str(tmp_path_factory.mktemp("vae_run")))


@pytest.fixture(scope="module")
def dcgan_run(tmp_path_factory, smoke_cohort):
  return _untrained_run("dcgan:smoke", str(tmp_path_factory.mktemp("dcgan_run")))


def _read_csv(path: str) -> list[dict]:
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def _check_method_folder(folder: str, num_directions: int, method: str) -> dict:
  for name in ("scores.csv", "scores.md", "results.json", "grid.png", "factor_values.npz",
               "directions.npz", "directions.json"):
    assert os.path.exists(os.path.join(folder, name)), name
  assert os.path.getsize(os.path.join(folder, "grid.png")) > 1000
  rows = _read_csv(os.path.join(folder, "scores.csv"))
  assert [int(r["direction"]) for r in rows] == list(range(num_directions))
  for column in ("value", "main_factor", "main_rho", "second_factor", "second_rho",
                 "max_other_abs_rho", "controls", *(f"rho_{n}" for n in factors.FACTORS)):
    assert column in rows[0], column
  with open(os.path.join(folder, "scores.md"), encoding="utf-8") as f:
    table = [line for line in f if line.startswith("| ")]
  assert len(table) == 1 + num_directions
  with open(os.path.join(folder, "results.json"), encoding="utf-8") as f:
    result = json.load(f)
  assert result["method"] == method and result["num_directions"] == num_directions
  assert len(result["table"]) == num_directions
  assert 0 <= result["num_distinct_factors_controlled"] <= result["num_controlling_directions"]
  assert set(result["best_per_factor"]) == set(factors.FACTORS)
  assert 0.0 <= result["segmenter"]["dice"]["mean"] <= 1.0
  with np.load(os.path.join(folder, "factor_values.npz")) as data:
    assert data["values"].shape == (num_directions, TINY["num_base_latents"],
                                    TINY["num_shifts"], len(factors.FACTORS))
  return result


def test_vae_methods_comparison_and_reuse(vae_run):
  workdir = vae_run
  messages = []
  settings = experiment.Settings(**TINY)
  results = experiment.run(workdir, ["pca", "sefa", "ganspace"], settings, log=messages.append)
  root = os.path.join(workdir, "directions")
  for method in ("pca", "sefa", "ganspace"):
    out = _check_method_folder(os.path.join(root, method), 3, method)
    assert out["kind"] == "vae"
  assert "posterior means" in results["pca"]["pca_source"]
  rows = _read_csv(os.path.join(root, "comparison.csv"))
  assert [r["method"] for r in rows] == ["pca", "sefa", "ganspace"]
  with open(os.path.join(root, "comparison.md"), encoding="utf-8") as f:
    assert sum(line.startswith("| smoke") or line.startswith("| vae") for line in f) == 3
  # A rerun reuses the saved segmenter and directions.
  messages.clear()
  experiment.run(workdir, ["sefa"], settings, log=messages.append)
  assert any("segmenter reused" in m for m in messages)
  assert any("reused from" in m and "directions.npz" in m for m in messages)
  # SeFa of the decoder's first Dense kernel, as the library computes it.
  from cardiac_jax import directions as dl
  state = experiment.load_generator_run(workdir).state
  expected = dl.sefa_directions(np.asarray(state.params["decoder"]["from_latent"]["kernel"]), 3)
  with np.load(os.path.join(root, "sefa", "directions.npz")) as data:
    np.testing.assert_allclose(data["vectors"], expected.vectors, atol=1e-6)


def test_command_line_voynov_on_the_dcgan(dcgan_run):
  workdir = dcgan_run
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  args = [sys.executable, "-m", "experiments.directions", f"--workdir={workdir}",
          "--method=voynov", "--num_directions=3", "--num_base_latents=2", "--num_shifts=3",
          "--segmenter_steps=3", "--segmenter_batch_size=4", "--segmenter_channels=4,8",
          "--nosegmenter_augment",
          "--voynov_steps=3", "--voynov_batch_size=4", "--grid_rows=2"]
  result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| dir |" in result.stdout
  folder = os.path.join(workdir, "directions", "voynov")
  out = _check_method_folder(folder, 3, "voynov")
  assert set(out["reconstructor"]) >= {"accuracy", "chance", "shift_mae",
                                       "accuracy_per_direction"}
  assert out["reconstructor"]["chance"] == pytest.approx(1 / 3)
  values = [r["value"] for r in out["table"]]
  assert values == sorted(values, reverse=True)  # Ranked by reconstructor accuracy.
  assert sorted(r["source_index"] for r in out["table"]) == [0, 1, 2]
  segmenter_meta = os.path.join(workdir, "directions", "segmenter", "segmenter.json")
  with open(segmenter_meta, encoding="utf-8") as f:
    meta = json.load(f)
  assert meta["num_steps"] == 3 and meta["quality"]["split"] in ("val", "test", "train")
  assert set(meta["cohort_spread"]) == set(factors.FACTORS)
  corr = meta["cohort_correlation"]
  assert set(corr) == set(factors.FACTORS)
  for f in factors.FACTORS:
    if corr[f][f] is not None:  # None: the factor is NaN on every cohort image.
      assert corr[f][f] == pytest.approx(1.0)
    for g in factors.FACTORS:
      assert corr[f][g] == corr[g][f]
      assert corr[f][g] is None or -1.0 <= corr[f][g] <= 1.0
  # The cohort's lv_area and myo_thickness move together (cavity vs wall), oppositely.
  assert corr["lv_area"]["myo_thickness"] < 0
  with open(os.path.join(workdir, "directions", "cohort_factors.md"), encoding="utf-8") as f:
    assert "| lv_area |" in f.read()
  bad = subprocess.run([sys.executable, "-m", "experiments.directions",
                        f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode != 0 and "--method" in bad.stderr


def test_compare_across_runs_and_errors(vae_run, dcgan_run, tmp_path):
  folders = [os.path.join(vae_run, "directions", "pca"),
             os.path.join(dcgan_run, "directions", "voynov")]
  if not all(os.path.exists(os.path.join(f, "results.json")) for f in folders):
    pytest.skip("needs the outputs of the two end-to-end tests above")
  rows = experiment.compare(folders, str(tmp_path))
  assert [(r["kind"], r["method"]) for r in rows] == [("vae", "pca"), ("dcgan", "voynov")]
  assert rows[1]["reconstructor_accuracy"] is not None and rows[0]["reconstructor_accuracy"] is None
  assert os.path.exists(tmp_path / "comparison.md")
  with pytest.raises(FileNotFoundError, match="results.json"):
    experiment.compare([str(tmp_path / "nothing")], str(tmp_path))
  with pytest.raises(ValueError, match="no generator"):
    tc = tmp_path / "tc"
    tc.mkdir()
    from experiments.configs import get_config
    (tc / "config.json").write_text(get_config("temporal_classifier:smoke").to_json())
    experiment.load_generator_run(str(tc))
