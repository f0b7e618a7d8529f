"""Files every command writes: atomically (a reader, or a rerun after a crash, sees the old
file or the new one, never half of one), as JSON, CSV, text, npz or a Markdown table.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import uuid
from typing import Any, Iterator, Sequence

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
  """Yields a temporary path beside `path` (ending in `suffix`, for writers that infer the
  format from the name, e.g. ".npz" or ".png"); moved onto `path` when the block succeeds,
  removed when it fails. Creates the parent folder. The temporary name is unique to the
  writer (process id and a random tag), so two processes writing one file never share it."""
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  temporary = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{suffix}"
  try:
    yield temporary
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


def _json_default(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def read_json(path: str) -> dict | None:
  """The JSON object in `path`, or None when it is absent, unreadable or not an object."""
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def write_json(path: str, data: Any, sort_keys: bool = False) -> None:
  """`data` as indented JSON (numpy scalars and arrays as Python values), atomically."""
  with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, sort_keys=sort_keys, default=_json_default)


def write_csv(path: str, rows: Sequence[dict]) -> None:
  """A list of dicts as CSV (the columns of the first row), atomically."""
  with atomic_path(path) as temporary, open(temporary, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def write_text(path: str, text: str) -> None:
  """`text`, atomically."""
  with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as f:
    f.write(text)


def write_npz(path: str, **arrays) -> None:
  """Arrays as an uncompressed .npz, atomically."""
  with atomic_path(path, suffix=".npz") as temporary:
    np.savez(temporary, **arrays)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
  """A GitHub-flavoured Markdown table with a trailing newline: `header` cells, one list of
  cells per row (str() of each), and `align` one letter per column, "l" (left, the default)
  or "r" (right-aligned, for numbers)."""
  align = align or "l" * len(header)
  if len(align) != len(header) or any(len(row) != len(header) for row in rows):
    raise ValueError(f"a table of {len(header)} columns got alignment {align!r} and rows of "
                     f"{sorted({len(row) for row in rows})} cells")
  def line(cells):
    return "|" + "|".join(f" {cell} " if str(cell) else " " for cell in cells) + "|"

  rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
  return "\n".join([line(header), rule, *(line(row) for row in rows)]) + "\n"
