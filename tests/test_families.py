"""The model-family contract: registry, protocol, and the analysis hooks commands ask for."""

from __future__ import annotations

import pytest

from cardiac_jax import families
from experiments import common
from experiments.configs import get_config

SMOKE = {"vae": "ar_sivae:smoke", "temporal_classifier": "temporal_classifier:smoke",
         "dcgan": "dcgan:smoke", "diffae3d": "diffae3d:smoke"}


def test_every_registered_family_follows_the_contract():
  assert set(SMOKE) == set(families.FAMILIES)
  for name, spec in SMOKE.items():
    family = families.make_family(get_config(spec))
    assert isinstance(family, families.FamilyBase) and family.name == name
    assert isinstance(family, families.ModelFamily), name
    assert family.eval_metric_keys and callable(family.train_step)


def test_hooks_are_found_by_capability_not_by_name():
  assert families.supporting("generator") == ["vae", "dcgan"]
  assert families.supporting("evaluate_run") == ["vae", "diffae3d"]
  assert families.supporting("invert") == ["diffae3d"]
  assert families.supporting("concepts") == ["temporal_classifier"]
  assert families.supporting("first_linear_kernel") == ["vae", "dcgan"]


def test_a_missing_hook_is_a_one_line_user_error_naming_the_families_that_have_it():
  family = families.make_family(get_config("temporal_classifier:smoke"))
  with pytest.raises(families.FamilyCapabilityError,
                     match=r"'temporal_classifier' has no generator; families with one: "
                           r"vae, dcgan"):
    family.generator(None)
  with pytest.raises(families.FamilyCapabilityError,
                     match=r"run/config.json: model.family is 'dcgan', which has no "
                           r"evaluate_run; evaluation needs a vae or diffae3d run"):
    families.require("dcgan", "evaluate_run", "evaluation", "run/config.json")
  assert issubclass(families.FamilyCapabilityError, common.USER_ERRORS)
  with pytest.raises(ValueError, match="unknown model.family 'gan'"):
    families.family_class("gan")
