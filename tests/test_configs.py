"""Every config: resolves by name, its smoke variant takes real train steps, bad values fail early."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cardiac_jax import config_checks, families
from experiments import configs


SOFT_INTRO_NETWORK = ("vae", "beta_vae", "ar_vae", "sivae", "ar_sivae")
VAE_FAMILY = SOFT_INTRO_NETWORK + ("attri_vae",)


def test_every_config_has_smoke_and_paper_variants():
  names = configs.available_configs()
  assert set(VAE_FAMILY) <= set(names)
  for name in names:
    smoke, paper = configs.get_config(f"{name}:smoke"), configs.get_config(f"{name}:paper")
    assert smoke.name == paper.name == name
    assert smoke.train.num_steps <= 10 and smoke.data.image_size <= 32
    assert smoke.model.family == paper.model.family
    families.make_family(smoke)  # Each config names a registered family that accepts it.


@pytest.mark.parametrize("name", VAE_FAMILY)
def test_paper_variant_of_the_vae_family_is_the_acdc_setting(name):
  paper = configs.get_config(f"{name}:paper")
  assert paper.data.image_size == 128 and paper.train.batch_size == 16
  assert paper.data.prepare.slice_rule == "acdc_basal"
  assert paper.model.latent_dim == (128 if name == "attri_vae" else 256)


def test_paper_hyperparameters_of_attri_vae():
  c = configs.get_config("attri_vae:paper")
  assert (c.model.architecture, tuple(c.model.channels)) == ("attri_vae_conv", (32,) * 5)
  assert (c.model.bottleneck_features, c.model.output_activation) == (256, "none")
  assert (c.loss.objective, c.loss.reconstruction) == ("vae", "mse")
  assert (c.loss.beta_kl, c.loss.gamma, c.loss.delta, c.loss.weight_l1) == (2.0, 100.0, 100.0,
                                                                              5e-4)
  assert tuple(c.loss.regularized_dims) == (0, 1, 2)
  assert (c.optimizer.name, c.optimizer.learning_rate, c.optimizer.weight_decay) == (
      "adam", 5e-5, 0.0)
  assert c.train.num_steps == 1500 * 6  # 1500 epochs of 85 subjects in batches of 16.


def test_attri_vae_and_the_ar_vae_ablation_share_the_default_data_and_budget():
  attri, ablation, ar_sivae = (configs.get_config(n) for n in ("attri_vae", "ar_vae", "ar_sivae"))
  for other in (ablation, ar_sivae):
    assert attri.data.to_dict() == other.data.to_dict()
    assert (attri.train.batch_size, attri.train.num_steps) == (16, other.train.num_steps)
    assert attri.model.latent_dim == other.model.latent_dim
    assert attri.optimizer.learning_rate == other.optimizer.learning_rate
    assert tuple(attri.loss.regularized_dims) == tuple(other.loss.regularized_dims)
  assert (attri.data.image_size, tuple(attri.model.channels)) == (64, (32,) * 4)
  assert ablation.model.get("architecture", "soft_intro_resnet") == "soft_intro_resnet"


def test_paper_hyperparameters_of_ar_sivae():
  c = configs.get_config("ar_sivae:paper")
  assert c.loss.objective == "soft_intro"
  assert (c.loss.beta_rec, c.loss.beta_kl, c.loss.beta_neg) == (0.8, 1.0, 1024.0)
  assert (c.loss.gamma, c.loss.delta) == (0.1, 1.0)
  assert tuple(c.model.channels) == (64, 128, 256, 512, 512)
  assert tuple(c.data.attributes) == ("lv_edv_ml", "myo_ed_ml", "rv_edv_ml")
  assert tuple(c.loss.regularized_dims) == (0, 1, 2)
  assert c.optimizer.learning_rate == 2e-4


def test_unknown_config_and_variant_are_clear_errors():
  with pytest.raises(ValueError, match="unknown config 'nope'.*available"):
    configs.get_config("nope")
  with pytest.raises(ValueError, match="unknown variant 'tiny'"):
    configs.get_config("vae:tiny")
  with pytest.raises(SystemExit, match="unknown config"):
    configs.resolve_config_argv(["prog", "--config=nope"])


def test_resolve_config_argv_maps_names_to_files():
  argv = configs.resolve_config_argv(["prog", "--config=ar_sivae:smoke", "--config.seed=3"])
  assert argv[1].endswith("experiments/configs/ar_sivae.py:smoke")
  assert argv[2] == "--config.seed=3"
  assert configs.resolve_config_argv(["prog", "--config", "vae"])[2].endswith("vae.py")


@pytest.mark.parametrize("name", VAE_FAMILY)
def test_two_train_steps_of_every_config(name):
  config = configs.get_config(f"{name}:smoke")
  config.data.image_size, config.model.channels = 16, (4, 8)  # Shared toy size: fast compile.
  family = families.make_family(config)
  state = family.init_state(jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.uniform(size=(4, 16, 16, 1)), jnp.float32),
           "attributes": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
  step = jax.jit(family.train_step)
  new, m1 = step(state, batch, jax.random.key(1))
  new, m2 = step(new, batch, jax.random.key(2))
  assert int(new.step) == 2
  for m in (m1, m2):
    assert float(m["finite"]) == 1.0 and np.isfinite(float(m["loss"]))
  if config.loss.gamma:
    assert float(m2["ar_loss"]) > 0
  moved = [not np.array_equal(a, b) for a, b in
           zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params))]
  assert sum(moved) > len(moved) // 2


# ----------------------------------------------------------------------------- validation

def test_every_shipped_config_passes_validation():
  for name in configs.available_configs():
    for variant in ("", ":smoke", ":paper"):
      config_checks.validate(configs.get_config(name + variant))


@pytest.mark.parametrize("spec, key, value, message", [
    ("vae:smoke", "train.max_checkpoints", 0, "must be an integer >= 1"),
    ("vae:smoke", "train.num_steps", -5, "must be an integer >= 1"),
    ("vae:smoke", "train.log_every", 0, "must be an integer >= 1"),
    ("vae:smoke", "train.batch_size", 0, "must be an integer >= 1"),
    ("vae:smoke", "train.eval_batch_size", 0, "must be an integer >= 1"),
    ("vae:smoke", "optimizer.learning_rate", -2e-4, "must be > 0"),
    ("vae:smoke", "optimizer.learning_rate", float("nan"), "must be a finite number"),
    ("vae:smoke", "model.latent_dim", 0, "must be an integer >= 1"),
    ("vae:smoke", "model.channels", (8.5, 16), "must be a tuple of integers >= 1"),
    ("vae:smoke", "model.channels", ("(8,abc)",), "must be a tuple of integers >= 1"),
    ("vae:smoke", "model.channels", (), "must hold at least 1 integer >= 1"),
    ("vae:smoke", "data.channels", ("ed,es",), "distinct entries from 'ed', 'es'"),
    ("vae:smoke", "loss.scale", "CHW", "must be one of 'chw', 'hw', 'none'"),
    ("vae:smoke", "data.dataset", "prepared", "data.prepared_dir='': must name"),
    ("diffae3d:smoke", "model.channel_mult", (1, 0), "must be a tuple of integers >= 1"),
    ("diffae3d:smoke", "model.z_sem_dim", 0, "must be an integer >= 1"),
    ("temporal_classifier:smoke", "model.frame_units", (8, -4), "integers >= 1"),
    ("dcgan:smoke", "gan.real_label_low", 1.5, "must be <= 1"),
])
def test_bad_config_values_are_one_line_errors_naming_the_key(spec, key, value, message):
  """Values that used to train uphill, report "Done" without training, divide by zero after
  compiling, fail deep inside JAX or delete every checkpoint (a zero budget)."""
  config = configs.get_config(spec)
  section, _, name = key.rpartition(".")
  node = config
  for part in section.split("."):
    node = node[part]
  with config.ignore_type():
    node[name] = value
  with pytest.raises(config_checks.ConfigError) as excinfo:
    config_checks.validate(config)
  text = str(excinfo.value)
  assert "\n" not in text and key in text and message in text, text


def test_combinations_and_process_layout_are_checked():
  config = configs.get_config("vae:smoke")
  config.optimizer.schedule, config.optimizer.warmup_steps = "cosine", 10
  with pytest.raises(config_checks.ConfigError, match="optimizer.decay_steps=0: must exceed"):
    config_checks.validate(config)
  config = configs.get_config("vae:smoke")
  config.loss.regularized_dims = (0, 8)
  with pytest.raises(config_checks.ConfigError, match="below model.latent_dim"):
    config_checks.validate(config)
  config = configs.get_config("vae:smoke")
  config.train.eval_batch_size = 3
  with pytest.raises(config_checks.ConfigError, match="train.eval_batch_size=3: must be "
                                                      "divisible by the number of processes"):
    config_checks.check_process_layout(config, 2)


def test_sizes_the_network_refuses_are_a_config_error_not_a_traceback():
  """Checks that live in the modules (run when the state is traced) are found before a run."""
  config = configs.get_config("ar_sivae:smoke")
  config.data.image_size = 33
  with pytest.raises(config_checks.ConfigError, match="image_size 33 must be divisible"):
    config_checks.validate(config)


def test_plausibility_bounds_of_a_training_config_reach_the_slice_preparation(tmp_path,
                                                                               monkeypatch):
  """data.prepare.plausibility is prepared with (and cached under a name of) its own bounds;
  the default config keeps the default bounds and the old dataset name."""
  from data_pipelines import plausibility, prepare, synthetic
  from experiments import common
  seen = []
  monkeypatch.setattr(synthetic, "synthesize_cohort", lambda *args, **kwargs: None)
  monkeypatch.setattr(prepare, "prepare_dataset",
                      lambda source, out, *args, **kwargs: seen.append((out, kwargs["bounds"])))
  config = configs.get_config("ar_sivae:smoke")
  config.data.cache_dir = str(tmp_path)
  default_dir = common.prepared_dir(config)
  config.data.prepare.plausibility = ("lv_ef=5:85",)
  custom_dir = common.prepared_dir(config)
  assert [out for out, _ in seen] == [default_dir, custom_dir] and default_dir != custom_dir
  assert seen[0][1] == plausibility.PlausibilityBounds()
  assert seen[1][1] == plausibility.parse_bounds(["lv_ef=5:85"])
  assert seen[1][1] != seen[0][1]
