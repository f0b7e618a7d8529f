"""The lock that lets one process at a time prepare an output directory.

An exclusive flock on O/.prepare.lock: every process of a multi-process job may start the same
preparation; one prepares while the others wait, then find the finished report. The kernel
releases the lock when its holder dies, even by SIGKILL, so a crashed run never blocks the next.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from typing import Iterator

LOCK_FILE = ".prepare.lock"


@contextlib.contextmanager
def exclusive_lock(output_dir: str, verbose: bool) -> Iterator[None]:
  """Holds an exclusive flock on output_dir/LOCK_FILE, waiting for another holder to finish.

  The holder unlinks the file before releasing it, so a waiter may end up locking an unlinked
  file: it checks that the path still names the file it locked, and starts over if not.
  """
  path = os.path.join(output_dir, LOCK_FILE)
  told = False
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        if verbose and not told:
          print(f"{output_dir}: another process is preparing it; waiting", flush=True)
          told = True
        fcntl.flock(fd, fcntl.LOCK_EX)
      try:
        locked = os.fstat(fd)
        current = os.stat(path)
        same = (locked.st_dev, locked.st_ino) == (current.st_dev, current.st_ino)
      except FileNotFoundError:
        same = False
    except BaseException:
      os.close(fd)
      raise
    if same:
      break
    os.close(fd)
  try:
    # For a person wondering who holds the lock.
    os.ftruncate(fd, 0)
    os.write(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
    yield
  finally:
    with contextlib.suppress(OSError):
      os.unlink(path)
    os.close(fd)
