"""Defensive NIfTI decoding: every file of a cohort is treated as possibly hostile.

Every problem raises `InvalidInputError` naming the file and the problem, and no input can make
a reader allocate without bound or block. NIfTI files are decoded here rather than by
`nibabel.load` so that the header is checked before any voxel is read: the declared data size is
bounded (`MAX_VOXELS`), compared with what the file holds (truncation), and the gzip stream is
inflated only as far as the header says plus a small margin (a "gzip bomb" cannot exhaust
memory), with its CRC checked. nibabel still parses the header fields and computes the affine.
The ACDC reader (`acdc`) and the cine readers (`cine.reading`) both read through it.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import stat
import warnings
import zlib
from typing import Optional

import nibabel as nib
import numpy as np

from data_pipelines.errors import InvalidInputError
from data_pipelines.errors import printable_path

# Largest voxel count accepted from a header: about 4x the largest ACDC cine
# (428 x 512 x 18 x 30). A header declaring more is corrupt or hostile, and honouring it could
# exhaust memory before the file is found to be short.
MAX_VOXELS = 1 << 29
# Largest decoded size of one volume in bytes, the stored voxels and their float32 copy each:
# twice the largest ACDC cine as float32. Compared with what a header declares before any
# voxel is inflated, so a small hostile file cannot make a reader allocate gigabytes.
MAX_DATA_BYTES = 1 << 30
# NIfTI xyzt_units spatial codes -> (name, millimetres per unit). "unknown" (0) is read as mm,
# as nibabel and the NIfTI tools do; real ACDC and UK Biobank files declare mm.
_SPATIAL_UNITS_TO_MM = {0: ("unknown", 1.0), 1: ("meter", 1000.0), 2: ("mm", 1.0),
                        3: ("micron", 0.001)}
# NIfTI extensions sit between the header and the voxels; real ones are a few kB.
_MAX_EXTENSION_BYTES = 16 * 1024 * 1024
# A gzip stream may hold a few bytes past the voxel block (padding); more is not a NIfTI.
_MAX_TRAILING_BYTES = 1024 * 1024
_READ_CHUNK = 1024 * 1024
_GZIP_MAGIC = b"\x1f\x8b"
# Image and labels (or ED and ES) are one voxel grid when their affines place every corner of
# the volume within this distance of each other; a tenth of a millimetre is far below a voxel
# (>= 1 mm in cardiac MRI) and far above float32 rounding of the header fields.
AFFINE_TOLERANCE_MM = 0.1
_SPACING_RTOL = 1e-3


@dataclasses.dataclass(frozen=True)
class NiftiVolume:
  """A decoded NIfTI file.

  data: (X, Y, Z) or (X, Y, Z, T) float32, all finite, no empty axis.
  spacing_mm: (dx, dy, dz) from pixdim, finite and > 0.
  affine: (4, 4) voxel -> scanner mm (nibabel's best affine), finite, non-singular.
  has_orientation: whether the header sets a qform or sform (else `affine` only reflects the
    spacing and cannot be compared with another file's).
  """
  data: np.ndarray
  spacing_mm: tuple[float, float, float]
  affine: np.ndarray
  has_orientation: bool


def open_regular_file(path: str, what: str):
  """Opens `path` for binary reading if it is a regular file (a FIFO or device would block or
  never end); raises InvalidInputError naming the file otherwise."""
  shown = printable_path(path)
  try:
    mode = os.stat(path).st_mode
  except FileNotFoundError:
    raise InvalidInputError(f"{shown}: {what} is missing") from None
  except OSError as e:
    raise InvalidInputError(f"{shown}: cannot access {what} ({e.strerror})") from None
  if not stat.S_ISREG(mode):
    raise InvalidInputError(f"{shown}: {what} is not a regular file")
  try:
    return open(path, "rb")
  except OSError as e:
    raise InvalidInputError(f"{shown}: cannot open {what} ({e.strerror})") from None


class _ByteStream:
  """The bytes of an open file, gunzipped on the fly when `gzipped`, read only as far as asked.

  `buffer` holds what was read so far; `fill(n)` extends it to n bytes or to the end of the
  data. Corrupt or truncated gzip streams raise InvalidInputError.
  """

  def __init__(self, file, shown_path: str, gzipped: bool):
    self._file = file
    self._shown = shown_path
    self._gzipped = gzipped
    self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzipped else None
    self._pending = b""
    self.buffer = bytearray()
    self.at_end = False

  def fill(self, size: int) -> None:
    while len(self.buffer) < size and not self.at_end:
      if not self._gzipped:
        chunk = self._file.read(min(_READ_CHUNK, size - len(self.buffer)))
        self.buffer += chunk
        self.at_end = not chunk
        continue
      if self._inflater.eof:
        # A gzip file may hold several members back to back; anything else after a member
        # (padding) is ignored, as gzip readers do.
        tail = self._inflater.unused_data or self._file.read(_READ_CHUNK)
        if not tail.startswith(_GZIP_MAGIC):
          self.at_end = True
          continue
        self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._pending = tail
      if not self._pending:
        self._pending = self._file.read(_READ_CHUNK)
        if not self._pending:
          raise InvalidInputError(
              f"{self._shown}: cannot read NIfTI, the gzip stream ends early: the file is "
              f"truncated (after {len(self.buffer)} bytes of data)")
      try:
        # max_length bounds what one call inflates, so a small file cannot expand without end.
        self.buffer += self._inflater.decompress(self._pending, size - len(self.buffer))
      except zlib.error as e:
        raise InvalidInputError(f"{self._shown}: cannot read NIfTI, the gzip stream is "
                                f"corrupt ({e})") from None
      self._pending = self._inflater.unconsumed_tail


def _header_class(first_bytes: bytes, shown: str):
  """Nifti1Header or Nifti2Header, from sizeof_hdr (348 or 540) in either byte order."""
  if len(first_bytes) < 4:
    raise InvalidInputError(f"{shown}: cannot read NIfTI, the file is truncated or corrupt "
                            f"(only {len(first_bytes)} bytes)")
  for order in ("<", ">"):
    size = int(np.frombuffer(first_bytes[:4], dtype=f"{order}i4")[0])
    if size == 348:
      return nib.Nifti1Header
    if size == 540:
      return nib.Nifti2Header
  raise InvalidInputError(f"{shown}: cannot read NIfTI, the file is truncated or corrupt "
                          "(no NIfTI-1/2 header: sizeof_hdr is neither 348 nor 540)")


def _volume_shape(header, shown: str) -> tuple[int, ...]:
  dims = [int(d) for d in header["dim"]]
  if not 1 <= dims[0] <= 7:
    raise InvalidInputError(f"{shown}: header dim[0] = {dims[0]} is not a number of axes "
                            "(1 to 7)")
  shape = dims[1:dims[0] + 1]
  # Axes 5-7 (vector components) of size 1 carry nothing; drop them.
  while len(shape) > 4 and shape[-1] == 1:
    shape.pop()
  if len(shape) not in (3, 4):
    raise InvalidInputError(f"{shown}: expected a 3D or 4D volume, got shape {tuple(shape)}")
  if min(shape) <= 0:
    raise InvalidInputError(f"{shown}: volume shape {tuple(shape)} has an empty axis")
  if math.prod(shape) > MAX_VOXELS:
    raise InvalidInputError(f"{shown}: header declares {math.prod(shape)} voxels "
                            f"{tuple(shape)}, more than the {MAX_VOXELS} accepted")
  return tuple(shape)


@dataclasses.dataclass(frozen=True)
class NiftiHeader:
  """What a NIfTI header declares, checked, before any voxel is read.

  shape: (X, Y, Z) or (X, Y, Z, T), no empty axis, at most MAX_VOXELS voxels whose decoded
    size (`data_bytes`, and the float32 copy) stays within MAX_DATA_BYTES.
  spacing_mm, affine, has_orientation: as in `NiftiVolume`, converted to millimetres from the
    header's spatial unit (`spatial_unit`: "mm", "meter", "micron", or "unknown", read as mm).
  """
  shape: tuple[int, ...]
  dtype: np.dtype
  spacing_mm: tuple[float, float, float]
  affine: np.ndarray
  has_orientation: bool
  spatial_unit: str
  offset: int
  slope: Optional[float]
  inter: Optional[float]

  @property
  def data_bytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize


def _parse_header(stream: "_ByteStream", shown: str) -> NiftiHeader:
  """Reads and checks the header at the start of `stream` (only the header is inflated)."""
  stream.fill(540)
  header_class = _header_class(bytes(stream.buffer[:4]), shown)
  header_size = header_class.sizeof_hdr
  if len(stream.buffer) < header_size:
    raise InvalidInputError(f"{shown}: cannot read NIfTI, the file is truncated "
                            f"({len(stream.buffer)} bytes, the header alone is "
                            f"{header_size})")
  try:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
      warnings.simplefilter("ignore")
      header = header_class.from_fileobj(
          io.BytesIO(bytes(stream.buffer[:header_size])), check=False)
      dtype = header.get_data_dtype()
      offset = float(header["vox_offset"])
      slope, inter = header.get_slope_inter()
      affine = np.asarray(header.get_best_affine(), dtype=np.float64)
      has_orientation = bool(header["sform_code"] != 0 or header["qform_code"] != 0)
      # Through str: the shortest decimal of the stored float32 (1.6, not 1.600000023...),
      # which is the value the writer meant.
      pixdim = [float(str(p)) for p in header["pixdim"][1:4]]
      magic = bytes(header["magic"])
      unit_code = int(header["xyzt_units"]) & 0x07
  except InvalidInputError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # nibabel parses the hostile bytes: whatever it raises is a problem of this file.
    raise InvalidInputError(f"{shown}: cannot read NIfTI, the header is corrupt "
                            f"({type(e).__name__}: {e})") from None
  if magic[:3] not in (b"n+1", b"n+2"):
    raise InvalidInputError(f"{shown}: NIfTI magic {magic!r} is not that of a single "
                            "file (n+1 / n+2); .hdr/.img pairs are not supported")
  shape = _volume_shape(header, shown)
  if dtype.fields is not None or dtype.kind not in "iuf":
    raise InvalidInputError(f"{shown}: voxel type {dtype} is not a real number type")
  # Both the stored voxels and their float32 copy must fit: checked before anything is
  # inflated, so a small file that declares a huge volume costs nothing.
  decoded_bytes = math.prod(shape) * max(dtype.itemsize, 4)
  if decoded_bytes > MAX_DATA_BYTES:
    raise InvalidInputError(
        f"{shown}: header declares {shape} voxels of {dtype}, {decoded_bytes} bytes once "
        f"decoded, more than the {MAX_DATA_BYTES} bytes a volume may take")
  if not (math.isfinite(offset) and offset == int(offset)
          and header_size <= offset <= header_size + _MAX_EXTENSION_BYTES):
    raise InvalidInputError(f"{shown}: header vox_offset {offset} does not point past the "
                            "header")
  if unit_code not in _SPATIAL_UNITS_TO_MM:
    raise InvalidInputError(f"{shown}: header xyzt_units has spatial unit code {unit_code}, "
                            "which is not a NIfTI unit (0 unknown, 1 meter, 2 mm, 3 micron)")
  unit, to_mm = _SPATIAL_UNITS_TO_MM[unit_code]
  if not all(math.isfinite(p) and p > 0 for p in pixdim):
    raise InvalidInputError(f"{shown}: header voxel spacing (pixdim) {tuple(pixdim)} is not "
                            "positive and finite")
  if to_mm != 1.0:
    # Ten significant digits drop the float noise of the product (0.0014 m is 1.4 mm).
    pixdim = [float(f"{p * to_mm:.10g}") for p in pixdim]
    affine[:3] *= to_mm
  if not np.all(np.isfinite(affine)):
    raise InvalidInputError(f"{shown}: the header's affine (sform/qform) holds NaN or "
                            "infinite values")
  axes = affine[:3, :3]
  lengths = np.linalg.norm(axes, axis=0)
  if not np.all(lengths > 0) or abs(np.linalg.det(axes)) < 1e-6 * np.prod(lengths):
    raise InvalidInputError(f"{shown}: the header's affine (sform/qform) is singular: its voxel "
                            f"axes {np.round(axes, 4).tolist()} do not span 3D space")
  return NiftiHeader(shape=shape, dtype=dtype, spacing_mm=(pixdim[0], pixdim[1], pixdim[2]),
                     affine=affine, has_orientation=has_orientation, spatial_unit=unit,
                     offset=int(offset), slope=slope, inter=inter)


def _check_gzip_magic(f, shown: str) -> None:
  magic = f.read(2)
  f.seek(0)
  if magic != _GZIP_MAGIC:
    raise InvalidInputError(f"{shown}: cannot read NIfTI, the file is not gzip-compressed "
                            "although its name ends in .gz (truncated or corrupt)")


def read_nifti_header(path: str) -> NiftiHeader:
  """The checked header of a NIfTI file, without reading its voxels (see `read_nifti` for what
  is refused); lets a caller compare shapes and grids before it decodes any data."""
  shown = printable_path(path)
  gzipped = path.endswith(".gz")
  with open_regular_file(path, "file") as f:
    try:
      if gzipped:
        _check_gzip_magic(f, shown)
      return _parse_header(_ByteStream(f, shown, gzipped), shown)
    except OSError as e:
      raise InvalidInputError(f"{shown}: cannot read NIfTI ({e})") from None


def read_nifti(path: str) -> NiftiVolume:
  """Decodes a NIfTI-1 or NIfTI-2 single file (.nii, or gzipped .nii.gz) defensively.

  Spacing and affine are returned in millimetres whatever spatial unit the header names
  (xyzt_units: meter and micron are converted; "unknown" is read as mm, as NIfTI tools do).

  Returns:
    The volume (see `NiftiVolume` for the guarantees on its fields).

  Raises:
    InvalidInputError naming the file: missing or not a regular file; a .nii.gz that is not
    gzip or whose stream is truncated/corrupt; no NIfTI header; fewer than 3 or more than 4
    axes, an empty axis, more than MAX_VOXELS voxels or MAX_DATA_BYTES bytes once decoded
    (checked from the header, before any voxel is inflated); a voxel type that is not a real
    number (complex, RGB); a spatial unit code that NIfTI does not define; less voxel data than
    the header declares; spacing (pixdim) not finite and positive; an affine that is not finite
    or is singular; NaN or infinite voxels (after scaling).
  """
  shown = printable_path(path)
  gzipped = path.endswith(".gz")
  with open_regular_file(path, "file") as f:
    stream = _ByteStream(f, shown, gzipped)
    try:
      if gzipped:
        _check_gzip_magic(f, shown)
      header = _parse_header(stream, shown)
      shape, dtype, offset = header.shape, header.dtype, header.offset
      data_bytes = header.data_bytes
      stream.fill(offset + data_bytes)
      if len(stream.buffer) < offset + data_bytes:
        raise InvalidInputError(
            f"{shown}: cannot read NIfTI, the file is truncated: the header declares "
            f"{data_bytes} bytes of voxel data {shape} {dtype}, the file holds "
            f"{max(0, len(stream.buffer) - offset)}")
      if gzipped:
        # Inflate to the end of the stream (bounded) so the gzip CRC is checked: a corrupt
        # voxel block is not taken for data.
        limit = offset + data_bytes + _MAX_TRAILING_BYTES
        stream.fill(limit + 1)
        if len(stream.buffer) > limit:
          raise InvalidInputError(f"{shown}: decompresses to more data than its header "
                                  f"declares ({data_bytes} bytes of voxels)")
    except OSError as e:
      raise InvalidInputError(f"{shown}: cannot read NIfTI ({e})") from None
  voxels = np.frombuffer(stream.buffer, dtype=dtype, count=math.prod(shape), offset=offset)
  slope, inter = header.slope, header.inter
  with np.errstate(all="ignore"):
    data = voxels.reshape(shape, order="F").astype(np.float32)
    del voxels, stream
    if slope is not None and (slope, inter) != (1.0, 0.0):
      data *= np.float32(slope)
      data += np.float32(inter)
  bad = int(np.count_nonzero(~np.isfinite(data)))
  if bad:
    raise InvalidInputError(f"{shown}: {bad} voxels are NaN or infinite")
  return NiftiVolume(data=data, spacing_mm=header.spacing_mm, affine=header.affine,
                     has_orientation=header.has_orientation)


def load_nifti(path: str) -> tuple[np.ndarray, tuple[float, ...]]:
  """Loads a NIfTI volume as float32 with its voxel spacing (mm, spatial axes only).

  Returns (data, (dx, dy, dz)): data (X, Y, Z) or (X, Y, Z, T) float32, all finite; spacing
  finite and positive. Every problem raises InvalidInputError naming the file (`read_nifti`).
  """
  volume = read_nifti(path)
  return volume.data, volume.spacing_mm


def check_same_shape(shape, path: str, reference_shape, reference_path: str, what: str,
                     reference_what: str) -> None:
  """Raises InvalidInputError unless the spatial (X, Y, Z) parts of two shapes are equal; used
  on headers (`read_nifti_header`) so that a mismatch is found before any voxel is decoded."""
  shape, reference_shape = tuple(shape[:3]), tuple(reference_shape[:3])
  if shape != reference_shape:
    raise InvalidInputError(f"{printable_path(path)}: {what} shape {shape} does not match "
                            f"{reference_what} {printable_path(reference_path)} shape "
                            f"{reference_shape}")


def check_same_grid(volume: NiftiVolume, path: str, reference: NiftiVolume,
                    reference_path: str, what: str, reference_what: str) -> None:
  """Raises InvalidInputError unless `volume` lies on the voxel grid of `reference`.

  Same (X, Y, Z), spacing within 0.1 %, and, when both headers set an orientation, affines
  that place every corner of the volume within AFFINE_TOLERANCE_MM; the message says whether
  the origin or the axes (orientation/scale) differ, and by how much. `what` and
  `reference_what` name the two ("label" and "image", "cine" and "ED frame") in the message.
  """
  shown, reference_shown = printable_path(path), printable_path(reference_path)
  shape = volume.data.shape[:3]
  check_same_shape(volume.data.shape, path, reference.data.shape, reference_path, what,
                   reference_what)
  if not np.allclose(volume.spacing_mm, reference.spacing_mm, rtol=_SPACING_RTOL, atol=0):
    raise InvalidInputError(f"{shown}: {what} spacing {volume.spacing_mm} does not match "
                            f"{reference_what} {reference_shown} spacing {reference.spacing_mm}")
  if not (volume.has_orientation and reference.has_orientation):
    return
  corners = np.array([[x, y, z, 1.0] for x in (0, shape[0] - 1) for y in (0, shape[1] - 1)
                      for z in (0, shape[2] - 1)]).T
  displacement = np.linalg.norm(((volume.affine - reference.affine) @ corners)[:3], axis=0)
  worst = float(displacement.max())
  if worst > AFFINE_TOLERANCE_MM:
    origin_shift = float(np.linalg.norm(volume.affine[:3, 3] - reference.affine[:3, 3]))
    axes_change = float(np.abs(volume.affine[:3, :3] - reference.affine[:3, :3]).max())
    parts = []
    if origin_shift > AFFINE_TOLERANCE_MM / 2:
      parts.append(f"origin shifted by {origin_shift:.3g} mm")
    if axes_change * max(shape) > AFFINE_TOLERANCE_MM / 2:
      parts.append(f"voxel axes (orientation/scale) differ by up to {axes_change:.3g} mm per "
                   "voxel")
    raise InvalidInputError(
        f"{shown}: {what} affine does not match that of {reference_what} {reference_shown}: "
        f"voxels are up to {worst:.3g} mm apart (tolerance {AFFINE_TOLERANCE_MM} mm; "
        f"{', '.join(parts) or 'small differences add up'})")
