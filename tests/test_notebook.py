"""notebooks/explore_run.ipynb runs top to bottom on a smoke run and shows its figures and its
interpretability table; the committed file is the builder's, without outputs."""

from __future__ import annotations

import os

import nbclient
import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "explore_run.ipynb")


@pytest.fixture(scope="module")
def vae_run(cine_cohort, tmp_path_factory):
  """An ar_vae smoke run (2 steps) on mid-ventricular slices prepared from the session's
  synthetic cohort (its raw ACDC-layout subjects)."""
  from cardiac_jax import training
  from experiments import common
  from experiments.configs import get_config
  root, _ = cine_cohort
  config = get_config("ar_vae:smoke")
  config.data.dataset = "acdc"
  config.data.source_dir = root
  config.train.num_steps = 2
  config.train.eval_every = 0
  config.train.figure_every = 0
  config.train.checkpoint_every = 2
  workdir = str(tmp_path_factory.mktemp("notebook_run") / "ar_vae")
  training.train_and_evaluate(config, workdir, common.make_data_source(config))
  return workdir


def _by_tag(notebook) -> dict:
  return {tag: cell for cell in notebook.cells for tag in cell.metadata.get("tags", [])}


def _kinds(cell) -> set:
  return {kind for output in cell.outputs for kind in output.get("data", {})}


def test_the_committed_notebook_is_the_builders_without_outputs():
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "build_explore_run", os.path.join(REPO, "notebooks", "build_explore_run.py"))
  builder = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(builder)
  committed = nbformat.read(NOTEBOOK, as_version=4)
  assert committed == builder.build()
  for cell in committed.cells:
    assert not cell.get("outputs") and cell.get("execution_count") is None


def test_notebook_runs_on_a_smoke_run_and_shows_every_result(vae_run, monkeypatch):
  monkeypatch.setenv("CARDIAC_JAX_RUN", vae_run)
  # The smoke cohort's test split is too small for the mutual-information estimates.
  monkeypatch.setenv("CARDIAC_JAX_SPLIT", "train")
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": REPO}})
  client.execute()   # Raises CellExecutionError naming the cell on any error.
  cells = _by_tag(notebook)
  for cell in notebook.cells:
    assert all(output.output_type != "error" for output in cell.get("outputs", []))
  restored = "".join(o.get("text", "") for o in cells["restore"].outputs)
  assert "ar_vae at step 2" in restored and "regularised: {'lv_edv_ml': 0" in restored
  for tag in ("reconstructions", "traversals", "scatter", "edit"):
    assert "image/png" in _kinds(cells[tag]), f"cell {tag!r} drew no figure"
  table = next(o.data["text/markdown"] for o in cells["interpretability"].outputs
               if "text/markdown" in o.get("data", {}))
  lines = table.strip().splitlines()
  assert lines[0].startswith("| attribute | regularised dim | Spearman rho |")
  assert [line.split("|")[1].strip() for line in lines[2:]] == ["lv_edv_ml", "myo_ed_ml",
                                                                 "rv_edv_ml"]
  assert [line.split("|")[2].strip() for line in lines[2:]] == ["0", "1", "2"]
