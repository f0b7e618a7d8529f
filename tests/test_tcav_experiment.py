"""experiments.tcav end to end on a smoke-trained temporal classifier and toy cine subjects."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from cardiac_jax import training
from tests.conftest import in_memory_source
from experiments import tcav as tcav_experiment
from tests.test_temporal_classifier import tiny_config, toy_cine_batch

FRAMES, SIZE = 12, 16


def _examples(batch: dict) -> list[dict]:
  keys = ("subject", "group", "sa_label", "lv_volume_ml", "pixel_spacing_mm",
          "slice_thickness_mm")
  return [{k: batch[k][i] for k in keys} for i in range(len(batch["group"]))]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tcav_run"))
  # Joint training only (one compiled step): the analysis needs a checkpoint, not a good model.
  config = tiny_config(num_steps=2, stage1_steps=0, checkpoint_every=0, eval_every=0,
                       figure_every=0)
  config.data.num_frames, config.data.image_size = FRAMES, SIZE
  config.tcav.num_random_sets = 3
  b = config.train.batch_size
  train = [toy_cine_batch(b, FRAMES, SIZE, seed=k) for k in range(2)]

  training.train_and_evaluate(config, workdir, in_memory_source(train, []))
  splits = {"train": toy_cine_batch(20, FRAMES, SIZE, seed=10),
            "val": toy_cine_batch(8, FRAMES, SIZE, seed=11),
            "test": toy_cine_batch(10, FRAMES, SIZE, seed=12)}
  splits["test"]["group"][:3] = 0       # Both classes in the explained split.
  splits["test"]["group"][3:] = 2
  return workdir, config, splits


def test_subject_biomarkers_of_a_toy_cycle_and_the_qc_exclusion():
  batch = toy_cine_batch(12, FRAMES, SIZE, seed=3)
  normal, pathological = np.flatnonzero(batch["group"] == 0)[0], np.flatnonzero(batch["group"])[0]
  rows = [tcav_experiment.subject_biomarkers(
      batch["sa_label"][i], batch["lv_volume_ml"][i], 2.6, 8.0, 1.0 / FRAMES, 5, 3)
      for i in (normal, pathological)]
  # Group 0 contracts with a radius amplitude of 25 %, the others with 8 %: EF differs.
  assert rows[0]["lv_ef"] > rows[1]["lv_ef"] + 15
  assert rows[0][tcav_experiment.QC_FAILED] == ""
  broken = batch["lv_volume_ml"][normal].copy()
  broken[-1] = 0.5 * broken[0]        # The cycle does not close: excluded with the reason.
  row = tcav_experiment.subject_biomarkers(batch["sa_label"][normal], broken, 2.6, 8.0,
                                           1.0 / FRAMES, 5, 3)
  assert np.isnan(row["lv_ef"]) and "differ by" in row[tcav_experiment.QC_FAILED]


def test_random_control_attribute_depends_only_on_the_subject():
  a = tcav_experiment.random_attribute("patient001")
  assert a == tcav_experiment.random_attribute("patient001")
  assert a != tcav_experiment.random_attribute("patient002") and 0 <= a < 1


def test_tcav_run_writes_table_figures_and_interpolation(trained_run, monkeypatch):
  workdir, config, splits = trained_run

  def load(cfg, split):
    return _examples(splits[split])

  def batches(cfg, source):
    subjects = [e["subject"] for e in source]
    for split in splits.values():
      if list(split["subject"]) == subjects:
        yield dict(split, mask=np.ones(len(subjects), bool))
        return
    raise AssertionError("unknown source")

  monkeypatch.setattr(tcav_experiment, "load_split_examples", load)
  monkeypatch.setattr(tcav_experiment, "split_batches", batches)
  result = tcav_experiment.run(workdir, concept_fraction=0.25, sigmas=(-2, 0, 2))
  out = os.path.join(workdir, "tcav")

  names = [r["concept"] for r in result["table"]]
  # Without synthetic parameters the intensity and noise controls cannot be measured.
  assert set(result["skipped_concepts"]) == {"high_intensity", "high_noise"}
  assert names == [c.name for c in tcav_experiment.CONCEPTS
                   if c.name not in result["skipped_concepts"]]
  with open(os.path.join(out, "biomarkers.csv"), newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 38 and {r["split"] for r in rows} == {"train", "val", "test"}
  pooled = [r for r in rows if r["split"] != "test"]
  keys = {c.name: c.key for c in tcav_experiment.CONCEPTS}
  measurable = min(sum(np.isfinite(float(r[keys[n]])) for r in pooled) for n in names)
  assert result["set_size"] == int(0.25 * measurable) >= 2   # 25 % of the measurable pool.
  for row in result["table"]:
    assert 0 <= row["tcav_score"] <= 1 and 0 <= row["p_value"] <= 1
    assert len(result["random_run_scores"][row["concept"]]) == 3
  assert 0 <= result["auc"] <= 1
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


def test_tcav_refuses_another_family(tmp_path):
  from experiments.configs import get_config
  config = get_config("vae:smoke")
  config.train.num_steps = 1
  os.makedirs(tmp_path, exist_ok=True)
  with open(os.path.join(tmp_path, "config.json"), "w") as f:
    f.write(config.to_json())
  with pytest.raises(ValueError, match="needs a temporal_classifier run"):
    tcav_experiment.run(str(tmp_path))
