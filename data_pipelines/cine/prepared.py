"""The prepared cine datasets of a run: its own (`prepared_cine_dir`) and held-out synthetic
subjects that complement it (`held_out_cine_dir`), generated and prepared once into the cache.
"""

from __future__ import annotations

import os
from typing import Optional

from data_pipelines import cache
from data_pipelines import prepare
from data_pipelines import synthetic
from data_pipelines.cine.config import (CineConfig, DATASETS, cache_root, cine_config_from,
                                        data_field, synthetic_raw_dir)
from data_pipelines.cine.builder import make_builder_config, prepare_cine_dataset


def prepared_cine_dir(config, *, create: bool = True, num_workers: Optional[int] = None) -> str:
  """The prepared cine dataset of `config` (config.data), generating and preparing it if needed.

  - dataset "synthetic": the cohort of data.synthetic.{num_subjects, seed} in
    `synthetic_raw_dir` (the same raw cohort as the slice data; generated with the 4-chamber
    view, which is added to an existing cohort without rewriting its other files), prepared
    into <cache>/synthetic/n<N>_seed<S>/cine/<configuration name>;
  - dataset "ukbb": data.source_dir prepared into <cache>/ukbb/<hash of path>/cine/<name>;
  - dataset "prepared": data.prepared_dir as it is.
  data.prepared_dir, when set, is the output directory of the first two.
  """
  data = config.data
  dataset = data_field(data, "dataset")
  if dataset == "prepared":
    if not data_field(data, "prepared_dir"):
      raise ValueError("data.dataset='prepared' needs data.prepared_dir=DIR")
    return os.path.abspath(data_field(data, "prepared_dir"))
  if dataset not in DATASETS:
    raise ValueError(f"unknown data.dataset {dataset!r} for cine data (synthetic, ukbb or "
                     "prepared)")
  cine_config = cine_config_from(data)
  split_seed = int(data_field(data, "prepare.split_seed"))
  fractions = tuple(float(f) for f in data_field(data, "split"))
  name = make_builder_config(dataset, cine_config, split_seed, fractions).name
  if dataset == "synthetic":
    raw = synthetic_raw_dir(data)
    out = cache.synthetic_cine_dir(cache_root(data),
                                   int(data_field(data, "synthetic.num_subjects")),
                                   int(data_field(data, "synthetic.seed")), name)
  else:
    if not data_field(data, "source_dir"):
      raise ValueError("data.dataset='ukbb' needs data.source_dir=<folder of subject folders>")
    raw = os.path.abspath(data_field(data, "source_dir"))
    out = cache.source_cine_dir(cache_root(data), "ukbb", raw, name)
  if data_field(data, "prepared_dir"):
    out = os.path.abspath(data_field(data, "prepared_dir"))
  if not create:
    return out
  if dataset == "synthetic":
    synthetic.synthesize_cohort(
        raw, int(data_field(data, "synthetic.num_subjects")),
        int(data_field(data, "synthetic.seed")), long_axis_4ch=True,
        num_workers=num_workers or min(os.cpu_count() or 1, 8))
  announce_preparation(raw, out, cine_config)
  prepare_cine_dataset(raw, out, cine_config, dataset=dataset, split_seed=split_seed,
                       split_fractions=fractions, verbose=True)
  return out


def announce_preparation(raw: str, out: str, cine_config: CineConfig) -> None:
  """One line before a cine preparation that has not been done yet (minutes on a first run;
  its summary line follows when it ends)."""
  if prepare.is_prepared(out):
    return
  print(f"Preparing the cines of {raw} ({cine_config.num_frames} frames, "
        f"{cine_config.image_size} px at {cine_config.spacing_mm} mm) into {out} (once; later "
        "runs reuse it) ...", flush=True)


# The group of a held-out synthetic cohort, and the one split its prepared dataset holds.
HELD_OUT_GROUP = "NOR"
HELD_OUT_SPLIT = "train"


def held_out_cine_dir(config, num_subjects: int, group: str = HELD_OUT_GROUP, *,
                      create: bool = True, num_workers: Optional[int] = None) -> str:
  """The prepared cine dataset of synthetic subjects held out from the run's cohort.

  The run's prepared dataset (`prepared_cine_dir(config, create=False)`) must come from a raw
  synthetic cohort (its report.json). `num_subjects` subjects of `group`, numbered after that
  cohort's highest subject id, are drawn from the held-out streams of data.synthetic.seed with
  the cohort's recorded acquisition ranges (`synthetic.synthesize_held_out_cohort`), and
  prepared with the run's recorded preparation, every subject in split `HELD_OUT_SPLIT`. Both
  are cached in <cache>/synthetic/held_out/<digest of the cohort's path>_<group>_n<N>_seed<S>/
  (raw, cine/<configuration name>) and reused.

  Raises:
    ValueError: the run's data were not prepared from a synthetic cohort.
    InvalidInputError: the run's prepared dataset is missing or incomplete.
  """
  data = config.data
  main = prepared_cine_dir(config, create=False)
  report = prepare.read_report(main)
  recorded = report["config"]
  if recorded.get("dataset") != "synthetic":
    raise ValueError(f"{main} was prepared from a {recorded.get('dataset')!r} cohort, not a "
                     "synthetic one: no held-out synthetic subjects can complement it")
  source = recorded["input_dir"]
  numbers = [int(entry["subject"][len("patient"):]) for entry in report["subjects"]
             if entry["subject"].startswith("patient")
             and entry["subject"][len("patient"):].isdigit()]
  if not numbers:
    raise ValueError(f"{main}: no patient<digits> subject ids to number held-out subjects after")
  seed = int(data_field(data, "synthetic.seed"))
  cine_config = CineConfig(**recorded["cine"])
  root = cache.held_out_cohort_dir(cache_root(data), source, group, num_subjects, seed)
  fractions = (1.0, 0.0, 0.0)
  out = os.path.join(root, "cine", make_builder_config("synthetic", cine_config, 0,
                                                       fractions).name)
  if not create:
    return out
  raw = os.path.join(root, "raw")
  if not prepare.is_prepared(out):
    print(f"Held-out concept pool: {int(num_subjects)} {group} subjects of seed {seed} that the "
          f"run never saw, generated into {raw} and prepared into {out} (once; later runs reuse "
          "them) ...", flush=True)
  ranges = synthetic.read_acquisition_ranges(source) or synthetic.AcquisitionRanges()
  synthetic.synthesize_held_out_cohort(
      raw, int(num_subjects), seed, first_index=max(numbers), group=group, ranges=ranges,
      long_axis_4ch=cine_config.long_axis,
      num_workers=num_workers or min(os.cpu_count() or 1, 8))
  prepare_cine_dataset(raw, out, cine_config, dataset="synthetic", split_seed=0,
                       split_fractions=fractions, verbose=True)
  return out
