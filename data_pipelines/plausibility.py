"""Physiological plausibility of a subject's images and measurements.

A file can be well-formed and still describe no possible heart: a header whose spatial unit is
misread gives voxels of 0.0014 mm or 1400 mm, ED and ES exchanged in Info.cfg give a negative
ejection fraction, a one-voxel ES blood pool an ejection fraction of 99.99 %, a blank frame a
blank training image. A preparation refuses such a subject with the reason instead of
accepting a wrong measurement. The bounds are configurable (`PlausibilityBounds`, the prepare
flag --plausibility, a training config's data.prepare.plausibility: `bounds_of`) and recorded
with the preparation; bounds other than the defaults name the cached dataset apart.

The defaults are wide, from infants' hearts to severe dilatation (DCM with an EF below 10 %,
HCM with small cavities and a high EF), so that every ACDC group passes while the examples
above are refused; each bound is named in the reason of a subject it refuses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Mapping, Optional

import numpy as np

from data_pipelines.errors import InvalidInputError

def _measurement(label: str, unit: str, low: float, high: float):
  """The default range of a measured attribute, with what a refusal calls it and its unit."""
  return dataclasses.field(default=(low, high), metadata={"label": label, "unit": unit})


@dataclasses.dataclass(frozen=True)
class PlausibilityBounds:
  """Closed ranges (low, high) that a prepared subject must fall in.

  The measurement fields are named like the attributes they bound (`structures.
  ATTRIBUTE_NAMES`) and carry the label and unit of the refusal's message; `voxel_spacing_mm`
  bounds every axis of the voxel spacing (MRI voxels lie between a tenth of a millimetre and a
  few centimetres).
  """
  lv_edv_ml: tuple[float, float] = _measurement("LV EDV", "ml", 5.0, 800.0)
  lv_esv_ml: tuple[float, float] = _measurement("LV ESV", "ml", 1.0, 700.0)
  rv_edv_ml: tuple[float, float] = _measurement("RV EDV", "ml", 5.0, 800.0)
  rv_esv_ml: tuple[float, float] = _measurement("RV ESV", "ml", 1.0, 700.0)
  lv_ef: tuple[float, float] = _measurement("LV EF", "%", 2.0, 90.0)
  rv_ef: tuple[float, float] = _measurement("RV EF", "%", 2.0, 90.0)
  myo_mass_g: tuple[float, float] = _measurement("myocardial mass", "g", 5.0, 1000.0)
  voxel_spacing_mm: tuple[float, float] = (0.1, 30.0)

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      try:
        low, high = (float(v) for v in value)
      except (TypeError, ValueError):
        raise ValueError(f"plausibility bound {field.name} must be two numbers (low, high), "
                         f"got {value!r}") from None
      if not (math.isfinite(low) and math.isfinite(high) and 0 <= low < high):
        raise ValueError(f"plausibility bound {field.name} must satisfy 0 <= low < high "
                         f"(finite), got ({low:g}, {high:g})")
      if field.name.endswith("_ef") and high > 100:
        raise ValueError(f"plausibility bound {field.name} is a percentage: high must be <= "
                         f"100, got {high:g}")
      # Tuples of floats, so bounds read back from JSON compare equal.
      object.__setattr__(self, field.name, (low, high))

  def to_dict(self) -> dict:
    return {name: list(value) for name, value in dataclasses.asdict(self).items()}

  @classmethod
  def from_dict(cls, values: Optional[Mapping]) -> "PlausibilityBounds":
    """Bounds from `to_dict` output (None: the defaults); unknown names are refused."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"unknown plausibility bounds {unknown}; known: {sorted(known)}")
    return cls(**{name: tuple(value) for name, value in values.items()})


def parse_bounds(overrides) -> PlausibilityBounds:
  """Bounds from `name=low:high` strings (the --plausibility flag), defaults for the rest."""
  values = {}
  known = [f.name for f in dataclasses.fields(PlausibilityBounds)]
  for item in overrides or ():
    name, sep, value = str(item).partition("=")
    name = name.strip()
    low, colon, high = value.partition(":")
    if not sep or not colon:
      raise ValueError(f"--plausibility entry {item!r} is not name=low:high (e.g. "
                       "lv_ef=2:90)")
    if name not in known:
      raise ValueError(f"--plausibility: unknown bound {name!r}; known: {known}")
    try:
      values[name] = (float(low), float(high))
    except ValueError:
      raise ValueError(f"--plausibility entry {item!r}: {low!r} and {high!r} must be "
                       "numbers") from None
  return PlausibilityBounds(**values)


CONFIG_FIELD = "plausibility"  # data.prepare.<CONFIG_FIELD>: the --plausibility strings.


def bounds_of(prepare_config) -> PlausibilityBounds:
  """The bounds of a training config's data.prepare section: its `plausibility` field, a tuple
  of `name=low:high` strings as the prepare flag takes them (absent or empty: the defaults)."""
  overrides = (prepare_config.get(CONFIG_FIELD, ()) if hasattr(prepare_config, "get")
               else getattr(prepare_config, CONFIG_FIELD, ()))
  if isinstance(overrides, str):  # One entry given without the tuple around it.
    overrides = (overrides,)
  return parse_bounds(overrides)


