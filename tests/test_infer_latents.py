"""experiments.infer_latents, probe and reproducibility end to end on the tiny cine cohort and
the smoke DiffAE runs of tests/conftest.py (z_sem_dim 8, 12 subjects split 6 / 2 / 4)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from scipy import stats

from cardiac_jax import latent_store, phenotypes
from experiments import associate, infer_latents, probe, reproducibility
from tests.conftest import CINE_COHORT_SUBJECTS, copy_run, train_diffae_smoke

BATCH = 4    # 12 subjects: 3 batches.
DIM = 8      # model.z_sem_dim of the smoke config.


@pytest.fixture(scope="module")
def own_run(diffae_run, tmp_path_factory):
  """A copy of the shared run for the commands that write into their run directory."""
  return copy_run(diffae_run, tmp_path_factory.mktemp("own_run"))


@pytest.fixture(scope="module")
def expected(diffae_run):
  """{subject: z} from family.encode(state, x0) on the run's own evaluation batches (a batch
  size other than the tool's), and {subject: split} of splits.json."""
  import jax
  from data_pipelines import cine, prepare
  from experiments import common
  config, family, state, _ = common.restore_run(diffae_run)
  directory = cine.prepared_cine_dir(config)
  with open(os.path.join(directory, "splits.json")) as f:
    assignment = json.load(f)
  encode = jax.jit(family.encode)
  codes = {}
  for split in ("train", "val", "test"):
    source = prepare.load_split(directory, split)
    for batch in cine.eval_batches(source, config.data, batch_size=8):
      z = np.asarray(encode(state, batch[family.field]))
      for subject, row, real in zip(batch["subject"], z, batch["mask"]):
        if real:
          codes[str(subject)] = row
  split_of = {s: split for split in ("train", "val", "test") for s in assignment[split]}
  return codes, split_of


@pytest.fixture(scope="module")
def csv_output(diffae_run, tmp_path_factory):
  """An uninterrupted CSV run with batches of 4."""
  path = str(tmp_path_factory.mktemp("latents") / "latents.csv")
  infer_latents.run(diffae_run, path, batch_size=BATCH, progress=False)
  return path


@pytest.fixture(scope="module")
def second_run(cine_cohort, tmp_path_factory):
  """Another seed of the smoke run on the same cohort."""
  _, prepared = cine_cohort
  return train_diffae_smoke(prepared, str(tmp_path_factory.mktemp("diffae_seed1")), seed=1)


class _Interrupt(Exception):
  pass


def _counting_encoder(monkeypatch, fail_at: int | None = None) -> list:
  """Replaces latent_store.encode_rows by a wrapper that counts its calls (the batches
  computed) and raises on call number `fail_at` (1-based)."""
  calls = []
  real = latent_store.encode_rows

  def wrapper(encoder, x):
    calls.append(len(x))
    if fail_at is not None and len(calls) == fail_at:
      raise _Interrupt(f"killed at batch call {fail_at}")
    return real(encoder, x)

  monkeypatch.setattr(latent_store, "encode_rows", wrapper)
  return calls


# ----------------------------------------------------------------------------- outputs

def test_csv_has_every_subject_with_the_encoder_codes(csv_output, expected):
  codes, split_of = expected
  with open(csv_output) as f:
    header = f.readline().strip().split(",")
  assert header == ["subject", "split"] + [f"z{i}" for i in range(DIM)]
  table = phenotypes.read_latents_csv(csv_output)
  assert len(table.subjects) == CINE_COHORT_SUBJECTS == len(set(table.subjects))
  assert set(table.subjects) == set(codes)
  assert table.splits == [split_of[s] for s in table.subjects]
  # Rows in split order train, val, test.
  order = {"train": 0, "val": 1, "test": 2}
  assert [order[s] for s in table.splits] == sorted(order[s] for s in table.splits)
  np.testing.assert_allclose(table.z, np.stack([codes[s] for s in table.subjects]),
                             rtol=1e-5, atol=1e-6)
  assert table.z.std(axis=0).min() > 0          # Codes differ between subjects.
  # No partial store left, and the meta file names the run and the output's bytes.
  assert not os.path.exists(csv_output + latent_store.PARTIAL_SUFFIX)
  with open(csv_output + latent_store.META_SUFFIX) as f:
    meta = json.load(f)
  assert meta["num_subjects"] == CINE_COHORT_SUBJECTS and meta["z_dim"] == DIM
  assert meta["sha256"] == latent_store.sha256_file(csv_output)
  assert meta["run"]["step"] == 3 and len(meta["run"]["encoder_sha256"]) == 64


