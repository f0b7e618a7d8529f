"""The one place that names cardiac structures, diagnostic groups and attribute columns.

Canonical label convention inside the project (the ACDC convention, used by every prepared
dataset): 0 background, 1 RV blood pool, 2 LV myocardium, 3 LV blood pool. Readers of datasets
with another convention (M&Ms, UK Biobank: LV=1, MYO=2, RV=3) remap to this one with
`remap_labels` at read time.
"""

from __future__ import annotations

import numpy as np

BACKGROUND = 0
RV_BLOOD_POOL = 1
LV_MYOCARDIUM = 2
LV_BLOOD_POOL = 3
NUM_LABELS = 4
# Long-axis views (the synthetic 4-chamber cine) add the atrial blood pools to the four labels
# above, which keep their meaning there: 1 RV, 2 LV myocardium, 3 LV blood pool, 4 LA blood
# pool, 5 RA blood pool. Short-axis label maps never hold 4 or 5.
LA_BLOOD_POOL = 4
RA_BLOOD_POOL = 5
NUM_LONG_AXIS_LABELS = 6

# Source convention -> {structure name: source label value}.
LABEL_CONVENTIONS: dict[str, dict[str, int]] = {
    "acdc": {"rv": 1, "myo": 2, "lv": 3},
    "ukbb": {"lv": 1, "myo": 2, "rv": 3},
    "mnms": {"lv": 1, "myo": 2, "rv": 3},
}
_CANONICAL = {"rv": RV_BLOOD_POOL, "myo": LV_MYOCARDIUM, "lv": LV_BLOOD_POOL}

# ACDC diagnostic groups, in the class-index order used by the AR-SIVAE ACDC code.
GROUPS: tuple[str, ...] = ("NOR", "MINF", "DCM", "HCM", "RV")
GROUP_INDEX = {name: i for i, name in enumerate(GROUPS)}

# Numeric per-subject attributes written to attributes.csv (in this column order) and stored
# with every prepared example.
ATTRIBUTE_NAMES: tuple[str, ...] = (
    "lv_edv_ml", "lv_esv_ml", "rv_edv_ml", "rv_esv_ml", "myo_ed_ml", "myo_es_ml",
    "lv_ef", "rv_ef", "lv_sv_ml", "myo_mass_g", "lv_wall_thickness_mm",
)
ATTRIBUTES_CSV_COLUMNS: tuple[str, ...] = (
    "subject", "group", "ed_frame", "es_frame", *ATTRIBUTE_NAMES)


def remap_labels(labels: np.ndarray, convention: str) -> np.ndarray:
  """Maps a label map from `convention` to the canonical one.

  Raises ValueError when the convention is unknown or the map holds values outside it.
  """
  if convention not in LABEL_CONVENTIONS:
    raise ValueError(f"unknown label convention {convention!r}; known: "
                     f"{sorted(LABEL_CONVENTIONS)}")
  source = LABEL_CONVENTIONS[convention]
  allowed = {0, *source.values()}
  values = np.unique(labels)
  # Non-integer and non-finite values are outside every convention; list a few, not millions.
  bad = [v for v in values.tolist() if not (np.isfinite(v) and v == int(v) and int(v) in allowed)]
  if bad:
    shown = ", ".join(str(int(v)) if np.isfinite(v) and v == int(v) else repr(v) for v in bad[:8])
    more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
    raise ValueError(f"label values [{shown}]{more} are outside the {convention!r} convention "
                     f"(allowed {sorted(allowed)})")
  out = np.zeros(labels.shape, np.uint8)
  for name, value in source.items():
    out[labels == value] = _CANONICAL[name]
  return out
