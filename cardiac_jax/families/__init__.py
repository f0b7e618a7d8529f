"""Model families: the registry from config.model.family to the class that trains it.

A family (contract: `base.ModelFamily`; defaults and analysis hooks: `base.FamilyBase`) owns
its networks, optimizers, pure train and eval steps, figures and evaluation. To add one, write
a module here with a `FamilyBase` subclass and name it in `FAMILIES`; the training loop and
every command then take it by name from the config, and nothing else dispatches on it.
"""

from __future__ import annotations

import importlib

import jax
import numpy as np

from cardiac_jax.families.base import (EvalOptions, FamilyBase, FamilyCapabilityError,
                                       ModelFamily, supports)

# config.model.family -> "module:class"; imported on first use, so a family's dependencies
# load only when it is used.
FAMILIES = {
    "vae": "cardiac_jax.families.vae:VAEFamily",
    "temporal_classifier": "cardiac_jax.families.temporal_classifier:TemporalClassifierFamily",
    "dcgan": "cardiac_jax.families.dcgan:DCGANFamily",
    "diffae3d": "cardiac_jax.families.diffae3d:DiffAEFamily",
}


def family_class(name: str) -> type:
  """The class registered as `name`; ValueError naming the known families otherwise."""
  if name not in FAMILIES:
    raise ValueError(f"unknown model.family {name!r}; known: {sorted(FAMILIES)}")
  module_name, class_name = FAMILIES[name].split(":")
  return getattr(importlib.import_module(module_name), class_name)


def make_family(config, axis_name: str | None = None) -> ModelFamily:
  """The model family named by config.model.family (`axis_name`: replica axis under pmap)."""
  return family_class(config.model.family)(config, axis_name=axis_name)


def supporting(hook: str) -> list[str]:
  """Names of the registered families that implement the analysis hook `hook`."""
  return [name for name in FAMILIES if supports(family_class(name), hook)]


def require(name: str, hook: str, needs: str, where: str) -> None:
  """ValueError unless the family registered as `name` implements the analysis hook `hook`;
  the message names `where` (e.g. the run's config.json), the family and the families that
  would do for `needs` (what the command is)."""
  if not supports(family_class(name), hook):
    raise FamilyCapabilityError(f"{where}: model.family is {name!r}, which has no {hook}; "
                                f"{needs} needs a {' or '.join(supporting(hook))} run")


def parameter_counts(family, seed: int = 0) -> dict[str, int]:
  """Number of trainable parameters per part of any family's state ({"encoder": n, ...}), from
  the abstract shapes of `init_state` (nothing is computed)."""
  params = jax.eval_shape(family.init_state, jax.random.key(seed)).params
  if not isinstance(params, dict):
    params = {"model": params}
  return {str(part): int(sum(np.prod(leaf.shape, dtype=np.int64)
                             for leaf in jax.tree.leaves(tree)))
          for part, tree in params.items()}


def parameter_summary(config) -> str:
  """One line naming the config and its parameter count per part, printed at training start."""
  counts = parameter_counts(make_family(config), int(config.seed))
  parts = ", ".join(f"{part} {n:,}" for part, n in sorted(counts.items()))
  return f"{config.name or config.model.family}: {sum(counts.values()):,} parameters ({parts})"


__all__ = ["EvalOptions", "FAMILIES", "FamilyBase", "FamilyCapabilityError", "ModelFamily",
           "family_class", "make_family", "parameter_counts", "parameter_summary", "require",
           "supports", "supporting"]
