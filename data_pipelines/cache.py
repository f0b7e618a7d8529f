"""Where generated and prepared data live: the one owner of the cache layout.

<cache> is data.cache_dir, else $CARDIAC_JAX_CACHE, else ~/.cache/cardiac_jax. Under it:
- synthetic/n<N>_seed<S>/raw: the synthetic cohort of N subjects and seed S (ACDC layout),
  with its slice datasets in .../prepared/<preparation key> and cine datasets in
  .../cine/<configuration name>;
- <dataset>/<digest of the source path>/<preparation key>: slice datasets of a raw folder;
  <dataset>/<digest>/cine/<configuration name>: cine datasets of a raw folder;
- synthetic/held_out/<digest of the cohort path>_<group>_n<N>_seed<S>/: held-out synthetic
  subjects (raw, cine/<configuration name>) that complement a run's cohort.
The names are part of every cached dataset's identity: changing one re-prepares the data.
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional

CACHE_ENV = "CARDIAC_JAX_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/cardiac_jax"


def cache_root(cache_dir: Optional[str] = None) -> str:
  """Absolute <cache>: `cache_dir` (data.cache_dir), else $CARDIAC_JAX_CACHE, else the default."""
  return os.path.abspath(os.path.expanduser(
      cache_dir or os.environ.get(CACHE_ENV, "") or DEFAULT_CACHE_DIR))


def source_digest(source_dir: str) -> str:
  """First 10 hex digits of the SHA-1 of the absolute path of a raw folder."""
  return hashlib.sha1(os.path.abspath(source_dir).encode()).hexdigest()[:10]


def synthetic_cohort_dir(root: str, num_subjects: int, seed: int) -> str:
  """<cache>/synthetic/n<N>_seed<S>: a synthetic cohort and everything prepared from it."""
  return os.path.join(root, "synthetic", f"n{num_subjects}_seed{seed}")


def synthetic_raw_dir(root: str, num_subjects: int, seed: int) -> str:
  """<cache>/synthetic/n<N>_seed<S>/raw: the raw synthetic cohort (slice and cine data)."""
  return os.path.join(synthetic_cohort_dir(root, num_subjects, seed), "raw")


def preparation_key(prepare_config) -> str:
  """Name of a slice preparation from data.prepare (image size, spacing, slices, labels,
  split seed, and plausibility bounds other than the defaults: `plausibility.bounds_suffix`,
  empty for the defaults, so default preparations keep their names)."""
  from data_pipelines import plausibility  # pylint: disable=g-import-not-at-top
  p = prepare_config
  return (f"s{p.image_size}_sp{p.spacing_mm:g}_{p.slice_rule}_{p.label_convention}"
          f"_split{p.split_seed}{plausibility.bounds_suffix(plausibility.bounds_of(p))}")


def prepared_slice_dir(data_config) -> str:
  """The slice dataset of a data config (config.data) without creating anything.

  "synthetic": <cache>/synthetic/n<N>_seed<S>/prepared/<key>; "acdc": <cache>/acdc/<digest of
  data.source_dir>/<key>; "prepared" or data.prepared_dir set: data.prepared_dir as it is.
  """
  data = data_config
  dataset = data.dataset
  if dataset == "prepared":
    if not data.prepared_dir:
      raise ValueError("data.dataset='prepared' needs --config.data.prepared_dir=DIR")
    return os.path.abspath(data.prepared_dir)
  if data.prepared_dir:
    return os.path.abspath(data.prepared_dir)
  if dataset == "synthetic":
    s = data.synthetic
    return os.path.join(synthetic_cohort_dir(cache_root(data.cache_dir), s.num_subjects, s.seed),
                        "prepared", preparation_key(data.prepare))
  if dataset == "acdc":
    if not data.source_dir:
      raise ValueError("data.dataset='acdc' needs --config.data.source_dir=<ACDC root>")
    return os.path.join(cache_root(data.cache_dir), "acdc", source_digest(data.source_dir),
                        preparation_key(data.prepare))
  raise ValueError(f"unknown data.dataset {dataset!r} (synthetic, acdc or prepared)")


def synthetic_cine_dir(root: str, num_subjects: int, seed: int, name: str) -> str:
  """<cache>/synthetic/n<N>_seed<S>/cine/<name>: a cine dataset of the synthetic cohort."""
  return os.path.join(synthetic_cohort_dir(root, num_subjects, seed), "cine", name)


def source_cine_dir(root: str, dataset: str, source_dir: str, name: str) -> str:
  """<cache>/<dataset>/<digest of source_dir>/cine/<name>: a cine dataset of a raw folder."""
  return os.path.join(root, dataset, source_digest(source_dir), "cine", name)


def held_out_cohort_dir(root: str, cohort_dir: str, group: str, num_subjects: int,
                        seed: int) -> str:
  """<cache>/synthetic/held_out/<digest of cohort_dir>_<group>_n<N>_seed<S>: held-out
  synthetic subjects of `group` complementing the cohort in `cohort_dir` (raw, cine/<name>)."""
  return os.path.join(root, "synthetic", "held_out",
                      f"{source_digest(cohort_dir)}_{group.lower()}_n{int(num_subjects)}"
                      f"_seed{seed}")