def bounds_suffix(bounds: PlausibilityBounds) -> str:
  """"" for the default bounds, else "_plaus<digest>" of the changed ones: the part of a
  cached dataset's name that keeps preparations with other bounds apart (and leaves the names
  of every default preparation as they were)."""
  default = PlausibilityBounds()
  changed = {k: v for k, v in bounds.to_dict().items()
             if tuple(map(float, v)) != tuple(map(float, getattr(default, k)))}
  if not changed:
    return ""
  text = ",".join(f"{k}={float(v[0]):g}:{float(v[1]):g}" for k, v in sorted(changed.items()))
  return "_plaus" + hashlib.sha256(text.encode()).hexdigest()[:8]


def check_spacing(spacing_mm, bounds: PlausibilityBounds) -> None:
  """Raises InvalidInputError (without a file name) when a voxel axis is outside the bounds,
  the mark of a header whose spatial unit (xyzt_units) or pixdim is wrong."""
  low, high = bounds.voxel_spacing_mm
  if not all(low <= float(s) <= high for s in spacing_mm):
    shown = ", ".join(f"{float(s):.6g}" for s in spacing_mm)
    raise InvalidInputError(
        f"voxel spacing ({shown}) mm is outside the plausible [{low:g}, {high:g}] mm of MRI "
        "(bound voxel_spacing_mm): check the header's pixdim and spatial unit (xyzt_units)")


def constant_value(volume: np.ndarray) -> Optional[float]:
  """The value of a constant array, None when it varies."""
  first = volume.flat[0]
  return None if np.any(volume != first) else float(first)


def check_not_constant(volume: np.ndarray, what: str) -> None:
  """Raises InvalidInputError when every voxel of `volume` has one value ("blank" when 0)."""
  value = constant_value(volume)
  if value is not None:
    kind = "blank (every voxel is 0)" if value == 0 else f"constant (every voxel is {value:g})"
    raise InvalidInputError(f"the {what} is {kind}")


def check_frames_not_constant(series: np.ndarray, what: str) -> None:
  """Raises InvalidInputError naming the first frame (1-based) of a (..., T) series that is
  constant over its other axes."""
  flat = series.reshape(-1, series.shape[-1])
  constant = np.flatnonzero(np.all(flat == flat[:1], axis=0))
  if constant.size:
    t = int(constant[0])
    value = float(flat[0, t])
    kind = "blank (every voxel is 0)" if value == 0 else f"constant (every voxel is {value:g})"
    more = f"; {constant.size} of {flat.shape[1]} frames are" if constant.size > 1 else ""
    raise InvalidInputError(f"frame {t + 1} of the {what} is {kind}{more}")


def check_measurements(attributes: Mapping[str, float], bounds: PlausibilityBounds,
                       ed_frame: Optional[int] = None, es_frame: Optional[int] = None) -> None:
  """Raises InvalidInputError (without a file name) for measurements no heart can have.

  ED volumes must exceed ES volumes for the LV and the RV (both smaller at ED: ED and ES are
  exchanged, said so with the frame numbers); then every bounded attribute must lie in its
  range, all violations listed. `ed_frame`, `es_frame`: 1-based frames for the message.
  """
  frames = ed_frame is not None and es_frame is not None
  ed_at = f" (frame {ed_frame})" if frames else ""
  es_at = f" (frame {es_frame})" if frames else ""
  lv_edv, lv_esv = attributes["lv_edv_ml"], attributes["lv_esv_ml"]
  rv_edv, rv_esv = attributes["rv_edv_ml"], attributes["rv_esv_ml"]
  if lv_esv > lv_edv and rv_esv > rv_edv:
    raise InvalidInputError(
        f"ED and ES look exchanged: the LV and RV are larger at ES{es_at} (LV {lv_esv:.4g} ml, "
        f"RV {rv_esv:.4g} ml) than at ED{ed_at} (LV {lv_edv:.4g} ml, RV {rv_edv:.4g} ml), "
        f"an EF of {attributes['lv_ef']:.3g} %; check ED and ES in Info.cfg")
  for name, edv, esv in (("LV", lv_edv, lv_esv), ("RV", rv_edv, rv_esv)):
    if not esv < edv:
      raise InvalidInputError(
          f"the {name} is not smaller at ES{es_at} ({esv:.4g} ml) than at ED{ed_at} "
          f"({edv:.4g} ml): the ED or ES labels are implausible")
  problems = []
  for field in dataclasses.fields(bounds):
    if "label" not in field.metadata:
      continue  # Not a measurement (the voxel spacing).
    name, label, unit = field.name, field.metadata["label"], field.metadata["unit"]
    low, high = getattr(bounds, name)
    value = float(attributes[name])
    if not low <= value <= high:
      problems.append(f"{label} {value:.4g} {unit} outside [{low:g}, {high:g}] ({name})")
  if problems:
    raise InvalidInputError("implausible measurements: " + "; ".join(problems))
