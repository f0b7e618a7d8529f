"""Generating a cohort: deterministic per-subject streams, balanced groups, held-out cohorts.

Determinism: subject i (0-based, written as patient{i+1:03d}) uses np.random.default_rng([seed,
i]) for its parameters and then its rendering, so it is identical whatever the cohort size. The
4-chamber view uses its own stream `long_axis_generator(seed, i)`, so adding it to a cohort
leaves the short-axis files as they were.
Groups are balanced: each consecutive block of five subjects holds each group once, in an order
drawn from the block's own seeded permutation.

Held-out cohorts (`synthesize_held_out_cohort`): extra subjects of one group for analyses that
must not reuse the subjects a model was trained on (the TCAV concept pool of Clough et al., a
held-out set of disease-negative subjects). They are numbered after the main cohort
(patient{N+1}, ... for a cohort of N), so their ids never collide with it, and drawn from their
own streams (`HELD_OUT_STREAM_TAG`), independent of every main-cohort subject. Every cohort
records the acquisition ranges it was drawn from (acquisition_ranges.json), so a held-out cohort
is acquired like the cohort it complements.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import shutil
import sys
from typing import Optional, Sequence

import numpy as np

from cardiac_jax import structures
from data_pipelines.synthetic.layout import (PARAMETERS_CSV, PARTITION, STAGING_DIR,
                                             long_axis_is_complete,
                                             subject_is_complete, write_acdc_subject,
                                             write_acquisition_ranges, write_long_axis_subject,
                                             write_parameters_csv)
from data_pipelines.synthetic.long_axis import long_axis_generator, render_long_axis_4ch
from data_pipelines.synthetic.parameters import (AcquisitionRanges, SubjectParameters,
                                                 group_of_subject, subject_name)
from data_pipelines.synthetic.sampling import sample_subject_parameters
from data_pipelines.synthetic.short_axis import render_short_axis

# Entropy tag of the subject streams of held-out cohorts ("heldout").
HELD_OUT_STREAM_TAG = 0x68656C646F7574


def subject_generator(seed: int, index: int, tags: Sequence[int] = ()) -> np.random.Generator:
  """The random stream of 0-based subject `index`: parameters first, then rendering. `tags`
  (e.g. `HELD_OUT_STREAM_TAG`) select a separate family of streams."""
  return np.random.default_rng([seed, *tags, index])


def _synthesize_subject(output_dir: str, num_subjects: int, seed: int, index: int,
                        ranges: AcquisitionRanges, long_axis_4ch: bool = False,
                        group: Optional[str] = None,
                        tags: tuple[int, ...] = ()) -> tuple[SubjectParameters, bool]:
  """Writes subject `index` unless complete; `group` None: the balanced group of the cohort;
  `num_subjects` only sets the width of the id."""
  rng = subject_generator(seed, index, tags)
  params = sample_subject_parameters(rng, group or group_of_subject(seed, index),
                                     subject_name(index, num_subjects), index, ranges)
  wrote = False
  if not subject_is_complete(output_dir, params):
    image, labels, affine = render_short_axis(params, rng)
    write_acdc_subject(output_dir, params, image, labels, affine)
    wrote = True
  # The long-axis view has its own stream, so a cohort written without it gains it later
  # without any short-axis file being rewritten.
  if long_axis_4ch and not long_axis_is_complete(output_dir, params):
    image, labels, affine = render_long_axis_4ch(params, long_axis_generator(seed, index, tags))
    write_long_axis_subject(output_dir, params, image, labels, affine)
    wrote = True
  return params, wrote


def synthesize_cohort(output_dir: str, num_subjects: int, seed: int, *, num_workers: int = 1,
                      ranges: AcquisitionRanges = AcquisitionRanges(),
                      long_axis_4ch: bool = False,
                      progress: bool = True) -> list[SubjectParameters]:
  """Writes (or completes) a synthetic ACDC-layout cohort and returns its subjects' parameters.

  Subjects whose files are already complete are skipped, so an interrupted run resumes where it
  stopped. `num_workers` > 1 renders subjects in parallel processes; the result is identical.
  Writes output_dir/training/patientXXX/..., output_dir/parameters.csv and the ranges
  (acquisition_ranges.json); with `long_axis_4ch` also each subject's 4-chamber cine
  <subject>_la_4ch.nii.gz (X, Y, 1, T) and its labels <subject>_la_4ch_gt.nii.gz
  (`render_long_axis_4ch`), added to subjects whose short-axis files exist already without
  touching those. With `progress`, a run that has subjects to write announces them in one
  line on stderr and shows a bar of the subjects done.
  """
  if num_subjects < 1:
    raise ValueError(f"num_subjects must be >= 1, got {num_subjects}")
  jobs = [(output_dir, num_subjects, seed, i, ranges, long_axis_4ch)
          for i in range(num_subjects)]
  return _write_cohort(output_dir, jobs, ranges, num_workers, progress)


def synthesize_held_out_cohort(output_dir: str, num_subjects: int, seed: int, *,
                               first_index: int, group: str = "NOR", num_workers: int = 1,
                               ranges: AcquisitionRanges = AcquisitionRanges(),
                               long_axis_4ch: bool = False,
                               progress: bool = True) -> list[SubjectParameters]:
  """Writes (or completes) `num_subjects` held-out subjects of one `group` (module docstring).

  Subject k is 0-based subject first_index + k (patient{first_index + k + 1}): pass the size of
  the main cohort as `first_index` so that no id is shared with it. Its parameters and images
  come from the stream [seed, HELD_OUT_STREAM_TAG, first_index + k]. Files, resumption and
  workers and progress as in `synthesize_cohort`.
  """
  if group not in structures.GROUPS:
    raise ValueError(f"unknown group {group!r}; expected one of {list(structures.GROUPS)}")
  if num_subjects < 1:
    raise ValueError(f"num_subjects must be >= 1, got {num_subjects}")
  if first_index < 0:
    raise ValueError(f"first_index must be >= 0, got {first_index}")
  last = first_index + num_subjects
  jobs = [(output_dir, last, seed, i, ranges, long_axis_4ch, group, (HELD_OUT_STREAM_TAG,))
          for i in range(first_index, last)]
  return _write_cohort(output_dir, jobs, ranges, num_workers, progress)


def _missing_subjects(output_dir: str, jobs: list[tuple]) -> int:
  """How many subjects of `jobs` have no folder yet (a cheap count for the announcement; the
  workers check each subject's files)."""
  root = os.path.join(output_dir, PARTITION)
  existing = set(os.listdir(root)) if os.path.isdir(root) else set()
  return sum(subject_name(job[3], job[1]) not in existing for job in jobs)


def _write_cohort(output_dir: str, jobs: list[tuple], ranges: AcquisitionRanges,
                  num_workers: int, progress: bool = True) -> list[SubjectParameters]:
  """Runs `_synthesize_subject` over `jobs`, then writes parameters.csv and the ranges.

  With `progress`, when subjects are missing: one line on stderr (what, where, how many, how
  many workers) and a bar of the subjects done."""
  if num_workers < 1:
    raise ValueError(f"num_workers must be >= 1, got {num_workers}")
  os.makedirs(output_dir, exist_ok=True)
  num_workers = min(num_workers, len(jobs))
  bar = None
  if progress:
    missing = _missing_subjects(output_dir, jobs)
    if missing:
      print(f"Writing the synthetic short-axis cine cohort (seed {jobs[0][2]}): {missing} of "
            f"{len(jobs)} subjects into {os.path.abspath(output_dir)} ({num_workers} worker"
            f"{'s' if num_workers > 1 else ''})", file=sys.stderr, flush=True)
      from tqdm import auto as tqdm
      bar = tqdm.tqdm(total=len(jobs), desc="subjects", unit="subject", dynamic_ncols=True)
  try:
    if num_workers == 1:
      results = []
      for job in jobs:
        results.append(_synthesize_subject(*job))
        if bar is not None:
          bar.update(1)
    else:
      # Spawned workers: safe when the caller has already started JAX or TensorFlow threads.
      # Subjects are independent (each has its own streams), so the files do not depend on
      # which worker writes them.
      context = multiprocessing.get_context("spawn")
      with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
        futures = [pool.submit(_synthesize_subject, *job) for job in jobs]
        for future in concurrent.futures.as_completed(futures):
          future.result()
          if bar is not None:
            bar.update(1)
        results = [future.result() for future in futures]
  finally:
    if bar is not None:
      bar.close()
  subjects = [params for params, _ in results]
  write_parameters_csv(os.path.join(output_dir, PARAMETERS_CSV), subjects)
  write_acquisition_ranges(output_dir, ranges)
  shutil.rmtree(os.path.join(output_dir, STAGING_DIR), ignore_errors=True)
  return subjects
