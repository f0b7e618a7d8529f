"""Command line: write a synthetic short-axis cine cohort in the ACDC layout.

  python -m data_pipelines.synthesize --output_dir=D --num_subjects=N --seed=S \
      [--num_workers=W] [--preview_png=P]

Writes D/training/patientXXX/ (4D image and labels, ED/ES frames, Info.cfg) and
D/parameters.csv (see `data_pipelines.synthetic`) with one worker process per core (default),
skipping subjects already complete, with a bar of the subjects done; then prints a per-group
summary of the target volumes, ejection fractions and wall thicknesses.
"""

from __future__ import annotations

import os
import time

from absl import app
from absl import flags
import numpy as np

from cardiac_jax import structures
from data_pipelines import synthetic

_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Root of the cohort to write.",
                                  required=True)
_NUM_SUBJECTS = flags.DEFINE_integer("num_subjects", 100, "Number of subjects.")
_SEED = flags.DEFINE_integer("seed", 0, "Cohort seed.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 0, "Parallel worker processes (0: one per "
                                    "CPU core, at most 8).")
_PREVIEW_PNG = flags.DEFINE_string(
    "preview_png", None, "If set, also write a montage of one subject per group to this PNG.")


def summary_lines(subjects) -> list[str]:
  """Human-readable per-group summary of the cohort's target parameters."""
  lines = [f"{'group':<5} {'n':>4} {'LV EDV ml':>10} {'LV EF %':>8} {'RV EDV ml':>10} "
           f"{'RV EF %':>8} {'wall mm':>8}"]
  for group in structures.GROUPS:
    members = [p for p in subjects if p.group == group]
    if not members:
      continue

    def mean(name):
      return float(np.mean([getattr(p, name) for p in members]))

    lines.append(f"{group:<5} {len(members):>4} {mean('lv_edv_ml'):>10.0f} "
                 f"{mean('lv_ef_percent'):>8.1f} {mean('rv_edv_ml'):>10.0f} "
                 f"{mean('rv_ef_percent'):>8.1f} {mean('lv_max_wall_thickness_mm'):>8.1f}")
  shifted = sum(p.ed_frame != 1 for p in subjects)
  lines.append(f"{len(subjects)} subjects, {shifted} with ED after frame 1")
  return lines


def main(argv):
  del argv
  start = time.time()
  num_workers = _NUM_WORKERS.value or min(os.cpu_count() or 1, 8)
  subjects = synthetic.synthesize_cohort(_OUTPUT_DIR.value, _NUM_SUBJECTS.value, _SEED.value,
                                         num_workers=num_workers)
  elapsed = time.time() - start
  print(f"Synthetic cohort in {os.path.abspath(_OUTPUT_DIR.value)} "
        f"({elapsed:.1f} s, {elapsed / len(subjects):.2f} s per subject)")
  for line in summary_lines(subjects):
    print(line)
  if _PREVIEW_PNG.value:
    synthetic.save_cohort_preview(_OUTPUT_DIR.value, _PREVIEW_PNG.value, subjects)
    print(f"Preview written to {_PREVIEW_PNG.value}")


if __name__ == "__main__":
  app.run(main)
