"""Checks of a run's config before anything is written: types, ranges and the combinations the
training loop relies on.

`validate(config)` raises `ConfigError` at the first bad value, one line naming the key, the
value and what it must be, so that a mistake never reaches a compiled step, a workdir or a
checkpoint. Rules apply to the keys a config has: the families' sections differ, and a key a
config lacks is not checked. `check_keys` names unknown dotted keys (command-line overrides)
with their nearest valid ones.
"""

from __future__ import annotations

import difflib
import math
import numbers
from typing import Any, Callable, Iterable

Check = Callable[[Any], "str | None"]


class ConfigError(ValueError):
  """A config value (or an override key) that a run cannot use."""


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integer(lo: int | None = None, hi: int | None = None) -> Check:
  """An integer >= lo (and <= hi)."""
  def check(value):
    if not _is_int(value):
      return "must be an integer"
    if lo is not None and value < lo or hi is not None and value > hi:
      return (f"must be an integer >= {lo}" if hi is None else
              f"must be an integer in [{lo}, {hi}]")
    return None
  return check


# JAX's PRNG keys take the seed modulo 2**32: seed 2**32 would train seed 0's run again.
MAX_SEED = 2**32 - 1


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> Check:
  """A finite real number in [lo, hi] (either end open, or absent)."""
  def check(value):
    if not _is_real(value) or not math.isfinite(value):
      return "must be a finite number"
    if lo is not None and (value <= lo if lo_open else value < lo):
      return f"must be {'>' if lo_open else '>='} {lo:g}"
    if hi is not None and (value >= hi if hi_open else value > hi):
      return f"must be {'<' if hi_open else '<='} {hi:g}"
    return None
  return check


def integers(lo: int = 1, min_len: int = 0) -> Check:
  """A tuple of integers >= lo, at least min_len of them."""
  def check(value):
    if not isinstance(value, (tuple, list)) or not all(_is_int(v) for v in value):
      return f"must be a tuple of integers >= {lo}"
    if len(value) < min_len:
      return f"must hold at least {min_len} integer{'s' if min_len > 1 else ''} >= {lo}"
    if any(v < lo for v in value):
      return f"must be a tuple of integers >= {lo}"
    return None
  return check


def choice(*options) -> Check:
  def check(value):
    if value not in options:
      return f"must be one of {', '.join(map(repr, options))}"
    return None
  return check


def boolean() -> Check:
  def check(value):
    return None if isinstance(value, bool) else "must be True or False"
  return check


def text() -> Check:
  def check(value):
    return None if isinstance(value, str) else "must be a string"
  return check


def subset(*options) -> Check:
  """A non-empty tuple of distinct entries from `options`."""
  def check(value):
    if (not isinstance(value, (tuple, list)) or not value or len(set(value)) != len(value)
        or any(v not in options for v in value)):
      return (f"must be a non-empty tuple of distinct entries from "
              f"{', '.join(map(repr, options))}, e.g. {tuple(options)!r} (quoted on a command "
              "line)")
    return None
  return check


def _fraction() -> Check:
  return number(0.0, 1.0)


def plausibility_bounds() -> Check:
  """A tuple of `name=low:high` strings that `data_pipelines.plausibility.parse_bounds` takes
  (the prepare flag --plausibility's entries)."""
  def check(value):
    entries = (value,) if isinstance(value, str) else value
    if not isinstance(entries, (tuple, list)) or not all(isinstance(v, str) for v in entries):
      return "must be a tuple of 'name=low:high' strings, e.g. ('lv_ef=1:95',)"
    from data_pipelines import plausibility  # pylint: disable=g-import-not-at-top
    try:
      plausibility.parse_bounds(entries)
    except ValueError as e:
      message = str(e)
      return message.split("--plausibility", 1)[-1].lstrip(": ") or message
    return None
  return check


