"""experiments.tcav end to end: a smoke-trained temporal classifier explained on the shared tiny
synthetic cine cohort, with concepts from held-out negatives generated for it."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os

import numpy as np
import pytest

from cardiac_jax import training
from cardiac_jax.interpret import tcav
from data_pipelines import cine, synthetic
from tests.conftest import CINE_COHORT_SUBJECTS, in_memory_source
from experiments import common
from experiments import tcav as tcav_experiment
from tests.test_temporal_classifier import tiny_config, toy_cine_batch

FRAMES, SIZE = 8, 16          # The shared cohort's 8 frames, its 32 px crops resized to 16.
HELD_OUT_SUBJECTS = 12
TOY_FRAMES = 12               # Toy cycles of tests.test_temporal_classifier for the biomarkers.


@pytest.fixture(scope="module")
def trained_run(cine_cohort, tmp_path_factory):
  """Workdir of a classifier on the shared cine cohort's prepared dataset (2 joint steps on
  toy batches: the analysis needs a checkpoint, not a good model)."""
  _, prepared = cine_cohort
  workdir = str(tmp_path_factory.mktemp("tcav_run"))
  config = tiny_config(num_steps=2, stage1_steps=0, checkpoint_every=0, eval_every=0,
                       figure_every=0)
  config.data.dataset, config.data.prepared_dir = "prepared", prepared
  config.data.num_frames, config.data.image_size = FRAMES, SIZE
  config.tcav.num_random_sets = 3
  b = config.train.batch_size
  train = [toy_cine_batch(b, FRAMES, SIZE, seed=k) for k in range(2)]
  training.train_and_evaluate(config, workdir, in_memory_source(train, []))
  return workdir


@pytest.fixture(scope="module")
def default_result(trained_run):
  """The default protocol: the held-out NOR cohort is generated and prepared on first use."""
  with contextlib.redirect_stderr(io.StringIO()) as stderr:
    result = tcav_experiment.run(trained_run, concept_subjects=HELD_OUT_SUBJECTS,
                                 concept_fraction=0.25, sigmas=(-2, 0, 2))
  return dict(result, printed=stderr.getvalue())


def test_each_phase_is_announced_in_one_line(default_result):
  phases = [line.split("] ", 1)[1] for line in default_result["printed"].splitlines()
            if line.startswith("[tcav ")]
  assert [p.split(" ", 2)[:2] for p in phases] == [
      ["temporal_classifier", "step"], ["concept", "pool:"], ["concept", "layer"],
      ["concept", "layer,"], ["CAVs", "of"], ["figures:", "PCA"]], phases
  assert f"of the {HELD_OUT_SUBJECTS} pool subjects" in phases[2]


def _read(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def test_subject_biomarkers_of_a_toy_cycle_and_the_qc_exclusion():
  batch = toy_cine_batch(12, TOY_FRAMES, SIZE, seed=3)
  normal, pathological = np.flatnonzero(batch["group"] == 0)[0], np.flatnonzero(batch["group"])[0]
  rows = [tcav.subject_biomarkers(
      batch["sa_label"][i], batch["lv_volume_ml"][i], 2.6, 8.0, 1.0 / TOY_FRAMES, 5, 3)
      for i in (normal, pathological)]
  # Group 0 contracts with a radius amplitude of 25 %, the others with 8 %: EF differs.
  assert rows[0]["lv_ef"] > rows[1]["lv_ef"] + 15
  assert rows[0][tcav.QC_FAILED] == ""
  broken = batch["lv_volume_ml"][normal].copy()
  broken[-1] = 0.5 * broken[0]        # The cycle does not close: excluded with the reason.
  row = tcav.subject_biomarkers(batch["sa_label"][normal], broken, 2.6, 8.0,
                                1.0 / TOY_FRAMES, 5, 3)
  assert np.isnan(row["lv_ef"]) and "differ by" in row[tcav.QC_FAILED]


def test_random_control_attribute_depends_only_on_the_subject():
  a = tcav.random_attribute("patient001")
  assert a == tcav.random_attribute("patient001")
  assert a != tcav.random_attribute("patient002") and 0 <= a < 1
  # The label proxy: every positive above every negative, and another number than `random`.
  negative = tcav.label_proxy("patient001", 0)
  assert 0 <= negative < 1 <= tcav.label_proxy("patient001", 1) - 0 < 2
  assert tcav.label_proxy("patient001", 1) == negative + 1 and negative != a


def test_default_pool_is_held_out_negatives_the_classifier_never_saw(trained_run,
                                                                     default_result):
  out = os.path.join(trained_run, "tcav")
  protocol = _read(os.path.join(out, "protocol.json"))
  assert protocol["concept_pool"] == "held_out_negatives" and not protocol["allow_overlap"]
  (source,) = protocol["sources"]
  assert source["name"] == "held_out" and source["num_subjects"] == HELD_OUT_SUBJECTS
  pool = protocol["subjects"]
  assert len(pool) == HELD_OUT_SUBJECTS
  assert {(s["split"], s["label"], s["group"]) for s in pool} == {("held_out", 0, "NOR")}
  # Numbered after the classifier's cohort: no id is one of its subjects, in any split.
  splits = _read(os.path.join(common.load_run_config(trained_run).data.prepared_dir,
                              "splits.json"))
  cohort = {s for split in ("train", "val", "test") for s in splits[split]}
  numbers = sorted(int(s["subject"][len("patient"):]) for s in pool)
  assert numbers == list(range(CINE_COHORT_SUBJECTS + 1,
                               CINE_COHORT_SUBJECTS + HELD_OUT_SUBJECTS + 1))
  assert not cohort & {s["subject"] for s in pool}
  assert protocol["overlap"] == {"train": [], "test": []}
  assert protocol["explained"]["split"] == "test"
  assert protocol["explained"]["num_subjects"] == len(splits["test"])
  # Concept sets: 25 % of the measurable pool; random sets of the smallest of them.
  measurable = min(sum(not s["excluded_by_qc"] for s in pool), HELD_OUT_SUBJECTS)
  for concept, sizes in protocol["concept_set_sizes"].items():
    assert sizes[0] == sizes[1] <= int(0.25 * HELD_OUT_SUBJECTS), concept
  assert protocol["random_set_size"] == min(min(v) for v in
                                            protocol["concept_set_sizes"].values()) >= 2
  assert protocol["random_set_size"] <= int(0.25 * measurable)
  with open(os.path.join(out, "table1.md")) as f:
    assert f"{HELD_OUT_SUBJECTS} held-out negative subjects (held_out)" in f.read()
  # The label proxy is noise in a negatives-only pool.
  rows = {r["concept"]: r for r in default_result["table"]}
  assert not rows["label_proxy"]["significant"], rows["label_proxy"]


def test_held_out_cohort_is_nor_from_its_own_streams_and_acquired_like_the_cohort(
    cine_cohort, trained_run, default_result):
  raw, _ = cine_cohort
  directory = default_result["pool_sources"][0]["directory"]
  held_out_raw = os.path.join(os.path.dirname(os.path.dirname(directory)), "raw")
  subjects = synthetic.read_parameters_csv(os.path.join(held_out_raw, synthetic.PARAMETERS_CSV))
  assert {p.group for p in subjects} == {"NOR"}
  assert synthetic.read_acquisition_ranges(held_out_raw) == \
      synthetic.read_acquisition_ranges(raw) != synthetic.AcquisitionRanges()
  # Not the main cohort's stream of the same index (that draws another heart).
  first = subjects[0]
  config = common.load_run_config(trained_run)
  seed = config.data.synthetic.seed
  main_stream = synthetic.sample_subject_parameters(
      synthetic.subject_generator(seed, first.subject_index), "NOR", first.subject,
      first.subject_index, synthetic.read_acquisition_ranges(raw))
  assert main_stream.lv_edv_ml != first.lv_edv_ml
  # Cached: a second request finds the same prepared dataset without regenerating it.
  assert cine.held_out_cine_dir(config, HELD_OUT_SUBJECTS, create=False) == directory


def test_acquisition_ranges_record_round_trips_and_a_broken_one_is_named(tmp_path):
  ranges = synthetic.AcquisitionRanges(image_size=(96, 112), num_frames=(10, 12))
  synthetic.write_acquisition_ranges(str(tmp_path), ranges)
  assert synthetic.read_acquisition_ranges(str(tmp_path)) == ranges
  assert synthetic.read_acquisition_ranges(str(tmp_path / "absent")) is None
  path = tmp_path / synthetic.ACQUISITION_RANGES_JSON
  path.write_text('{"num_frames": [4, 6]}')
  with pytest.raises(ValueError, match=f"{path}: not a valid record"):
    synthetic.read_acquisition_ranges(str(tmp_path))


def test_tcav_run_writes_table_figures_and_interpolation(trained_run, default_result):
  result = default_result
  out = os.path.join(trained_run, "tcav")
  names = [r["concept"] for r in result["table"]]
  assert names == [c.name for c in tcav.CONCEPTS
                   if c.name not in result["skipped_concepts"]]
  # The synthetic controls come from the held-out cohort's generating parameters.
  assert {"high_intensity", "high_noise", "label_proxy", "random"} <= set(names)
  with open(os.path.join(out, "biomarkers.csv"), newline="") as f:
    rows = list(csv.DictReader(f))
  explained = _read(os.path.join(out, "protocol.json"))["explained"]["num_subjects"]
  assert len(rows) == HELD_OUT_SUBJECTS + explained
  assert {r["split"] for r in rows} == {"held_out", "test"}
  for row in result["table"]:
    assert 0 <= row["tcav_score"] <= 1 and 0 <= row["p_value"] <= 1
    assert len(result["random_run_scores"][row["concept"]]) == 3
  explained_labels = {r["label"] for r in rows if r["split"] == "test"}
  assert 0 <= result["auc"] <= 1 if len(explained_labels) == 2 else np.isnan(result["auc"])
  with open(os.path.join(out, "table1.csv"), newline="") as f:
    assert [r["concept"] for r in csv.DictReader(f)] == names
  with open(os.path.join(out, "table1.md")) as f:
    text = f.read()
  assert "AUC" in text and text.count("\n| ") == len(names) + 1
  for name in ("pca.png", "interpolation_low_ef.png", "interpolation_low_ef.gif",
               "results.json"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  assert not [d for d in os.listdir(out) if d.startswith("partial_")]
  inter = result["interpolation"]
  # The walk reaches its targets in the concept layer (to first order at each small step).
  np.testing.assert_allclose(inter["achieved_sigma"], [-2, 0, 2], atol=0.35)
  assert inter["achieved_sigma"][0] < inter["achieved_sigma"][1] < inter["achieved_sigma"][2]
  assert len(inter["decoded_ef_percent"]) == 3
  with open(os.path.join(out, "interpolation_low_ef.json")) as f:
    assert json.load(f)["subject"] == inter["subject"]


def test_pooled_protocol_is_refused_without_allow_overlap_and_stated_with_it(trained_run):
  with pytest.raises(ValueError, match=r"6 in the classifier training split.*--allow_overlap"):
    tcav_experiment.run(trained_run, concept_pool="pooled_train_val")
  sources = [tcav_experiment.PoolSource("train", "D", "train"),
             tcav_experiment.PoolSource("val", "D", "val")]
  text = tcav_experiment.pool_description("pooled_train_val", sources, 8,
                                          {"train": list("abcdef"), "test": []}, True)
  assert text == ("concept pool: the classifier's own train+val subjects of both classes (8); "
                  "OVERLAP ALLOWED (--allow_overlap): 6 pool subjects in the classifier "
                  "training split")
  held_out = [tcav_experiment.PoolSource("held_out", "H", "train")]
  assert tcav_experiment.pool_description("held_out_negatives", held_out, 12,
                                          {"train": [], "test": []}, False).endswith(
      "12 held-out negative subjects (held_out); none in the training or explained split")


def test_a_named_concept_split_with_positives_or_training_subjects_is_refused(trained_run):
  with pytest.raises(ValueError, match=r"split 'test' .* holds \d+ positive subject"):
    tcav_experiment.run(trained_run, concept_split="test")
  config = common.load_run_config(trained_run)
  run_dir = config.data.prepared_dir
  with pytest.raises(ValueError, match="needs --concept_split"):
    tcav_experiment.concept_pool_sources(config, run_dir, "held_out_negatives", None, "D", 500)
  with pytest.raises(ValueError, match="do not apply to --concept_pool=pooled_train_val"):
    tcav_experiment.concept_pool_sources(config, run_dir, "pooled_train_val", "val", None, 500)
  assert tcav_experiment.concept_pool_sources(
      config, run_dir, "held_out_negatives", "negatives", "/data/other", 500) == [
          tcav_experiment.PoolSource("negatives", "/data/other", "negatives")]


def test_check_concept_pool_overlap_and_positives():
  rows = [{"subject": "a", "label": 0, "group": 0}, {"subject": "b", "label": 0, "group": 0}]
  overlap = tcav_experiment.check_concept_pool(rows, "pool", "held_out_negatives", ["x"],
                                               "test", ["y"], allow_overlap=False)
  assert overlap == {"train": [], "test": []}
  with pytest.raises(ValueError, match=r"1 in the classifier training split, e.g. \['b'\]"):
    tcav_experiment.check_concept_pool(rows, "pool", "held_out_negatives", ["b", "x"], "test",
                                       [], allow_overlap=False)
  with pytest.raises(ValueError, match=r"1 in the test split"):
    tcav_experiment.check_concept_pool(rows, "pool", "held_out_negatives", [], "test", ["a"],
                                       allow_overlap=False)
  assert tcav_experiment.check_concept_pool(
      rows, "pool", "held_out_negatives", ["b"], "test", ["a"], allow_overlap=True) == {
          "train": ["b"], "test": ["a"]}
  positive = rows + [{"subject": "c", "label": 1, "group": 2}]
  with pytest.raises(ValueError, match=r"holds 1 positive subject.*\['DCM'\].*\['c'\]"):
    tcav_experiment.check_concept_pool(positive, "pool", "held_out_negatives", [], "test", [],
                                       allow_overlap=True)
  # The pooled protocol holds both classes by design.
  tcav_experiment.check_concept_pool(positive, "pool", "pooled_train_val", [], "test", [],
                                     allow_overlap=False)


def test_tcav_refuses_another_family(tmp_path):
  from experiments.configs import get_config
  config = get_config("vae:smoke")
  config.train.num_steps = 1
  os.makedirs(tmp_path, exist_ok=True)
  with open(os.path.join(tmp_path, "config.json"), "w") as f:
    f.write(config.to_json())
  with pytest.raises(ValueError, match="needs a temporal_classifier run"):
    tcav_experiment.run(str(tmp_path))
