"""Hostile files for the readers' property tests: random NIfTI bytes, the random file of a
subject folder, and the guarded reader call that counts what was tried and rejected.

Shared by `test_readers_property` (ACDC layout) and `test_cine_readers_property` (UK Biobank
layout); `TRIED` and `REJECTED` count both, for the README's reliability numbers.
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import os
import signal

from hypothesis import HealthCheck
from hypothesis import settings
from hypothesis import strategies as st
import nibabel as nib
import numpy as np

from data_pipelines import acdc
from data_pipelines.errors import InvalidInputError

# Per property: inputs tried, and how many were rejected with InvalidInputError.
TRIED = collections.Counter()
REJECTED = collections.Counter()
# The slowest legitimate call (a 4D volume on this shared machine) is far below this.
CALL_TIMEOUT_S = 20.0
PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much])


class Hang(Exception):
  """Raised by the alarm when a reader call does not return in time."""


@contextlib.contextmanager
def _no_hang():
  def alarm(signum, frame):
    raise Hang(f"reader call took more than {CALL_TIMEOUT_S} s")
  previous = signal.signal(signal.SIGALRM, alarm)
  signal.setitimer(signal.ITIMER_REAL, CALL_TIMEOUT_S)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def _call(name: str, function, *args, path: str):
  """Calls a reader; returns its result, or None after a clean InvalidInputError naming
  `path`. Any other exception (or a hang) fails the test."""
  TRIED[name] += 1
  try:
    with _no_hang():
      return function(*args)
  except InvalidInputError as e:
    REJECTED[name] += 1
    assert acdc.printable_path(path) in str(e), (path, str(e))
    return None


# ----------------------------------------------------------------------------- NIfTI bytes

DTYPES = ("u1", "i1", "<i2", ">i2", "<u2", "<i4", ">i4", "<u4", "<i8", "<f4", ">f4", "<f8",
          "<c8", "f16")
SPECIAL_FLOATS = st.sampled_from([0.0, -0.0, -1.0, np.nan, np.inf, -np.inf, 1e-30, 1e30])
SPACINGS = st.one_of(st.floats(0.2, 12.0), SPECIAL_FLOATS)


@st.composite
def nifti_files(draw):
  """(file bytes, written array or None, whether the header is untouched) of a random NIfTI."""
  # Hostile choices are drawn often, but not always: accepted files must be checked too.
  often = lambda: draw(st.integers(0, 9)) < 7  # pylint: disable=unnecessary-lambda-assignment
  if often():
    ndim = draw(st.integers(3, 4))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
  else:
    ndim = draw(st.integers(1, 5))
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=ndim, max_size=ndim)))
  dtype = np.dtype(draw(st.sampled_from(DTYPES[:-1])))
  count = int(np.prod(shape))
  if dtype.kind == "f":
    special = SPECIAL_FLOATS if not often() else st.just(0.5)
    values = draw(st.lists(st.one_of(st.floats(-1e3, 1e3), special), min_size=count,
                           max_size=count))
  elif dtype.kind == "c":
    values = draw(st.lists(st.floats(-10, 10), min_size=count, max_size=count))
  else:
    info = np.iinfo(dtype)
    values = draw(st.lists(st.integers(max(info.min, -1000), min(info.max, 1000)),
                           min_size=count, max_size=count))
  array = np.array(values, dtype=dtype).reshape(shape)
  header = nib.Nifti1Header()
  header.set_data_dtype(dtype)
  header.set_data_shape(shape)
  pixdim = [draw(st.floats(0.2, 12.0) if often() else SPACINGS) for _ in range(3)]
  header["pixdim"][1:4] = pixdim
  affine_kind = draw(st.sampled_from(["diagonal", "random", "none"]) if often() else
                     st.sampled_from(["random", "singular", "nan", "none"]))
  if affine_kind == "diagonal":
    affine = np.diag([*(abs(p) if np.isfinite(p) and p else 1.0 for p in pixdim), 1.0])
  elif affine_kind == "random":
    affine = np.eye(4)
    affine[:3] = np.array(draw(st.lists(st.floats(-20, 20), min_size=12, max_size=12))
                          ).reshape(3, 4)
  elif affine_kind == "singular":
    affine = np.diag([1.0, 1.0, 0.0, 1.0])
  else:
    affine = np.full((4, 4), np.nan)
  header.set_sform(affine, code=0 if affine_kind == "none" else draw(st.integers(1, 4)))
  if not often():
    header["qform_code"] = draw(st.integers(0, 4))
    for field in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x"):
      header[field] = draw(st.one_of(st.floats(-1, 1), SPECIAL_FLOATS))
  if not often():
    header["scl_slope"] = draw(st.one_of(st.floats(-5, 5), SPECIAL_FLOATS))
    header["scl_inter"] = draw(st.one_of(st.floats(-5, 5), SPECIAL_FLOATS))
  header["vox_offset"] = 352
  header["magic"] = b"n+1"
  if dtype.byteorder == ">":
    header = header.as_byteswapped(">")
  raw = bytearray(header.binaryblock + bytes(4) + array.tobytes(order="F"))
  pristine = True
  for _ in range(0 if often() else draw(st.integers(1, 3))):
    # Fuzz a header byte (dims, datatype, vox_offset, magic, ...).
    raw[draw(st.integers(0, 351))] = draw(st.integers(0, 255))
    pristine = False
  if not often():
    header_dims = np.array([draw(st.integers(-2, 9))] + [draw(st.integers(-3, 32767))
                                                         for _ in range(7)], dtype=np.int16)
    raw[40:56] = header_dims.astype(header.endianness + "i2").tobytes()
    pristine = False
  if not often():
    raw = raw[:draw(st.integers(0, len(raw)))]
    pristine = False
  return bytes(raw), array, pristine


def draw_file(draw, valid: bytes) -> bytes | None:
  """`valid` (6 times in 10), a random NIfTI (2 in 10), random bytes (1 in 10) or None (the
  file is absent); gzipped 9 times in 10. Hostile choices sit at the high end: hypothesis
  favours small values while shrinking."""
  choice = draw(st.integers(0, 9))
  if choice <= 5:
    content = valid
  elif choice <= 7:
    content = draw(nifti_files())[0]
  elif choice == 8:
    content = draw(st.binary(max_size=600))
  else:
    content = None
  return None if content is None else (
      gzip.compress(content, compresslevel=1) if draw(st.integers(0, 9)) < 9 else content)


def write_folder(directory: str, files: dict[str, bytes | None]) -> None:
  """Creates `directory` with the files of `files` that are not None."""
  os.makedirs(directory)
  for name, content in files.items():
    if content is not None:
      with open(os.path.join(directory, name), "wb") as f:
        f.write(content)