# Rules by dotted key: what the loop and the model builders need of each value. Values that
# name a family, network or layer are checked against the modules that define them
# (`_named_choices`), the optimizer's by `train_state.check_optimizer_config`, and what else a
# family requires by building it (`_check_family`).
RULES: dict[str, Check] = {
    "name": text(),
    "seed": integer(0, MAX_SEED),
    # Training loop.
    "train.batch_size": integer(1),
    "train.eval_batch_size": integer(1),
    "train.num_steps": integer(1),
    "train.log_every": integer(1),
    "train.eval_every": integer(0),
    "train.checkpoint_every": integer(0),
    "train.figure_every": integer(0),
    "train.max_checkpoints": integer(1),
    "train.best_metric": text(),
    "train.best_mode": choice("min", "max"),
    "train.skip_nonfinite": boolean(),
    "train.progress_bar": boolean(),
    "train.stage1_steps": integer(0),
    # Parallelism.
    "parallel.backend": choice("jit", "pmap"),
    "parallel.num_devices": integer(0),
    # Model sizes.
    "model.channels": integers(1, min_len=1),
    "model.latent_dim": integer(1),
    "model.compute_dtype": choice("float32", "bfloat16"),
    "model.remat": choice("none", "blocks"),
    "model.bottleneck_features": integer(1),
    "model.frame_units": integers(1),
    "model.sequence_units": integers(1),
    "model.concept_units": integer(1),
    "model.head_units": integers(1),
    "model.base_channels": integer(1),
    "model.channel_mult": integers(1, min_len=1),
    "model.num_res_blocks": integer(1),
    "model.attention_resolutions": integers(1),
    "model.encoder_channel_mult": integers(1, min_len=1),
    "model.encoder_num_res_blocks": integer(1),
    "model.encoder_attention_resolutions": integers(1),
    "model.z_sem_dim": integer(1),
    "model.time_embed_dim": integer(0),
    "model.num_heads": integer(1),
    "model.attention_block_size": integer(1),
    "model.dropout": number(0.0, 1.0, hi_open=True),
    "model.ema_decay": _fraction(),
    # Losses.
    "loss.beta_kl": number(0.0),
    "loss.beta_rec": number(0.0),
    "loss.beta_neg": number(0.0),
    "loss.gamma_r": number(0.0),
    "loss.gamma": number(0.0),
    "loss.delta": number(0.0, lo_open=True),
    "loss.weight_l1": number(0.0),
    "loss.regularized_dims": integers(0),
    "loss.vae_warmup_steps": integer(0),
    "diffusion.num_timesteps": integer(1),
    "diffusion.beta_start": number(0.0, 1.0, lo_open=True, hi_open=True),
    "diffusion.beta_end": number(0.0, 1.0, lo_open=True, hi_open=True),
    "diffusion.p2_gamma": number(0.0),
    "diffusion.p2_k": number(0.0, lo_open=True),
    "eval.inversion_steps": integer(1),
    "eval.decode_steps": integer(1),
    "eval.loss_timesteps": integers(0),
    "gan.real_label_low": _fraction(),
    "gan.real_label_high": _fraction(),
    "gan.eval_thumbnail_size": integer(1),
    # Data as the training loop reads it (preparation checks its own arguments).
    "data.image_size": integer(1),
    "data.channels": subset("ed", "es"),
    "data.num_frames": integer(1),
    "data.synthetic.num_subjects": integer(1),
    "data.synthetic.seed": integer(0),
    "data.prepare.image_size": integer(1),
    "data.prepare.spacing_mm": number(0.0, lo_open=True),
    "data.prepare.split_seed": integer(0),
    "data.prepare.plausibility": plausibility_bounds(),
    "data.augment.max_shift_px": integer(0),
    "data.augment.zoom_prob": _fraction(),
    "data.augment.flip_prob": _fraction(),
    # The latent DDIM of experiments.sample (a later analysis of the run).
    "latent.batch_size": integer(1),
    "latent.num_steps": integer(1),
    "latent.learning_rate": number(0.0, lo_open=True),
    "latent.log_every": integer(1),
}


