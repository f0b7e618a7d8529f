"""How well can one ED slice rank subjects by whole-heart volumes? One row per slice rule.

`python -m experiments.slice_information --input_dir=RAW` reads every subject of an ACDC-layout
cohort (the ED frame's `_gt` labels named in Info.cfg), picks the slice of each rule of
`data_pipelines.preprocess.SLICE_RULES`, and reports for LV EDV, myocardium ED volume and RV EDV
(counted on all slices):
- the Spearman correlation of the volume with the slice's area of the same structure;
- the Spearman correlation of the volume with a 5-fold cross-validated gradient-boosting
  prediction from the slice's three areas (LV, myocardium, RV), an estimate of the ceiling a
  2D code of that slice can reach when ranking subjects by the volume.
Written as markdown to stdout and to --output (if given).
"""

from __future__ import annotations

import os

from absl import app, flags

_INPUT_DIR = flags.DEFINE_string("input_dir", None, "ACDC-layout raw cohort (training/ folder "
                                 "or its parent), as data_pipelines.prepare names it.")
# The flag's earlier name, kept for the command lines written with it (deprecated).
flags.DEFINE_alias("data_dir", "input_dir")
_OUTPUT = flags.DEFINE_string("output", None, "Optional markdown output file.")

STRUCTURES = (("LV EDV", 3), ("myocardium ED volume", 2), ("RV EDV", 1))


def slice_information(data_dir: str) -> tuple[int, dict[str, list[tuple[float, float]]]]:
  """(number of subjects, {rule: [(area rho, cross-validated rho) per structure]})."""
  import numpy as np
  from scipy import stats
  from sklearn.ensemble import GradientBoostingRegressor
  from sklearn.model_selection import cross_val_predict
  from data_pipelines import acdc, preprocess

  refs, _ = acdc.find_subjects(data_dir)
  volumes, areas = [], {rule: [] for rule in preprocess.SLICE_RULES}
  for ref in refs:
    try:
      subject = acdc.load_subject(ref.directory)
      selected = {rule: preprocess.select_slice(subject.ed_labels, rule)
                  for rule in preprocess.SLICE_RULES}
    except (acdc.InvalidInputError, ValueError):
      continue
    labels = subject.ed_labels
    dx, dy, dz = subject.spacing_mm
    volumes.append([np.sum(labels == v) * dx * dy * dz / 1000.0 for _, v in STRUCTURES])
    for rule, z in selected.items():
      areas[rule].append([np.sum(labels[:, :, z] == v) * dx * dy for _, v in STRUCTURES])
  if len(volumes) < 10:
    raise acdc.InvalidInputError(f"{data_dir}: only {len(volumes)} readable subjects; need at "
                                 "least 10")
  volumes = np.asarray(volumes)
  result = {}
  for rule, rows in areas.items():
    rows = np.asarray(rows)
    result[rule] = []
    for k in range(len(STRUCTURES)):
      direct = stats.spearmanr(rows[:, k], volumes[:, k]).statistic
      predicted = cross_val_predict(GradientBoostingRegressor(random_state=0), rows,
                                    volumes[:, k], cv=5)
      result[rule].append((float(direct), float(stats.spearmanr(predicted,
                                                                volumes[:, k]).statistic)))
  return len(volumes), result


def markdown(num_subjects: int, result: dict) -> str:
  names = [n for n, _ in STRUCTURES]
  lines = [f"Spearman rho of whole-heart volumes with one ED slice ({num_subjects} subjects): "
           "same-structure slice area / cross-validated prediction from the slice's 3 areas", "",
           "| slice rule | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
  for rule, values in result.items():
    lines.append(f"| {rule} | " + " | ".join(f"{a:.3f} / {p:.3f}" for a, p in values) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  from experiments import common  # pylint: disable=g-import-not-at-top
  # Quiet: a missing or unreadable cohort is one line, not a traceback.
  common.start_command(argv, input_dir=_INPUT_DIR.value)
  text = markdown(*slice_information(_INPUT_DIR.value))
  print(text)
  if _OUTPUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    with open(_OUTPUT.value, "w", encoding="utf-8") as f:
      f.write(text)


if __name__ == "__main__":
  app.run(main)
