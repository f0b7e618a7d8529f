"""Fingerprints of a subject's input files: size, modification time and content hash.

A preparation records, for every subject, each file directly in the subject's folder (hidden
files and subfolders aside) as {"bytes", "mtime_ns", "sha256"}, or {"error"} when it cannot be
read (a dangling link, a pipe, no permission). Two fingerprints describe the same input when
they hold the same names, sizes and hashes: a file that was only touched is unchanged, a file
rewritten with other bytes is changed whatever its time stamp. Hashing a whole cohort takes a
while, so a file whose size and modification time equal those of a given earlier record keeps
that record's hash without being read again (as rsync and git do); `rehash=True` reads every
file.
"""

from __future__ import annotations

import hashlib
import os
import stat
from typing import Optional

_CHUNK = 1 << 20
# The record of a subject folder that cannot be listed.
_FOLDER = "."


def _printable(name: str) -> str:
  return os.fsencode(name).decode("utf-8", "backslashreplace")


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def subject_inputs(directory: str, previous: Optional[dict] = None,
                   rehash: bool = False) -> dict[str, dict]:
  """{file name: record} of the files directly in `directory`, sorted by name.

  `previous`: an earlier result for the same folder; a file whose size and mtime are those of
  its previous record takes the recorded hash instead of being read (unless `rehash`).
  Symbolic links are followed: the record describes what a reader would read.
  """
  previous = previous or {}
  try:
    with os.scandir(directory) as entries:
      names = sorted(e.name for e in entries if not e.name.startswith("."))
  except OSError as e:
    return {_FOLDER: {"error": f"cannot list the folder ({e.strerror})"}}
  records = {}
  for name in names:
    path = os.path.join(directory, name)
    shown = _printable(name)
    try:
      info = os.stat(path)
    except OSError as e:
      records[shown] = {"error": f"cannot access ({e.strerror})"}
      continue
    if stat.S_ISDIR(info.st_mode):
      continue
    if not stat.S_ISREG(info.st_mode):
      records[shown] = {"error": "not a regular file"}
      continue
    record = {"bytes": info.st_size, "mtime_ns": info.st_mtime_ns}
    old = previous.get(shown) or {}
    if (not rehash and "sha256" in old and old.get("bytes") == info.st_size
        and old.get("mtime_ns") == info.st_mtime_ns):
      record["sha256"] = old["sha256"]
    else:
      try:
        record["sha256"] = _sha256(path)
      except OSError as e:
        record = {"error": f"cannot read ({e.strerror})"}
    records[shown] = record
  return records


def _content(records: Optional[dict]) -> Optional[dict]:
  """The part of a fingerprint that decides whether inputs are the same (no times)."""
  if records is None:
    return None
  return {name: {k: v for k, v in record.items() if k != "mtime_ns"}
          for name, record in records.items()}


def same_content(a: Optional[dict], b: Optional[dict]) -> bool:
  """Whether two fingerprints describe the same files (names, sizes, hashes, errors)."""
  return a is not None and b is not None and _content(a) == _content(b)


def describe_difference(old: Optional[dict], new: Optional[dict]) -> str:
  """A short account of what differs between two fingerprints of one folder, e.g.
  "patient001_frame01.nii.gz changed, Info.cfg removed"."""
  old, new = _content(old) or {}, _content(new) or {}
  parts = []
  for name in sorted(set(old) | set(new)):
    if name not in new:
      parts.append(f"{name} removed")
    elif name not in old:
      parts.append(f"{name} added")
    elif old[name] != new[name]:
      parts.append(f"{name} changed")
  if not parts:
    return "no difference"
  more = f" and {len(parts) - 4} more" if len(parts) > 4 else ""
  return ", ".join(parts[:4]) + more