def test_rerun_of_a_finished_output_computes_nothing(diffae_run, csv_output, monkeypatch):
  calls = _counting_encoder(monkeypatch)
  messages = []
  before = os.stat(csv_output).st_mtime_ns
  infer_latents.run(diffae_run, csv_output, batch_size=BATCH, progress=False,
                    log=messages.append)
  assert calls == [] and any("up to date" in m for m in messages)
  assert os.stat(csv_output).st_mtime_ns == before


def test_plink_and_inverse_normal_outputs(diffae_run, csv_output, tmp_path):
  raw = phenotypes.read_latents_csv(csv_output)
  plink = str(tmp_path / "latents.pheno")
  infer_latents.run(diffae_run, plink, fmt="plink", batch_size=BATCH, progress=False)
  with open(plink) as f:
    lines = f.read().splitlines()
  assert lines[0].split() == ["FID", "IID"] + [f"z{i}" for i in range(DIM)]
  assert len(lines) == 1 + CINE_COHORT_SUBJECTS
  fields = [line.split() for line in lines[1:]]
  assert all(f[0] == f[1] for f in fields) and [f[1] for f in fields] == raw.subjects
  np.testing.assert_array_equal(phenotypes.read_plink_phenotypes(plink).z, raw.z)

  transformed = str(tmp_path / "latents_int.csv")
  infer_latents.run(diffae_run, transformed, inverse_normal=True, batch_size=BATCH,
                    progress=False)
  z = phenotypes.read_latents_csv(transformed).z
  n = CINE_COHORT_SUBJECTS
  scores = stats.norm.ppf((np.arange(1, n + 1) - 0.375) / (n + 0.25))
  for j in range(DIM):
    np.testing.assert_allclose(np.sort(z[:, j]), scores, atol=1e-7)
    np.testing.assert_array_equal(np.argsort(z[:, j]), np.argsort(raw.z[:, j]))


def _parse(module, args: list[str]):
  """The module's command-line flags parsed from `args` (own FlagValues, not absl's global)."""
  from absl import flags
  values = flags.FlagValues()
  module.define_flags(values)
  values([module.__name__] + args)
  return values


def test_command_line_writes_a_plink_file_of_chosen_splits(diffae_run, tmp_path):
  output = str(tmp_path / "cli.pheno")
  values = _parse(infer_latents, [f"--workdir={diffae_run}", f"--output={output}",
                                  "--format=plink", "--inverse_normal", f"--batch_size={BATCH}",
                                  "--splits=test,val", "--noprogress"])
  infer_latents.main(["infer_latents"], values)
  table = phenotypes.read_latents(output)
  assert len(table.subjects) == 6                 # 4 test + 2 val subjects.
  np.testing.assert_allclose(np.sort(table.z[:, 0]),
                             stats.norm.ppf((np.arange(1, 7) - 0.375) / 6.25), atol=1e-7)
  with open(output + latent_store.META_SUFFIX) as f:
    meta = json.load(f)
  assert meta["data"]["splits"] == ["test", "val"]
  assert meta["options"] == {"format": "plink", "inverse_normal": True}
  from absl import app
  with pytest.raises(app.UsageError, match="workdir"):
    infer_latents.main(["infer_latents"], _parse(infer_latents, []))