def _named_choices() -> dict[str, Check]:
  """Rules for values that name a family, network, loss or layer implementation, from the
  modules that define them (imported on first use: they import JAX and Flax)."""
  from cardiac_jax import families, layers  # pylint: disable=g-import-not-at-top
  from cardiac_jax.families import vae as vae_family  # pylint: disable=g-import-not-at-top
  from cardiac_jax.models import dcgan, diffae3d, vae  # pylint: disable=g-import-not-at-top
  return {
      "model.family": choice(*families.FAMILIES),
      "model.architecture": choice(*vae_family.ARCHITECTURES),
      "model.conv_impl": choice(*dict.fromkeys(layers.CONV_IMPLS + diffae3d.CONV_IMPLS)),
      "model.initializer": choice(*vae.INITIALIZERS),
      "model.output_activation": choice(*dict.fromkeys(("none", "sigmoid")
                                                       + dcgan.OUTPUT_ACTIVATIONS)),
      "model.encoder_head": choice(*diffae3d.ENCODER_HEADS),
      "loss.objective": choice("vae", "soft_intro"),
      "loss.reconstruction": choice("mse", "bce"),
      "loss.scale": choice("chw", "hw", "none"),
  }


def _get(config, key: str):
  """The value at dotted `key`, or KeyError when the config lacks it."""
  node = config
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node:
      raise KeyError(key)
    node = node[part]
  return node


def _fail(key: str, value, problem: str) -> ConfigError:
  return ConfigError(f"config {key}={value!r}: {problem}")


def validate(config) -> None:
  """Raises ConfigError, naming the key, at the first value a run cannot use."""
  values = {}
  for key, check in {**RULES, **_named_choices()}.items():
    try:
      value = _get(config, key)
    except KeyError:
      continue
    problem = check(value)
    if problem:
      raise _fail(key, value, problem)
    values[key] = value
  _check_combinations(values)
  _check_data_source(config)
  if "optimizer" in config:  # The optimizer's own rules (cardiac_jax.train_state).
    from cardiac_jax import train_state  # pylint: disable=g-import-not-at-top
    train_state.check_optimizer_config(config.optimizer)
  _check_family(config)


def _check_family(config) -> None:
  """The model family accepts the config (its own checks: e.g. one regularised latent
  dimension per attribute) and its modules accept their sizes (e.g. an image size that the
  network's levels halve); the state is traced abstractly, nothing is allocated or compiled."""
  import jax  # pylint: disable=g-import-not-at-top
  from cardiac_jax import families  # pylint: disable=g-import-not-at-top
  try:
    family = families.make_family(config)
    jax.eval_shape(family.init_state, jax.random.key(0))
  except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
    detail = " ".join(str(e).split())
    family = config.get("model", {}).get("family", "?")
    raise ConfigError(f"config refused by the {family} model family: {detail}") from None


def _check_data_source(config) -> None:
  """data.dataset names a source of the config's data format (slices or cine), and a
  prepared dataset names its directory."""
  try:
    data = _get(config, "data")
  except KeyError:
    return
  cine = data.get("format", "slices") == "cine"
  datasets = ("synthetic", "ukbb", "prepared") if cine else ("synthetic", "acdc", "prepared")
  dataset = data.get("dataset", "synthetic")
  if dataset not in datasets:
    raise _fail("data.dataset", dataset, f"must be one of {', '.join(map(repr, datasets))} for "
                f"{'cine' if cine else 'slice'} data")
  if dataset == "prepared" and not data.get("prepared_dir", ""):
    raise _fail("data.prepared_dir", data.get("prepared_dir", ""),
                "must name the prepared dataset when data.dataset='prepared'")
  if dataset in ("acdc", "ukbb") and not data.get("source_dir", ""):
    raise _fail("data.source_dir", data.get("source_dir", ""),
                f"must name the raw {dataset} folder when data.dataset={dataset!r}")
  split = data.get("split")
  if split is not None:
    if (not isinstance(split, (tuple, list)) or len(split) != 3
        or not all(_is_real(f) and 0 <= f <= 1 for f in split)
        or not math.isclose(sum(split), 1.0, abs_tol=1e-6)):
      raise _fail("data.split", split, "must be three fractions (train, val, test) summing to 1")


