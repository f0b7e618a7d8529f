"""Subject-level splits of a prepared cohort: "train", "val", "test", stratified by group.

Shared by the slice preparation (`tfds_builders.Acdc`) and the cine preparation
(`data_pipelines.cine`); the split is drawn over the subjects actually prepared.
"""

from __future__ import annotations

import numpy as np

SPLITS = ("train", "val", "test")
DEFAULT_SPLIT_FRACTIONS = (0.7, 0.1, 0.2)


def check_split_arguments(split_seed, split_fractions) -> tuple[int, tuple[float, ...]]:
  """(seed, fractions) checked: a seed numpy accepts (an integer >= 0) and three finite,
  non-negative fractions summing to 1 with some training subjects. Raises ValueError naming
  the argument, before anything is read or written."""
  if isinstance(split_seed, bool) or not isinstance(split_seed, (int, np.integer)) or not (
      0 <= int(split_seed) < 2**63):
    raise ValueError(f"split_seed must be an integer >= 0, got {split_seed!r}")
  try:
    fractions = tuple(float(f) for f in split_fractions)
  except (TypeError, ValueError):
    raise ValueError(f"split fractions must be three numbers, got {split_fractions!r}") from None
  if (len(fractions) != 3 or not all(np.isfinite(fractions)) or min(fractions) < 0
      or not np.isclose(sum(fractions), 1.0) or not fractions[0] > 0):
    raise ValueError(f"split fractions must be three non-negative numbers (train, val, test) "
                     f"summing to 1 with train > 0, got {fractions}")
  return int(split_seed), fractions


def stratified_split(groups: dict[str, str], fractions=DEFAULT_SPLIT_FRACTIONS,
                     seed: int = 0) -> dict[str, list[str]]:
  """Assigns subjects to "train"/"val"/"test", stratified by group, deterministic in `seed`.

  Each group's subjects are shuffled (seeded) and given evenly spaced ranks in (0, 1); all
  subjects are then ordered by rank and cut at the cumulative fractions. Every group thus
  spreads over the splits in the given proportions, and the split sizes are exact overall.
  With 3 or more subjects every split gets at least one.

  Args:
    groups: subject id -> group name.
    fractions: (train, val, test), summing to 1.
    seed: the split seed.

  Returns:
    split name -> sorted subject ids.
  """
  fractions = tuple(float(f) for f in fractions)
  if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
    raise ValueError(f"split fractions must be three non-negative numbers summing to 1, "
                     f"got {fractions}")
  rng = np.random.default_rng(seed)
  ranked = []
  for group in sorted(set(groups.values())):
    members = sorted(s for s, g in groups.items() if g == group)
    order = rng.permutation(len(members))
    # A random tie-breaker keeps groups of equal size from always landing in the same order.
    ties = rng.random(len(members))
    for rank, index in enumerate(order):
      ranked.append(((rank + 0.5) / len(members), ties[rank], members[index]))
  ranked.sort()
  total = len(ranked)
  counts = [int(round(total * f)) for f in fractions[1:]]
  if total >= 3:
    counts = [max(1, c) if f > 0 else 0 for c, f in zip(counts, fractions[1:])]
  num_val, num_test = counts
  num_train = max(0, total - num_val - num_test)
  subjects = [s for _, _, s in ranked]
  return {
      "train": sorted(subjects[:num_train]),
      "val": sorted(subjects[num_train:num_train + num_val]),
      "test": sorted(subjects[num_train + num_val:]),
  }