# ----------------------------------------------------------------------------- resumption

def test_interrupted_run_resumes_at_the_missing_batches(diffae_run, csv_output, tmp_path,
                                                        monkeypatch):
  output = str(tmp_path / "latents.csv")
  store = output + latent_store.PARTIAL_SUFFIX
  calls = _counting_encoder(monkeypatch, fail_at=2)
  with pytest.raises(_Interrupt):
    infer_latents.run(diffae_run, output, batch_size=BATCH, progress=False)
  assert len(calls) == 2
  # Nothing half-written: no output, the first batch kept in the partial store.
  assert not os.path.exists(output)
  assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
  assert sorted(n for n in os.listdir(store) if n.endswith(".npz")) == ["batch_000000.npz"]
  with open(os.path.join(store, latent_store.MANIFEST)) as f:
    manifest = json.load(f)
  assert manifest["run"]["workdir"] == os.path.realpath(diffae_run)
  assert manifest["batch_size"] == BATCH

  calls = _counting_encoder(monkeypatch)
  messages = []
  infer_latents.run(diffae_run, output, batch_size=BATCH, progress=False,
                    log=messages.append)
  assert calls == [BATCH, BATCH]                  # Batches 1 and 2 only.
  assert any("1 of 3 batches were finished" in m for m in messages)
  assert not os.path.exists(store)
  with open(output, "rb") as f, open(csv_output, "rb") as g:
    assert f.read() == g.read()


def test_store_or_output_of_another_run_is_refused(diffae_run, second_run, csv_output,
                                                   tmp_path, monkeypatch):
  output = str(tmp_path / "latents.csv")
  _counting_encoder(monkeypatch, fail_at=2)
  with pytest.raises(_Interrupt):
    infer_latents.run(diffae_run, output, batch_size=BATCH, progress=False)
  monkeypatch.undo()
  conflict = latent_store.LatentStoreConflictError
  with pytest.raises(conflict, match="unfinished latents of another run"):
    infer_latents.run(second_run, output, batch_size=BATCH, progress=False)
  # The store of the first run is untouched and still finishes.
  assert os.path.exists(os.path.join(output + latent_store.PARTIAL_SUFFIX,
                                     "batch_000000.npz"))
  with pytest.raises(conflict, match="other settings.*batch_size"):
    infer_latents.run(diffae_run, output, batch_size=2, progress=False)

  finished = str(tmp_path / "finished.csv")
  for suffix in ("", latent_store.META_SUFFIX):
    shutil.copy(csv_output + suffix, finished + suffix)
  with pytest.raises(conflict, match="another run"):
    infer_latents.run(second_run, finished, batch_size=BATCH, progress=False)
  os.remove(finished + latent_store.META_SUFFIX)   # Unknown origin: refused too.
  with pytest.raises(conflict, match="unknown origin"):
    infer_latents.run(diffae_run, finished, batch_size=BATCH, progress=False)
  meta = infer_latents.run(second_run, finished, batch_size=BATCH, progress=False,
                           overwrite=True)
  assert meta["run"]["workdir"] == os.path.realpath(second_run)
  assert phenotypes.read_latents_csv(finished).z.shape == (CINE_COHORT_SUBJECTS, DIM)


# ----------------------------------------------------------------------------- data

