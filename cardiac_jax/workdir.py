"""A run directory's guards: a usable path, and one run at a time.

`check_path` refuses a workdir that is blank or names a file (or lies under one) before anything
is prepared or written; `check_output_dir` refuses such an output folder flag of a command.
`WorkdirLock` holds an exclusive `fcntl.flock` on workdir/.lock while a run trains, with the
holder (host, process id, start time, command) written into the file: a second
run on the same workdir is refused naming the holder, instead of both writing checkpoints and
interleaving metrics.jsonl. The kernel drops the lock when its process dies, so the record a
killed run leaves behind is stale and the next run takes the lock over (and says so).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time

LOCK_FILE = ".lock"


class WorkdirError(OSError):
  """A workdir that cannot hold a run (a file, or under one)."""


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir."""


def file_above(path: str) -> str | None:
  """The nearest existing ancestor of `path` when it is a file (so `path` cannot be created),
  else None."""
  parent = os.path.dirname(os.path.abspath(path))
  while parent and not os.path.exists(parent):
    parent = os.path.dirname(parent)
  return parent if parent and not os.path.isdir(parent) else None


def check_path(workdir: str, flag: str = "workdir", what: str = "run directory") -> None:
  """Raises WorkdirError when `workdir` is blank (it would name the working directory, or a
  folder of spaces), an existing non-directory or lies under a file; the message names the flag
  (`--<flag>=...`) and what it must name (a run directory, an output folder)."""
  if not workdir.strip():
    raise WorkdirError(f"--{flag}={workdir!r} is blank: name a {what}")
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    hint = " (new or a run's)" if what == "run directory" else ""
    raise WorkdirError(f"--{flag}={workdir} is a file, not a {what}: name a directory{hint}")
  parent = file_above(path)
  if parent:
    raise WorkdirError(f"--{flag}={workdir} lies under {parent}, which is a file")


def check_output_dir(path: str | None, flag: str = "output_dir") -> None:
  """`check_path` of an output folder flag (nothing to check when it is unset): refused before
  any work instead of when the first output is written."""
  if path:
    check_path(path, flag, "folder")


def _holder_text(record: dict) -> str:
  started = record.get("started")
  when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
  command = record.get("command")
  return (f"process {record.get('pid', '?')} on {record.get('host', '?')}, started {when}"
          + (f" ({command})" if command else ""))


class WorkdirLock:
  """Exclusive lock on a workdir for the duration of a `with` block (see the module doc).

  `enabled=False` (processes other than 0 of a multi-process run) makes it a no-op.
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self.enabled = enabled
    self._file = None
    self.recovered: dict | None = None  # The record of a dead holder that this lock replaced.

  def read_holder(self) -> dict | None:
    """The record in the lock file (the current or last holder), or None."""
    try:
      with open(self.path, encoding="utf-8") as f:
        record = json.load(f)
    except (OSError, ValueError):
      return None
    return record if isinstance(record, dict) else None

  def acquire(self) -> None:
    if not self.enabled or self._file is not None:
      return
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    f = open(self.path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.close()
      holder = self.read_holder()
      who = _holder_text(holder) if holder else "another process"
      raise WorkdirLockedError(
          f"{os.path.dirname(self.path)} is in use by {who}: one run per workdir. Wait for it "
          "to finish (or stop it), or use another --workdir.") from None
    # A record survives only a holder that died without releasing: stale, taken over.
    self.recovered = self.read_holder()
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "command": " ".join(sys.argv)}
    f.seek(0)
    f.truncate()
    json.dump(record, f)
    f.flush()
    self._file = f

  def release(self) -> None:
    """Empties the record and drops the lock (the file stays: unlinking a lock file lets two
    later runs lock different files)."""
    if self._file is None:
      return
    try:
      self._file.seek(0)
      self._file.truncate()
      self._file.flush()
    finally:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
