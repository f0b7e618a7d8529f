"""experiments.associate and experiments.manipulate end to end on the smoke diffae3d run of the
shared tiny cine cohort (tests/conftest.py: 12 subjects split 6 / 2 / 4, z_sem of 8, 3 + 3
DDIM steps)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cardiac_jax import structures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = (-1.0, 0.0, 1.0)
SEGMENTER_STEPS = 40


@pytest.fixture(scope="module")
def run_copy(diffae_run, tmp_path_factory):
  """A private copy of the smoke run: the analyses write their folders (latents/, associate/,
  manipulate/) into it, never into the shared run."""
  workdir = str(tmp_path_factory.mktemp("associate_run") / "run")
  # Without what other analyses of the shared run may have written there already.
  shutil.copytree(diffae_run, workdir, ignore=lambda folder, names: [
      n for n in names if folder == diffae_run and n not in ("config.json", "checkpoints")])
  return workdir


@pytest.fixture(scope="module")
def associated(run_copy):
  """associate() with the defaults: no latents file yet, so it is computed first."""
  from experiments import associate, infer_latents
  assert not os.path.exists(infer_latents.default_latents_path(run_copy))
  return associate.associate(run_copy)


@pytest.fixture(scope="module")
def restored(run_copy):
  from experiments import common
  return common.restore_run(run_copy)


@pytest.fixture(scope="module")
def manipulated(run_copy, associated, restored, tmp_path_factory):
  from experiments import manipulate
  del associated  # Only so that the latents file exists.
  out = str(tmp_path_factory.mktemp("manipulate") / "lv_edv_ml")
  return manipulate.manipulate(run_copy, "lv_edv_ml", steps=STEPS, output_dir=out,
                               segmenter_steps=SEGMENTER_STEPS, run=restored)


def _prepared_dir(workdir: str) -> str:
  from data_pipelines import cine
  from experiments import common
  return cine.prepared_cine_dir(common.load_run_config(workdir), create=False)


def _default_latents(workdir: str):
  from cardiac_jax import phenotypes
  from experiments import infer_latents
  return phenotypes.read_latents_csv(infer_latents.default_latents_path(workdir))


def _read_csv(path: str) -> list[dict]:
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- associate

def test_associate_writes_one_row_per_latent_and_trait(run_copy, associated):
  latents = _default_latents(run_copy)
  assert latents.z.shape == (12, 8)
  assert sorted(set(latents.splits)) == ["test", "train", "val"]
  with open(os.path.join(_prepared_dir(run_copy), "attributes.csv"), encoding="utf-8") as f:
    groups = {row["group"] for row in csv.DictReader(f)}
  traits = list(structures.ATTRIBUTE_NAMES) + [f"group:{g}" for g in structures.GROUPS
                                               if g in groups]
  out = os.path.join(run_copy, "associate")
  rows = _read_csv(os.path.join(out, "associations.csv"))
  assert len(rows) == 8 * len(traits)
  assert list(rows[0])[:10] == ["trait", "kind", "latent", "n", "beta", "se", "stat", "p", "q",
                                "significant"]
  assert [r["trait"] for r in rows[::8]] == traits
  assert [int(r["latent"]) for r in rows[:8]] == list(range(8))
  p = np.array([float(r["p"]) for r in rows])
  q = np.array([float(r["q"]) for r in rows])
  finite = np.isfinite(p)
  # Every continuous test has a P-value (12 subjects, 3 covariates): NaN only for logistic.
  assert all(finite[i] for i, r in enumerate(rows) if r["kind"] == "linear")
  assert np.all(q[finite] >= p[finite] - 1e-12) and np.all(np.isnan(q[~finite]))
  assert [r["significant"] == "True" for r in rows] == list(np.nan_to_num(q, nan=1.0) < 0.05)
  assert all(r["kind"] == ("logistic" if ":" in r["trait"] else "linear") for r in rows)
  assert all(int(r["n"]) == 12 for r in rows)
  # The covariates of the synthetic cohort were found through the prepared report.json.
  assert associated["covariates"] == ["height_cm", "weight_kg", "heart_rate_bpm"]
  with open(os.path.join(out, "summary.md"), encoding="utf-8") as f:
    summary = f.read()
  assert "height_cm, weight_kg, heart_rate_bpm" in summary
  for trait in traits:
    assert f"| {trait} |" in summary
  with Image.open(os.path.join(out, "manhattan.png")) as image:
    assert image.format == "PNG" and image.size[0] > 800 and image.size[1] > 400


def test_associate_latents_match_the_encoder(run_copy, associated, restored):
  """The latents file computed for associate() holds the EMA encoder's z_sem of every
  prepared subject: the same as family.encode on the run's evaluation batches."""
  import jax
  from data_pipelines import cine, prepare
  del associated
  config, family, state, _ = restored
  directory = _prepared_dir(run_copy)
  with open(os.path.join(directory, "splits.json"), encoding="utf-8") as f:
    splits = json.load(f)
  encode = jax.jit(family.encode)
  codes = {}
  for split in ("train", "val", "test"):
    for batch in cine.eval_batches(prepare.load_split(directory, split), config.data,
                                   batch_size=int(config.train.eval_batch_size)):
      z = np.asarray(encode(state, batch[family.field]))
      for row in np.flatnonzero(batch["mask"]):
        codes[str(batch["subject"][row])] = (split, z[row])
  latents = _default_latents(run_copy)
  assert sorted(latents.subjects) == sorted(codes) == sorted(
      s for k in ("train", "val", "test") for s in splits[k])
  assert latents.splits == [codes[s][0] for s in latents.subjects]
  np.testing.assert_allclose(latents.z, np.stack([codes[s][1] for s in latents.subjects]),
                             atol=1e-5)
  assert np.std(latents.z, axis=0).max() > 0