def test_compute_latents_on_a_prepared_data_dir_and_a_raw_folder(diffae_run, cine_cohort,
                                                                 csv_output, monkeypatch):
  raw_root, prepared = cine_cohort
  subjects, splits, z = infer_latents.compute_latents(diffae_run, data_dir=prepared,
                                                      splits=["test"], batch_size=BATCH)
  table = phenotypes.read_latents_csv(csv_output)
  assert splits == ["test"] * 4 and z.dtype == np.float32
  np.testing.assert_allclose(z, table.rows(subjects), rtol=1e-5, atol=1e-6)

  # A raw folder is prepared with the run's training-data preparation (kind and settings from
  # its report.json) into the cache.
  from data_pipelines import cine
  seen = {}

  def fake_prepare(source, out, config, *, dataset, split_seed, split_fractions):
    seen.update(source=source, out=out, config=config, dataset=dataset)
    raise _Interrupt("prepared")

  monkeypatch.setattr(cine, "prepare_cine_dataset", fake_prepare)
  with pytest.raises(_Interrupt):
    infer_latents.compute_latents(diffae_run, data_dir=raw_root)
  assert seen["dataset"] == "synthetic" and seen["source"] == os.path.abspath(raw_root)
  assert (seen["config"].num_frames, seen["config"].image_size) == (8, 32)
  assert seen["out"].startswith(os.environ["CARDIAC_JAX_CACHE"])
  with pytest.raises(FileNotFoundError, match="not a directory"):
    infer_latents.compute_latents(diffae_run, data_dir=os.path.join(raw_root, "absent"))
  with pytest.raises(ValueError, match="unknown split"):
    infer_latents.compute_latents(diffae_run, splits=["training"])


def test_load_or_compute_reads_a_given_file_and_computes_the_default_when_missing(
    tmp_path, monkeypatch):
  """Without a run: `run` is replaced by a stand-in that writes a small latents file."""
  calls = []

  def fake_run(workdir, output, **kwargs):
    calls.append(kwargs)
    phenotypes.write_latents_csv(output, ["s1", "s2"], ["train", "test"], np.eye(2))

  monkeypatch.setattr(infer_latents, "run", fake_run)
  monkeypatch.setattr(infer_latents, "require_encoder_run", lambda workdir: None)
  workdir = str(tmp_path / "run")
  given = str(tmp_path / "given.csv")
  phenotypes.write_latents_csv(given, ["a"], ["val"], np.ones((1, 3)))
  table = infer_latents.load_or_compute(workdir, given)
  assert table.subjects == ["a"] and table.path == given and calls == []
  table = infer_latents.load_or_compute(workdir, log=lambda m: None, step=3)
  assert table.path == infer_latents.default_latents_path(workdir) and table.dim == 2
  assert [{k: v for k, v in c.items() if k != "log"} for c in calls] == [
      {"overwrite": True, "progress": False, "step": 3}]
  infer_latents.load_or_compute(workdir)                # Present: read as it is.
  assert len(calls) == 1
  infer_latents.load_or_compute(workdir, refresh=True)  # Checked against the run.
  assert len(calls) == 2


def test_load_or_compute_refuses_a_run_of_another_family_before_announcing_work(tmp_path):
  """A VAE run has no semantic encoder: the one-line refusal comes first, not after a line
  saying that the run's subjects are being encoded."""
  from cardiac_jax import families
  from experiments.configs import get_config
  workdir = tmp_path / "vae_run"
  workdir.mkdir()
  (workdir / "config.json").write_text(get_config("ar_vae:smoke").to_json_best_effort())
  messages = []
  with pytest.raises(families.FamilyCapabilityError, match="which has no invert"):
    infer_latents.load_or_compute(str(workdir), log=messages.append)
  assert messages == []


# ----------------------------------------------------------------------------- analyses

