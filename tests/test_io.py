"""cardiac_jax.io: atomic writers and the Markdown table every command writes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cardiac_jax import io


def test_markdown_table_aligns_columns_and_refuses_ragged_rows():
  table = io.markdown_table(["name", "value", "note"], [["a", 1.5, ""], ["b|c", 2, "x"]], "lrl")
  assert table == ("| name | value | note |\n|---|---:|---|\n| a | 1.5 | |\n| b|c | 2 | x |\n")
  assert io.markdown_table(["a"], []) == "| a |\n|---|\n"
  with pytest.raises(ValueError, match="3 columns got alignment 'lr'"):
    io.markdown_table(["a", "b", "c"], [], "lr")
  with pytest.raises(ValueError, match=r"rows of \[2\] cells"):
    io.markdown_table(["a", "b", "c"], [["x", "y"]])


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
  path = str(tmp_path / "sub" / "metrics.json")
  io.write_json(path, {"step": np.int64(3), "values": np.arange(2)})
  with open(path) as f:
    assert json.load(f) == {"step": 3, "values": [0, 1]}
  with pytest.raises(TypeError, match="not JSON serialisable"):
    io.write_json(path, {"bad": object()})
  with open(path) as f:
    assert json.load(f)["step"] == 3
  assert os.listdir(tmp_path / "sub") == ["metrics.json"]