def test_associate_options_and_missing_covariates(run_copy, associated, tmp_path):
  from experiments import associate, common
  del associated
  raw_parameters = associate.default_covariates_file(common.load_run_config(run_copy))
  assert raw_parameters and os.path.isfile(raw_parameters)
  with open(raw_parameters, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  dropped = rows[3]["subject"]
  partial = tmp_path / "covariates.csv"
  with open(partial, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(r for r in rows if r["subject"] != dropped)
  with pytest.raises(ValueError, match=f"{partial}.*{dropped}"):
    associate.associate(run_copy, traits=["lv_edv_ml"], binary_traits=[],
                        covariates_file=str(partial), output_dir=str(tmp_path / "a"))
  with pytest.raises(ValueError, match="no covariate columns \\['bmi'\\]"):
    associate.associate(run_copy, traits=["lv_edv_ml"], binary_traits=[],
                        covariates=["bmi"], output_dir=str(tmp_path / "a"))
  result = associate.associate(run_copy, traits=["lv_edv_ml", "lv_ef"], binary_traits=[],
                               covariates=[], inverse_normal=True, splits=["train", "test"],
                               output_dir=str(tmp_path / "b"))
  assert result["covariates"] == [] and result["num_subjects"] == 10
  table = _read_csv(str(tmp_path / "b" / "associations.csv"))
  assert len(table) == 16 and {r["n"] for r in table} == {"10"}


def test_trait_values_and_covariates_read_one_table(tmp_path):
  """attributes.csv and covariate files go through the same reader (common.read_table) and
  number parsing (phenotypes.parse_number): empty or NA cells are missing, text is an error."""
  from experiments import associate
  directory = tmp_path / "prepared"
  directory.mkdir()
  (directory / "attributes.csv").write_text(
      "subject,group,lv_edv_ml\ns1,DCM,100.5\ns2,NOR,NA\ns3,DCM,\ns4,,abc\n")
  path, table = associate.read_attributes(str(directory))
  assert list(table) == ["s1", "s2", "s3", "s4"]
  edv = associate.trait_values(table, ["s1", "s2", "s3", "s9"], "lv_edv_ml", path)
  assert edv.kind == "linear"
  np.testing.assert_array_equal(edv.values, [100.5, np.nan, np.nan, np.nan])
  dcm = associate.trait_values(table, ["s1", "s2", "s4", "s9"], "group:DCM", path)
  assert dcm.kind == "logistic"
  np.testing.assert_array_equal(dcm.values, [1.0, 0.0, np.nan, np.nan])
  with pytest.raises(ValueError, match="subject s4, lv_edv_ml holds 'abc'"):
    associate.trait_values(table, ["s4"], "lv_edv_ml", path)
  with pytest.raises(ValueError, match="no column 'lv_volume'"):
    associate.trait_values(table, ["s1"], "lv_volume", path)
  with pytest.raises(ValueError, match="no column 'sex'"):
    associate.trait_values(table, ["s1"], "sex:F", path)
  np.testing.assert_array_equal(
      associate.covariate_matrix(path, ["lv_edv_ml"], ["s1"]), [[100.5]])
  with pytest.raises(ValueError, match="missing or non-finite covariate values: \\['s2"):
    associate.covariate_matrix(path, ["lv_edv_ml"], ["s1", "s2"])
  (directory / "attributes.csv").write_text("subject,lv_edv_ml\ns1,1\ns1,2\n")
  with pytest.raises(ValueError, match="s1 has more than one row"):
    associate.read_attributes(str(directory))
  with pytest.raises(FileNotFoundError, match="no traits"):
    associate.read_attributes(str(tmp_path))


def test_command_lines_define_their_flags(tmp_path):
  """Both programs parse their flags (without loading a run: that is tested above)."""
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

  def run(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)

  for module, expected in (("experiments.associate", ("--binary_traits", "--covariates_file",
                                                      "--inverse_normal", "--latents")),
                           ("experiments.manipulate", ("--trait", "--steps", "--kind",
                                                       "--inversion_steps", "--decode_steps"))):
    result = run(module, "--helpshort")   # absl prints the module's flags, exits with 1.
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for flag in expected:
      assert flag in result.stdout, (module, flag)
  bad = run("experiments.manipulate", "--workdir=x", "--steps=1,a")
  assert bad.returncode != 0 and "--steps must be numbers" in bad.stderr
  missing = run("experiments.associate")
  assert missing.returncode != 0 and "--workdir is required" in missing.stderr


# ----------------------------------------------------------------------------- manipulate

def test_manipulate_writes_strip_gif_and_direction(run_copy, manipulated):
  out = manipulated["output_dir"]
  with open(os.path.join(out, "direction.json"), encoding="utf-8") as f:
    written = json.load(f)
  with open(os.path.join(_prepared_dir(run_copy), "splits.json"), encoding="utf-8") as f:
    first_test = json.load(f)["test"][0]
  assert written["subject"] == first_test and written["subject_split"] == "test"
  assert written["trait"] == "lv_edv_ml" and written["kind"] == "linear"
  assert written["steps"] == list(STEPS)
  direction = written["direction"]
  beta = np.asarray(direction["beta"])
  assert beta.shape == (8,)
  np.testing.assert_allclose(np.linalg.norm(beta), 1.0)
  assert direction["num_nonzero"] == np.count_nonzero(beta) >= 1
  assert direction["cv_metric"] == "r2" and np.isfinite(direction["cv_score"])
  assert direction["alpha"] > 0 and written["num_train_subjects"] == 6
  assert written["sqrt_d"] == pytest.approx(np.sqrt(8))
  # The shift is m sqrt(D) in standardised units: its raw norm grows linearly with |m|.
  shift = np.asarray(written["latent_shift_norm"])
  assert shift[1] == 0.0 and shift[0] == pytest.approx(shift[2]) and shift[2] > 0
  # Default shift: the activation pattern, one SD of the prediction per m at Mahalanobis 1.
  shift_info = written["shift"]
  assert shift_info["kind"] == "pattern" and shift_info["predicted_is"] == "trait"
  predicted = np.asarray(shift_info["predicted"])
  assert predicted[2] - predicted[1] == pytest.approx(predicted[1] - predicted[0])
  assert predicted[2] > predicted[1]
  assert shift_info["mahalanobis_per_unit"] == pytest.approx(1.0, rel=1e-6)
  # The LV blood pool segmented in every frame by the run's 4-chamber segmenter.
  lv = written["lv_segmentation"]
  assert np.asarray(lv["area_curves_px"]).shape == (len(STEPS), 8)
  assert lv["area_ed_px"] == [c[0] for c in lv["area_curves_px"]]
  assert lv["change_from_m0_percent"] is None or lv["change_from_m0_percent"][1] == 0.0
  assert len(lv["input_segmented_curve_px"]) == 8 and min(lv["input_true_curve_px"]) > 0
  assert lv["segmenter"]["num_steps"] == SEGMENTER_STEPS
  assert set(lv["segmenter"]["val_dice"]) == {"rv", "myo", "lv", "mean"}
  assert os.path.exists(os.path.join(run_copy, "segmenter_la_4ch", "params.npz"))
  proxy = written["blood_pool_proxy"]
  assert len(proxy["area_ed_px"]) == len(STEPS)
  assert np.asarray(proxy["area_curves_px"]).shape == (len(STEPS), 8)
  assert proxy["change_from_m0_percent"] is None or proxy["change_from_m0_percent"][1] == 0.0
  assert written["latents_file_max_abs_difference"] < 1e-5
  with Image.open(os.path.join(out, "strip.png")) as image:
    assert image.format == "PNG" and image.size[0] > image.size[1] > 300
  with Image.open(os.path.join(out, "manipulation.gif")) as gif:
    # Input and 3 m values side by side, 16 px panels upscaled x6, 2 px gaps, 14 px labels.
    assert gif.size == (4 * 96 + 3 * 2, 14 + 96)
    assert gif.n_frames == 8


def test_manipulate_filter_shift_is_the_reference_formula(run_copy, manipulated, restored,
                                                           tmp_path):
  """--shift=filter: z' = z + m sqrt(D) std * beta; the prediction moves by sqrt(D) |w| per m;
  no segmentation asked for, none reported."""
  from experiments import manipulate
  result = manipulate.manipulate(run_copy, "lv_edv_ml", steps=STEPS, output_dir=str(tmp_path),
                                 shift="filter", segment=False, run=restored)
  w = np.asarray(result["direction"]["coefficients"])
  beta = np.asarray(result["direction"]["beta"])
  std = np.asarray(result["standardisation"]["std"])
  np.testing.assert_allclose(result["shift"]["unit"], np.sqrt(8) * beta)
  predicted = np.asarray(result["shift"]["predicted"])
  assert predicted[2] - predicted[1] == pytest.approx(np.sqrt(8) * np.linalg.norm(w))
  assert result["latent_shift_norm"][2] == pytest.approx(np.linalg.norm(np.sqrt(8) * std * beta))
  assert result["lv_segmentation"] is None
  # The same direction, another unit: the pattern's Mahalanobis length per unit is 1.
  assert result["shift"]["mahalanobis_per_unit"] != pytest.approx(1.0)
  np.testing.assert_array_equal(result["direction"]["beta"],
                                manipulated["direction"]["beta"])
  with pytest.raises(ValueError, match="shift must be one of"):
    manipulate.manipulate(run_copy, "lv_edv_ml", shift="steepest", run=restored)


def test_manipulate_m0_is_the_plain_reconstruction(manipulated, restored):
  """Encode, invert under the subject's own z and decode, with the compiled functions the
  manipulation used (`ddim_functions`: same process, no second compilation)."""
  import jax.numpy as jnp
  from experiments import manipulate
  _, family, state, _ = restored
  arrays = np.load(os.path.join(manipulated["output_dir"], "manipulation.npz"))
  np.testing.assert_array_equal(arrays["steps"], STEPS)
  encode, invert, decode = manipulate.ddim_functions(family, family.inversion_steps,
                                                     family.decode_steps)
  x0 = jnp.asarray(arrays["input"][None, ..., None])
  z = encode(state, x0)
  np.testing.assert_array_equal(np.asarray(z)[0], arrays["z"])
  # z as the manipulation passes it (a host array: a device-committed one would be another
  # signature for jit and a second compilation).
  z = jnp.asarray(arrays["z"][None])
  reconstruction = decode(state, invert(state, x0, z), z)
  cines = arrays["cines"]
  assert cines.shape == (3, 8, 16, 16)
  np.testing.assert_array_equal(cines[STEPS.index(0.0)], np.asarray(reconstruction)[0, ..., 0])
  # Every m decodes another cine.
  for i in range(3):
    for j in range(i + 1, 3):
      assert np.abs(cines[i] - cines[j]).max() > 0, (STEPS[i], STEPS[j])
  assert np.isfinite(cines).all()


def test_evaluate_diffae_reports_test_reconstruction_with_the_requested_ddim_steps(run_copy):
  from cardiac_jax.families import EvalOptions
  from experiments import evaluate
  result = evaluate.evaluate(run_copy, "test",
                             options=EvalOptions(inversion_steps=2, decode_steps=4))
  with open(os.path.join(run_copy, "eval", "metrics.json")) as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(result))
  assert (written["split"], written["num_subjects"]) == ("test", 4)
  assert (written["inversion_steps"], written["decode_steps"]) == (2, 4)
  # The reference's DDIM grid by default, and the grid is part of the output.
  assert written["ddim_grid"] == "stride"
  assert written["ddim_timesteps"] == {"inversion": [0, 500], "decoding": [0, 250, 500, 750]}
  rec = written["reconstruction"]
  assert -1.0 <= rec["ssim"] <= 1.0 and rec["nrmse"] > 0.0 and np.isfinite(rec["psnr"])
  assert {"eps_loss", "eps_loss_other_z"} <= set(written["eps_loss"])
  assert written["z_sem_std"] > 0.0
  eval_dir = os.path.join(run_copy, "eval")
  assert not [n for n in os.listdir(eval_dir) if n.startswith("partial_")]
  assert os.path.exists(os.path.join(eval_dir, f"reconstructions_{written['step']:07d}.png"))
  with pytest.raises(ValueError, match="--decode_steps"):
    evaluate.evaluate(run_copy, "test", options=EvalOptions(decode_steps=0))
  # 333 steps have no integer stride of T = 1000: refused before any work, naming the setting.
  with pytest.raises(ValueError, match="decode_steps = 333 on the 'stride' DDIM grid"):
    evaluate.evaluate(run_copy, "test", options=EvalOptions(inversion_steps=2, decode_steps=333))