def test_probe_writes_results_for_lv_edv_and_ef(own_run, capsys):
  from data_pipelines import cine
  from experiments import common
  probe.main(["probe"], _parse(probe, [f"--workdir={own_run}",
                                       "--traits=lv_edv_ml,lv_ef"]))
  printed = capsys.readouterr().out
  out = os.path.join(own_run, "probe")
  with open(os.path.join(out, "results.json")) as f:
    saved = json.load(f)
  assert [r["trait"] for r in saved["traits"]] == ["lv_edv_ml", "lv_ef"]
  for row in saved["traits"]:
    assert (row["n_train"], row["n_test"]) == (6, 4) and row["alpha"] > 0
    assert row["r2"] is None or row["r2"] <= 1.0
  with open(os.path.join(out, "probe.md")) as f:
    text = f.read()
  assert "| lv_edv_ml | 6 | 4 |" in text and "| lv_ef | 6 | 4 |" in text and text in printed
  # The numbers are the phenotypes probe on the default latents and attributes.csv.
  table = phenotypes.read_latents_csv(infer_latents.default_latents_path(own_run))
  config = common.load_run_config(own_run)
  directory = cine.prepared_cine_dir(config)
  attributes_path, attributes = associate.read_attributes(directory)
  values = associate.trait_values(attributes, list(attributes), "lv_edv_ml",
                                  attributes_path).values
  with open(os.path.join(directory, "splits.json")) as f:
    assignment = json.load(f)
  y = dict(zip(attributes, values))
  direct = phenotypes.linear_probe(
      table.rows(assignment["train"]), [y[s] for s in assignment["train"]],
      table.rows(assignment["test"]), [y[s] for s in assignment["test"]])
  assert saved["traits"][0]["alpha"] == direct.alpha
  assert saved["traits"][0]["r2"] == pytest.approx(direct.r2)
  with pytest.raises(ValueError, match="no column"):
    probe.run(own_run, traits=["lv_volume"], log=lambda m: None)


def test_reproducibility_of_a_run_with_itself_and_with_another_seed(own_run, second_run,
                                                                    tmp_path):
  out = str(tmp_path / "self")
  reproducibility.main(["reproducibility", own_run, own_run],
                       _parse(reproducibility, [f"--output_dir={out}"]))
  with open(os.path.join(out, "results.json")) as f:
    result = json.load(f)
  assert len(result["pairs"]) == 2 and result["num_subjects"] == CINE_COHORT_SUBJECTS
  for pair in result["pairs"]:
    assert (pair["pearson"], pair["cosine"], pair["dim"]) == (DIM, DIM, DIM)
    assert pair["best_pearson_index"] == list(range(DIM))
  for name in ("results.json", "reproducibility.md", "abs_pearson_heatmap.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0

  reproducibility.run([own_run, second_run], log=lambda m: None)
  out = os.path.join(own_run, "reproducibility")
  with open(os.path.join(out, "results.json")) as f:
    saved = json.load(f)
  assert [p["reference"] for p in saved["pairs"]] == [r["label"] for r in saved["runs"]]
  for pair in saved["pairs"]:
    assert 0 <= pair["pearson"] <= DIM and 0 <= pair["cosine"] <= DIM
    assert pair["either"] >= max(pair["pearson"], pair["cosine"])
    assert pair["pearson"] == sum(r > 0.5 for r in pair["best_abs_pearson"])
  assert saved["mean"]["pearson"] == pytest.approx(
      np.mean([p["pearson"] for p in saved["pairs"]]))
  # Two independently initialised encoders do not give identical codes.
  assert min(saved["pairs"][0]["best_abs_pearson"]) < 0.999999
  with open(os.path.join(out, "reproducibility.md")) as f:
    assert "| mean |" in f.read()


def test_too_few_common_subjects_name_the_runs():
  a = phenotypes.LatentsTable(["s1", "s2", "s3"], ["test"] * 3, np.zeros((3, 2)))
  b = phenotypes.LatentsTable(["s2", "s3", "s4"], ["test"] * 3, np.zeros((3, 2)))
  with pytest.raises(ValueError, match="runs seedA, seedB share 2 subjects"):
    reproducibility.align_latents([a, b], ["seedA", "seedB"])
  subjects, codes = reproducibility.align_latents([a, a], ["x", "y"])
  assert subjects == ["s1", "s2", "s3"] and codes[0].shape == (3, 2)
  with pytest.raises(ValueError, match="share 0 subjects in splits"):
    reproducibility.align_latents([a, a], ["x", "y"], splits=["train"])