def _check_combinations(v: dict[str, Any]) -> None:
  metric = v.get("train.best_metric", "")
  if metric and not metric.startswith("val/"):
    raise _fail("train.best_metric", metric,
                "must name a validation metric as logged in metrics.jsonl (val/<name>, e.g. "
                "val/reconstruction_loss), or be '' to keep no best checkpoint")
  if "loss.regularized_dims" in v and "model.latent_dim" in v:
    dims, size = v["loss.regularized_dims"], v["model.latent_dim"]
    if any(d >= size for d in dims) or len(set(dims)) != len(dims):
      raise _fail("loss.regularized_dims", dims,
                  f"must be distinct latent dimensions below model.latent_dim ({size})")
  if "gan.real_label_low" in v and "gan.real_label_high" in v:
    if v["gan.real_label_low"] > v["gan.real_label_high"]:
      raise _fail("gan.real_label_low", v["gan.real_label_low"],
                  f"must not exceed gan.real_label_high ({v['gan.real_label_high']})")
  if "diffusion.beta_start" in v and "diffusion.beta_end" in v:
    if v["diffusion.beta_start"] > v["diffusion.beta_end"]:
      raise _fail("diffusion.beta_start", v["diffusion.beta_start"],
                  f"must not exceed diffusion.beta_end ({v['diffusion.beta_end']})")


def check_process_layout(config, process_count: int) -> None:
  """Global batch sizes split evenly over `process_count` processes (checked before the first
  step: the evaluation batch is otherwise first cut at the first evaluation)."""
  for key in ("train.batch_size", "train.eval_batch_size"):
    value = _get(config, key)
    if value % process_count:
      raise _fail(key, value, f"must be divisible by the number of processes ({process_count})")


def leaf_keys(config, prefix: str = "") -> list[str]:
  """Every dotted key of `config`, sections included ("train", "train.batch_size", ...)."""
  keys = []
  for name in config.keys():
    key = f"{prefix}{name}"
    keys.append(key)
    child = config[name]
    if hasattr(child, "keys") and not isinstance(child, dict):
      keys.extend(leaf_keys(child, key + "."))
  return keys


def _initials(name: str) -> str:
  return "".join(part[:1] for part in name.split("_") if part)


def nearest_keys(config, key: str, n: int = 3) -> list[str]:
  """The valid keys closest to `key`: those of its section first, a key whose initials or a
  part of whose name it spells (`lr` for learning_rate) before mere spelling neighbours."""
  section, _, last = key.rpartition(".")
  candidates = [k for k in leaf_keys(config) if k != section]

  def score(candidate: str) -> tuple:
    c_section, _, c_last = candidate.rpartition(".")
    spelled = last and (last == _initials(c_last) or last in c_last or c_last in last)
    ratio = difflib.SequenceMatcher(None, key, candidate).ratio()
    ratio_last = difflib.SequenceMatcher(None, last, c_last).ratio()
    return (c_section == section, bool(spelled), max(ratio, ratio_last))

  ranked = sorted(candidates, key=score, reverse=True)
  close = [k for k in ranked if score(k)[1] or score(k)[2] >= 0.6][:n]
  if not close and section:  # Nothing alike: keys of the section it names.
    close = [k for k in ranked if k.startswith(section + ".")][:n]
  return close


def check_keys(config, keys: Iterable[str]) -> None:
  """Raises ConfigError for the first dotted key that `config` lacks, naming the nearest."""
  for key in keys:
    try:
      _get(config, key)
      continue
    except KeyError:
      pass
    parts = key.split(".")
    for i in range(1, len(parts)):
      prefix = ".".join(parts[:i])
      try:
        value = _get(config, prefix)
      except KeyError:
        break
      if not hasattr(value, "keys"):
        raise ConfigError(f"unknown config key {key!r}: {prefix} is a value ({value!r}), not a "
                          "section")
    near = nearest_keys(config, key)
    hint = (f"; nearest: {', '.join(near)}" if near else
            f"; top-level keys: {', '.join(k for k in config.keys())}")
    raise ConfigError(f"unknown config key {key!r}{hint}")
