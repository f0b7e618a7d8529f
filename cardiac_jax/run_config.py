"""A run's config on disk: workdir/config.json is written by the run that starts in a workdir
and checked by every later run, so that a workdir only ever resumes the run that wrote it.

Fields may differ on resume only when they do not change what is trained (`RESUMABLE_FIELDS`,
`ANALYSIS_SECTIONS`); fields added to the configs after runs were written count at the value
that reproduces those runs (`ADDED_FIELD_DEFAULTS`) or at the resuming run's (`ADOPTED_FIELDS`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from cardiac_jax import checkpointing, config_checks, io

# Config fields that may differ between the run that wrote a workdir and the one resuming it.
RESUMABLE_FIELDS = ("train.num_steps", "train.log_every", "train.eval_every",
                    "train.checkpoint_every", "train.figure_every", "train.progress_bar",
                    "train.max_checkpoints")
# Config sections that training never reads (settings of later analyses, e.g. the latent DDIM
# of a diffusion autoencoder): they may differ, or be new, when a run resumes.
ANALYSIS_SECTIONS = ("latent.",)

# Config fields added after runs were written, with the value that reproduces those runs: a
# saved config without the field is read as having this value (when the resuming config has
# the field), so the run still resumes.
ADDED_FIELD_DEFAULTS = {"model.remat": "none", "diffusion.p2_gamma": 0.0,
                        "diffusion.p2_k": 1.0, "eval.ddim_grid": "even",
                        "data.prepare.plausibility": ()}
# Added fields that choose which checkpoints are kept, not what is trained: a saved config
# without them takes the resuming config's values (the run keeps a best checkpoint from its
# next evaluation on). A value the run was written with may not change.
ADOPTED_FIELDS = ("train.best_metric", "train.best_mode")


class WorkdirConflictError(ValueError):
  """The workdir belongs to a run with a different config."""


class EditedConfigError(WorkdirConflictError, config_checks.ConfigError):
  """The workdir's config.json differs from the run's config by a value no run can have: it was
  edited by hand (a conflict whose fix is to delete the file, and a config value a run cannot
  use)."""


def flatten_config(tree: dict, prefix: str = "") -> dict[str, Any]:
  """{"model.channels": (32, 64), ...} from a nested config dict (e.g. config.json).

  JSON turns the config's tuples into lists; lists become tuples so values are hashable.
  """
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten_config(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
  return out


def comparable_fields(saved: dict) -> dict[str, Any]:
  """`flatten_config(saved)` with each `ADDED_FIELD_DEFAULTS` field it predates filled in at
  that value (where it has the field's section): runs written before and after a field was
  added compare equal in it."""
  flat = flatten_config(saved)
  sections = {key.rpartition(".")[0] for key in flat}
  for key, value in ADDED_FIELD_DEFAULTS.items():
    if key not in flat and key.rpartition(".")[0] in sections:
      flat[key] = value
  return flat


def config_differences(saved: dict, current: dict) -> list[str]:
  """"key: saved -> current" for each training field in which two config dicts differ (the
  fields of `RESUMABLE_FIELDS` and `ANALYSIS_SECTIONS` may differ; a field of
  `ADDED_FIELD_DEFAULTS` missing from `saved` counts at its old value, one of `ADOPTED_FIELDS`
  at the current one)."""
  b = flatten_config(current)
  # An added field counts at its old value only in configs that have it (its section).
  added = {k: v for k, v in ADDED_FIELD_DEFAULTS.items() if k in b}
  added.update({k: b[k] for k in ADOPTED_FIELDS if k in b})
  a = {**added, **flatten_config(saved)}
  differing = sorted(k for k in set(a) | set(b)
                     if a.get(k) != b.get(k) and k not in RESUMABLE_FIELDS
                     and not k.startswith(ANALYSIS_SECTIONS))
  return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in differing]


def read_config_file(path: str) -> dict:
  """A run's config.json as a dict; ValueError saying why when it is not a JSON object."""
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except UnicodeDecodeError as e:
    raise ValueError(f"not UTF-8 text ({e})") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"not valid JSON ({e})") from None
  if not isinstance(saved, dict):
    raise ValueError(f"not a JSON object (a {type(saved).__name__})")
  return saved


def _check_saved_values(path: str, saved: dict) -> None:
  """EditedConfigError when the config.json at `path` holds a value no run can have (by hand):
  "resume with the same config" cannot be followed then; the fix is to delete the file, which
  the rerun re-creates from the config recorded with the checkpoints."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  try:
    config_checks.validate(ml_collections.ConfigDict(saved))
  except config_checks.ConfigError as e:
    raise EditedConfigError(
        f"{path} holds a value no run can have ({e}): it was edited. Delete it and rerun (it is "
        "re-created from the config recorded with the checkpoints), or restore it from a "
        "copy.") from None
  except (TypeError, ValueError, KeyError, AttributeError):
    return  # Damage the checks cannot read as a config: reported as the conflict it is.


def check_workdir_config(workdir: str, config,
                         checkpointer: checkpointing.Checkpointer | None = None) -> None:
  """Writes workdir/config.json, or checks that the run in the workdir comes from `config`.

  The run's config is config.json or, when that is missing, the config recorded with the
  checkpoints of `checkpointer` (the workdir's). Raises WorkdirConflictError naming the
  differing keys, a damaged config.json (with the fix), or checkpoints whose config is unknown;
  EditedConfigError (both) when a differing config.json holds a value no run can have.
  A workdir without checkpoints holds no run: its config.json is replaced.
  """
  path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json_best_effort())
  steps_saved = checkpointer.all_steps() if checkpointer is not None else []
  recorded = checkpointer.recorded_metadata().get("config") if steps_saved else None
  saved, source = None, path
  if os.path.exists(path):
    try:
      saved = read_config_file(path)
    except ValueError as e:
      if steps_saved or checkpointer is None:
        fix = ("delete it and rerun: the config recorded with the checkpoints takes its place"
               if recorded else "restore it from a copy, or use another --workdir")
        raise WorkdirConflictError(
            f"{path} is damaged: {e}. It records the config of the run whose checkpoints are "
            f"in {workdir}; {fix}.") from None
      print(f"Replacing the damaged {path} (the workdir holds no checkpoint).", flush=True)
  elif steps_saved:
    if not recorded:
      raise WorkdirConflictError(
          f"{workdir} holds checkpoints (steps {steps_saved}) but no config.json, and the "
          "checkpoints do not record the config that wrote them: restore config.json, or use "
          "another --workdir.")
    saved, source = recorded, f"the config recorded with the checkpoints in {workdir}"
  if saved is not None:
    differences = config_differences(saved, current)
    if differences and (steps_saved or checkpointer is None):
      if source == path:
        _check_saved_values(path, saved)
      raise WorkdirConflictError(
          f"{workdir} holds a run with a different config ({', '.join(differences[:8])}; "
          f"from {source}). Use another --workdir, or the same config to resume.")
    if differences:
      print(f"Replacing {path}: the workdir holds no checkpoint of its config.", flush=True)
    elif source != path:
      print(f"Re-creating {path} from {source}.", flush=True)
  if jax.process_index() == 0:
    io.write_json(path, current, sort_keys=True)
