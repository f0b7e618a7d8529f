"""Latent directions of a generator scored against the cohort's ground-truth factors.

For N base latents z_n ~ N(0, I) and S shifts t_s in [-R, R], each direction k's images
G(z_n + t_s scale_k v_k) are segmented, and every factor f of `cardiac_jax.factors` (LV area,
myocardial thickness, RV area, rotation, LV position x / y, intensity) measured
(`measure_shifts`).
  rho_{k,n,f} = Spearman(t, f(G(z_n + t scale_k v_k))) over the shifts (rotation unwrapped),
  rho_{k,f} = mean_n rho_{k,n,f} (NaN-skipping), also mean_n |rho_{k,n,f}|,
  finite_{k,f} = fraction of base latents with a finite rho,
  range_{k,f} = mean_n (max_s f - min_s f) / resolution_f (`factor_resolution`).
The main factor of k is, among the factors finite for at least min_finite_fraction of the base
latents, the one with the largest |rho_{k,f}| (main_factor_by="rho"), or the largest
|rho_{k,f}| * min(1, range_{k,f}) ("effect": monotonic and at least one resolution). |mean rho|
rather than mean |rho| is ranked because a factor that only fluctuates (segmentation noise) has
a mean |rho| well above 0 but a mean rho near 0. Direction k controls its main factor m when
|rho_{k,m}| >= rho_threshold and range_{k,m} >= min_effect (it really moves), while no other
factor changes: every other f has |rho_{k,f}| < other_threshold (not monotonic) or range_{k,f} <
other_range_threshold (too little to matter; a tiny but monotonic side effect such as a 1-degree
drift of the LV -> RV axis while the RV grows does not count). min_effect =
other_range_threshold = 0 leave only the conditions on rho.
The LV position is one factor of the cohort, a 2-D translation (joint_position, the default): a
direction whose main factor is position x may move position y as well (a diagonal translation
is as clean an edit as an axis-aligned one), and directions controlling either count as the one
factor "position" among the distinct factors controlled. Without joint_position x and y are
separate factors and each blocks the other.

The resolution of a factor is the larger of its spread over the cohort
(`cohort_factor_statistics`) and the segmenter's median absolute error (`segmenter_quality`).
The settings are the `experiments.directions` flags of the same names.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cardiac_jax import factors, io, segmenter

CHANNEL = 0  # Image and label channel that is segmented and measured.
FACTOR_UNITS = {"lv_area": "px", "rv_area": "px", "myo_thickness": "px", "rotation": "deg",
                "position_x": "px", "position_y": "px", "intensity": "image intensity"}


def finite_or_none(value) -> float | None:
  """A float for JSON (None for NaN)."""
  value = float(value)
  return value if math.isfinite(value) else None


def nanmean(x, axis):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", category=RuntimeWarning)
    return np.nanmean(x, axis=axis)



def format_value(value, spec: str = "+.2f") -> str:
  return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else \
      format(value, spec)


def criteria_sentence(c: dict) -> str:
  """The control criterion of a summary (or Criteria as a dict), in words."""
  text = (f"A direction controls its main factor (chosen by "
          f"{'|rho|' if c['main_factor_by'] == 'rho' else '|rho| * min(1, range / resolution)'}) "
          f"when |rho| >= {c['rho_threshold']:g}")
  if c["min_effect"] > 0:
    text += f" and its range / resolution >= {c['min_effect']:g}"
  text += f", and every other factor has |rho| < {c['other_threshold']:g}"
  if c["other_range_threshold"] > 0:
    text += f" or range / resolution < {c['other_range_threshold']:g}"
  return text


@dataclasses.dataclass(frozen=True)
class Criteria:
  """When a direction controls a factor (module docstring); the flags of the same names.

  main_factor_by: "rho" (largest |rho|) or "effect" (largest |rho| * min(1, range / resolution)).
  A direction controls its main factor m when |rho_m| >= rho_threshold, range_m >= min_effect,
  and every other factor f either has |rho_f| < other_threshold or range_f <
  other_range_threshold. min_effect = other_range_threshold = 0 leave only the rho conditions.
  joint_position: position_x and position_y are one factor, "position" (`factors.factor_group`):
  neither counts as another factor of a direction whose main factor is the other, and the
  distinct factors controlled are counted by that group.
  """
  rho_threshold: float = 0.8
  other_threshold: float = 0.5
  min_effect: float = 0.5
  other_range_threshold: float = 0.5
  min_finite_fraction: float = 0.5
  main_factor_by: str = "rho"
  joint_position: bool = True

  def __post_init__(self):
    if self.main_factor_by not in ("rho", "effect"):
      raise ValueError(f"main_factor_by must be 'rho' or 'effect', got {self.main_factor_by!r}")


def base_latents(latent_dim: int, num: int, seed: int) -> np.ndarray:
  """(num, latent_dim) base latents z ~ N(0, I) from numpy's generator [seed, 2]: the same for
  every method of a seed."""
  rng = np.random.default_rng([seed, 2])
  return rng.standard_normal((num, latent_dim)).astype(np.float32)


def measure_shifts(generator: Callable, directions, segment_fn: Callable, shifts, base_latents,
                   batch_size: int = 144, channel: int = CHANNEL):
  """Factor values (K, N, S, F) of G(z_n + t_s d_k) for directions d_k (rows of (K, d), already
  scaled), base latents z_n (N, d) and shifts t_s (S,); F follows `factors.FACTORS`.

  segment_fn maps (M, H, W) images in [0, 1] to (M, H, W) canonical labels.
  """
  directions = np.asarray(directions, np.float32)
  base = np.asarray(base_latents, np.float32)
  shifts = np.asarray(shifts, np.float32)
  if directions.ndim != 2 or base.ndim != 2 or directions.shape[1] != base.shape[1]:
    raise ValueError(f"directions {directions.shape} and base latents {base.shape} must be "
                     "(K, d) and (N, d)")
  fn = jax.jit(generator)
  num, steps = len(base), len(shifts)
  values = np.full((len(directions), num, steps, len(factors.FACTORS)), np.nan)
  for k, direction in enumerate(directions):
    latents = (base[None] + shifts[:, None, None] * direction[None, None]).reshape(-1,
                                                                                   base.shape[1])
    images = []
    for i in range(0, len(latents), batch_size):
      chunk = latents[i:i + batch_size]
      padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), chunk.shape[1]),
                                               np.float32)]) if len(chunk) < batch_size else chunk
      images.append(np.asarray(fn(jnp.asarray(padded)))[:len(chunk), ..., channel])
    images = np.concatenate(images)
    labels = np.asarray(segment_fn(images))
    measured = factors.measure_batch(labels, images)
    values[k] = np.stack([measured[f] for f in factors.FACTORS], -1).reshape(
        steps, num, -1).transpose(1, 0, 2)
  return values


def shift_correlations(values, shifts):
  """Spearman rho (K, N, F) of every factor series over the shifts (rotation unwrapped)."""
  values = np.asarray(values, np.float64)
  rho = np.full(values.shape[:2] + values.shape[3:], np.nan)
  for f, name in enumerate(factors.FACTORS):
    circular = name in factors.CIRCULAR_FACTORS
    for k in range(values.shape[0]):
      for n in range(values.shape[1]):
        series = values[k, n, :, f]
        if circular:
          series = factors.unwrap_degrees(series)
        rho[k, n, f] = factors.spearman(shifts, series)
  return rho



def relative_ranges(values, spread: dict[str, float] | None):
  """mean_n (max_s - min_s) / spread_f (K, F); the spread defaults to the factor's spread over
  the unshifted images (the middle shift) when not given or not positive."""
  values = np.asarray(values, np.float64)
  out = np.full((values.shape[0], values.shape[3]), np.nan)
  for f, name in enumerate(factors.FACTORS):
    series = values[..., f]
    if name in factors.CIRCULAR_FACTORS:
      series = np.apply_along_axis(factors.unwrap_degrees, 2, series)
    s = (spread or {}).get(name)
    if s is None or not np.isfinite(s) or s <= 0:
      s = factors.factor_spread(values[:, :, values.shape[2] // 2, f].ravel(), name)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", category=RuntimeWarning)  # All-NaN series give NaN.
      spans = np.nanmax(series, axis=2) - np.nanmin(series, axis=2)
    spans[np.isfinite(series).sum(axis=2) < 2] = np.nan
    if np.isfinite(s) and s > 0:
      out[:, f] = nanmean(spans / s, 1)
  return out


def summarize_scores(rho, rel_range, values_ranking, criteria: Criteria = Criteria(),
                     scales=None):
  """Table rows (one per direction) and the summary of the scores (module docstring).

  rho: (K, N, F) per-base-latent Spearman; rel_range: (K, F) mean range over the shifts in units
  of each factor's spread; values_ranking: (K,) the method's ranking value.
  """
  names = factors.FACTORS
  c = criteria
  rho = np.asarray(rho, np.float64)
  rel_range = np.asarray(rel_range, np.float64)
  mean_rho = nanmean(rho, 1)                                  # (K, F)
  mean_abs = nanmean(np.abs(rho), 1)
  finite = np.isfinite(rho).mean(axis=1)
  effect = np.minimum(1.0, np.nan_to_num(rel_range, nan=0.0))
  rows, controlling = [], []
  for k in range(rho.shape[0]):
    eligible = (finite[k] >= c.min_finite_fraction) & np.isfinite(mean_rho[k])
    strength = np.abs(np.nan_to_num(mean_rho[k]))
    if c.main_factor_by == "effect":
      strength = strength * effect[k]
    strength = np.where(eligible, strength, -1.0)
    order = np.argsort(-strength, kind="stable")
    main, second = int(order[0]), int(order[1])
    has_main = bool(eligible[main])
    group = factors.factor_group(names[main], c.joint_position)
    # Factors other than the main one (and other than its partner axis of a joint position).
    outside = [f for f in range(len(names))
               if f != main and factors.factor_group(names[f], c.joint_position) != group]
    others = [f for f in outside if np.isfinite(mean_rho[k, f])]
    other = max(others, key=lambda f: abs(mean_rho[k, f])) if others else None
    # Other factors that change: monotonically (|rho|) and by enough (range / resolution).
    changed = [names[f] for f in others
               if abs(mean_rho[k, f]) >= c.other_threshold
               and not (np.isfinite(rel_range[k, f]) and rel_range[k, f] < c.other_range_threshold)]
    main_range = float(rel_range[k, main])
    controls = bool(has_main and abs(mean_rho[k, main]) >= c.rho_threshold
                    and (c.min_effect <= 0 or (np.isfinite(main_range)
                                               and main_range >= c.min_effect))
                    and not changed)
    if controls:
      controlling.append(k)
    row = {"direction": k, "value": float(values_ranking[k]),
           "scale": float(scales[k]) if scales is not None else 1.0,
           "main_factor": names[main] if has_main else "",
           "main_rho": float(mean_rho[k, main]) if has_main else float("nan"),
           "main_mean_abs_rho": float(mean_abs[k, main]) if has_main else float("nan"),
           "main_finite_fraction": float(finite[k, main]),
           "main_relative_range": main_range,
           "second_factor": names[second] if eligible[second] else "",
           "second_rho": float(mean_rho[k, second]) if eligible[second] else float("nan"),
           "max_other_factor": names[other] if other is not None else "",
           "max_other_abs_rho": float(abs(mean_rho[k, other])) if other is not None else 0.0,
           "max_other_relative_range": float(max(
               (rel_range[k, f] for f in outside if np.isfinite(rel_range[k, f])),
               default=float("nan"))),
           "changed_others": " ".join(changed),
           "controls": controls}
    for prefix, table in (("rho", mean_rho), ("mean_abs_rho", mean_abs), ("finite", finite),
                          ("relative_range", rel_range)):
      for f, name in enumerate(names):
        row[f"{prefix}_{name}"] = float(table[k, f])
    rows.append(row)
  controlled: dict[str, list[int]] = {}
  for k in controlling:
    controlled.setdefault(factors.factor_group(rows[k]["main_factor"], c.joint_position),
                          []).append(k)
  best = {}
  for f, name in enumerate(names):
    eligible = [k for k in range(rho.shape[0])
                if finite[k, f] >= c.min_finite_fraction and np.isfinite(mean_rho[k, f])]
    if not eligible:
      best[name] = None
      continue
    k = max(eligible, key=lambda j: abs(mean_rho[j, f]))
    best[name] = {"direction": k, "rho": float(mean_rho[k, f]),
                  "relative_range": float(rel_range[k, f]),
                  "is_main_factor": rows[k]["main_factor"] == name,
                  "controls": rows[k]["controls"] and rows[k]["main_factor"] == name,
                  "max_other_abs_rho": float(max(
                      (abs(mean_rho[k, g]) for g in range(len(names))
                       if g != f and np.isfinite(mean_rho[k, g])), default=0.0))}
  summary = {**dataclasses.asdict(c), "num_directions": int(rho.shape[0]),
             "num_controlling_directions": len(controlling),
             "num_distinct_factors_controlled": len(controlled),
             "controlled_factors": controlled, "best_per_factor": best}
  return rows, summary


def score_directions(generator: Callable, directions, segment_fn: Callable, shifts,
                     base_latents, *, values_ranking=None, scales=None, spread=None,
                     criteria: Criteria = Criteria(), batch_size: int = 144):
  """Measures, correlates and summarises (module docstring). spread: {factor: the unit
  of its relative range} (default: its spread over the unshifted images).

  Returns {"values": (K, N, S, F), "rho": (K, N, F), "relative_range": (K, F), "rows": [...],
  "summary": {...}}.
  """
  values = measure_shifts(generator, directions, segment_fn, shifts, base_latents, batch_size)
  rho = shift_correlations(values, np.asarray(shifts, np.float64))
  rel = relative_ranges(values, spread)
  ranking = values_ranking if values_ranking is not None else np.zeros(len(values))
  rows, summary = summarize_scores(rho, rel, ranking, criteria, scales=scales)
  return {"values": values, "rho": rho, "relative_range": rel, "rows": rows,
          "summary": summary}


def factor_resolution(seg_meta: dict[str, Any]) -> dict[str, float | None]:
  """Unit of the relative ranges: per factor the larger of its cohort spread and the
  segmenter's median absolute measurement error on the held-out real slices (a change below
  the measurement error is not resolved). None where neither is known."""
  spread = seg_meta.get("cohort_spread") or {}
  agreement = (seg_meta.get("quality") or {}).get("factor_agreement") or {}
  out = {}
  for name, value in spread.items():
    error = (agreement.get(name) or {}).get("median_abs_error")
    known = [v for v in (value, error) if v is not None and math.isfinite(v)]
    out[name] = max(known) if known else None
  return out


def segmenter_quality(params, seg_config, images, labels) -> dict[str, Any]:
  """Dice of the segmenter on (N, S, S, 1) images with true (N, S, S) labels, and per factor
  the Spearman correlation and the median absolute difference of its measurement on predicted
  and on true labels (with the share of images where both are finite)."""
  predicted = segmenter.segment(params, images, seg_config)
  dice = segmenter.dice_scores(predicted, labels)
  on_predicted = factors.measure_batch(predicted, images[..., 0])
  on_true = factors.measure_batch(labels, images[..., 0])
  agreement = {}
  for f in factors.FACTORS:
    both = np.isfinite(on_predicted[f]) & np.isfinite(on_true[f])
    agreement[f] = {"spearman": finite_or_none(factors.spearman(on_true[f][both],
                                                          on_predicted[f][both])),
                    "median_abs_error": finite_or_none(np.median(np.abs(on_predicted[f][both]
                                                                 - on_true[f][both]))
                                                if both.any() else float("nan")),
                    "finite_fraction": float(both.mean()) if len(both) else 0.0}
  return {"dice": dice, "factor_agreement": agreement, "num_examples": int(len(images))}


def cohort_correlation_table(correlation: dict[str, dict[str, float]]) -> str:
  """Markdown table of the cohort's factor correlations (`cohort_factors`)."""
  names = list(correlation)
  lines = ["| factor | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
  for f in names:
    lines.append(f"| {f} | " + " | ".join(format_value(correlation[f].get(g)) for g in names)
                 + " |")
  return "\n".join(lines)


def markdown_table(rows: Sequence[dict], header: str) -> str:
  """`header`, then one table row per direction (`summarize_scores` rows)."""
  cells = [[r["direction"], f"{r['value']:.4g}", r["main_factor"] or "-",
            format_value(r["main_rho"]), format_value(r["main_mean_abs_rho"], ".2f"),
            format_value(r["main_finite_fraction"], ".2f"),
            format_value(r["main_relative_range"], ".2f"), r["second_factor"] or "-",
            format_value(r["second_rho"]), ", ".join(r["changed_others"].split()) or "-",
            "yes" if r["controls"] else "no"] for r in rows]
  return f"{header}\n\n" + io.markdown_table(
      ["dir", "value", "main factor", "rho", "mean abs rho", "finite", "range / resolution",
       "second factor", "rho", "other factors that change", "controls"], cells, "rrlrrrrlrll")

def grid_directions(rows: Sequence[dict], count: int, by: str) -> list[int]:
  """The `count` directions of a grid figure: the first rows (the method's ranking, by="rank")
  or those of the largest |rho| of their main factor (by="rho")."""
  if by == "rho":
    key = lambda r: -abs(r["main_rho"]) if not math.isnan(r["main_rho"]) else 0.0
    return [r["direction"] for r in sorted(rows, key=key)][:count]
  return [r["direction"] for r in rows][:count]


def cohort_factor_statistics(labels, images) -> tuple[dict[str, float],
                                                      dict[str, dict[str, float]]]:
  """(spread, correlation) of the factors measured on (N, S, S) true labels of (N, S, S)
  images: the spread (`factors.factor_spread`) of every factor, and the Spearman correlation of
  every pair of factors over the images where both are finite. Factors that go together in the
  cohort (a large LV cavity has a thin wall) are hard for any latent direction to move apart."""
  measured = factors.measure_batch(labels, images)
  spread = {f: factors.factor_spread(measured[f], f) for f in factors.FACTORS}
  correlation = {f: {g: finite_or_none(factors.spearman(measured[f], measured[g]))
                      for g in factors.FACTORS} for f in factors.FACTORS}
  return spread, correlation


def comparison_row(result: dict) -> dict:
  """One row of a comparison of methods from a method's results (results.json): directions,
  controlling directions, distinct factors controlled, and the best rho per factor with its
  direction."""
  r = result
  row = {"run": os.path.basename(r["workdir"]), "kind": r["kind"], "method": r["method"],
         "directions": r["num_directions"],
         "controlling": r["num_controlling_directions"],
         "distinct_factors": r["num_distinct_factors_controlled"],
         "controlled": " ".join(sorted(r["controlled_factors"])),
         "segmenter_dice": (r.get("segmenter", {}).get("dice") or {}).get("mean")}
  if r["method"] == "voynov" and "reconstructor" in r:
    row["reconstructor_accuracy"] = r["reconstructor"]["accuracy"]
  else:
    row["reconstructor_accuracy"] = None
  for name in factors.FACTORS:
    best = r["best_per_factor"].get(name)
    row[f"best_rho_{name}"] = best["rho"] if best else None
    row[f"best_dir_{name}"] = best["direction"] if best else None
    row[f"best_controls_{name}"] = best["controls"] if best else None
  return row


def comparison_markdown(rows: Sequence[dict], results: Sequence[dict]) -> str:
  """Markdown table of `comparison_row`s: the best rho per factor, its direction, and whether it
  controls the factor, under the criteria of the compared results."""
  header = ("| run | method | directions | controlling | distinct factors | "
            + " | ".join(factors.FACTORS) + " |")
  criteria = {criteria_sentence(r) for r in results}
  lines = ["Best rho per factor (direction; * = it controls the factor). "
           + " / ".join(sorted(criteria)) + ".",
           "", header, "|---|---|---:|---:|---:|" + "---:|" * len(factors.FACTORS)]
  for row in rows:
    cells = []
    for name in factors.FACTORS:
      rho = row[f"best_rho_{name}"]
      cells.append("-" if rho is None else
                   f"{rho:+.2f} (#{row[f'best_dir_{name}']}"
                   f"{'*' if row[f'best_controls_{name}'] else ''})")
    lines.append(f"| {row['run']} ({row['kind']}) | {row['method']} | {row['directions']} | "
                 f"{row['controlling']} | {row['distinct_factors']} | " + " | ".join(cells)
                 + " |")
  return "\n".join(lines) + "\n"
