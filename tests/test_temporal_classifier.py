"""Temporal VAE-classifier family (cardiac_jax.families.temporal_classifier) on toy cine batches."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cardiac_jax import structures
from cardiac_jax.families import temporal_classifier as temporal_family
from cardiac_jax.metrics import classification
from experiments.configs import get_config

LV, MYO, RV = structures.LV_BLOOD_POOL, structures.LV_MYOCARDIUM, structures.RV_BLOOD_POOL


def tiny_config(**train):
  """The smoke config with a model small enough to compile quickly on a loaded CPU."""
  config = get_config("temporal_classifier:smoke")
  config.model.channels = (4, 8)
  config.model.frame_units = (4,)
  config.model.sequence_units = ()
  config.model.head_units = (4,)
  config.optimizer.learning_rate = 3e-3
  for key, value in train.items():
    config.train[key] = value
  return config


def toy_cine_batch(batch_size: int, frames: int, size: int, seed: int = 0) -> dict:
  """Cine-format batch: LV disc, myocardial ring and RV disc per slice; the LV radius follows a
  cosine over the cycle whose amplitude is small for the pathological groups (low EF)."""
  rng = np.random.default_rng(seed)
  groups = rng.integers(0, len(structures.GROUPS), batch_size).astype(np.int32)
  yy, xx = np.mgrid[:size, :size]
  centre = (size - 1) / 2
  labels = np.zeros((batch_size, frames, size, size, 3), np.int32)
  for b, t, s in itertools.product(range(batch_size), range(frames), range(3)):
    amplitude = 0.25 if groups[b] == 0 else 0.08
    radius = size * (0.2 - 0.03 * s) * (1 - amplitude * (1 - np.cos(2 * np.pi * t / frames)))
    distance = np.hypot(yy - centre, xx - centre)
    plane = np.zeros((size, size), np.int32)
    plane[np.hypot(yy - centre, xx - centre + size * 0.35) < size * 0.15] = RV
    plane[distance < radius + size * 0.1] = MYO
    plane[distance < radius] = LV
    labels[b, t, :, :, s] = plane
  volumes = (labels == LV).sum(axis=(2, 3, 4)).astype(np.float32)
  return {"subject": np.array([f"s{seed}_{b}" for b in range(batch_size)]), "group": groups,
          "sa_label": labels, "sa_image": labels.astype(np.float32) / 3.0,
          "lv_volume_ml": volumes, "pixel_spacing_mm": np.full(batch_size, 2.6, np.float32),
          "slice_thickness_mm": np.full(batch_size, 8.0, np.float32)}


@pytest.fixture(scope="module")
def setup():
  config = tiny_config()
  family = temporal_family.TemporalClassifierFamily(config)
  state = jax.jit(family.init_state)(jax.random.key(0))
  batch = toy_cine_batch(config.train.batch_size, config.data.num_frames,
                         config.data.image_size)
  return config, family, state, batch


def test_shapes_and_parts(setup):
  config, family, state, batch = setup
  b, t, s = config.train.batch_size, config.data.num_frames, config.data.image_size
  assert set(state.params) == set(temporal_family.PARTS)
  assert set(state.batch_stats["encoder"]) and state.batch_stats["classifier"] == {}
  x = family.model_input(jnp.asarray(batch["sa_label"]))
  assert x.shape == (b, t, s, s, 3 * structures.NUM_LABELS)
  assert np.all(np.asarray(x).reshape(b, t, s, s, 3, 4).sum(-1) == 1)
  mu, logvar = jax.eval_shape(family.encode, state, x)
  assert mu.shape == logvar.shape == (b, t, config.model.latent_dim)
  out = jax.eval_shape(family.decode, state, mu)
  assert out.shape == x.shape
  concepts = jax.eval_shape(family.concepts, state, mu)
  assert concepts.shape == (b, config.model.concept_units)
  assert jax.eval_shape(family.logits, state, mu).shape == (b,)
  label = np.asarray(family.disease_label({"group": jnp.asarray(batch["group"])}))
  assert np.array_equal(label, (batch["group"] != structures.GROUP_INDEX["NOR"]).astype(float))
  with pytest.raises(ValueError, match="data.num_frames"):
    family.raw_input({"sa_label": np.zeros((2, 3, s, s, 3), np.int32)})


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loss_terms_match_numpy(setup):
  config, family, state, batch = setup
  raw = jnp.asarray(batch["sa_label"])
  label = family.disease_label({"group": jnp.asarray(batch["group"])})
  noise = jax.random.normal(jax.random.key(3), raw.shape[:2] + (config.model.latent_dim,))
  terms, stats = jax.jit(family.loss_terms)(state.params, state.batch_stats, raw, label, noise)
  terms = jax.tree.map(np.asarray, terms)
  b, t, s = raw.shape[:3]
  log_p = _log_softmax(terms["output"].reshape(b, t, s, s, 3, 4).astype(np.float64))
  one_hot = np.eye(4)[np.asarray(raw)]
  ce = -(one_hot * log_p).sum(axis=(2, 3, 4, 5))
  assert np.allclose(terms["reconstruction"], ce, rtol=1e-4)
  mu, logvar = terms["mu"].astype(np.float64), terms["logvar"].astype(np.float64)
  kl = -0.5 * (1 + logvar - mu ** 2 - np.exp(logvar)).sum(-1)
  assert np.allclose(terms["kl"], kl, rtol=1e-4, atol=1e-5)
  p = 1 / (1 + np.exp(-terms["logit"].astype(np.float64)))
  y = np.asarray(label)
  bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
  assert np.allclose(terms["bce"], bce, rtol=1e-4)
  total = float(family.total_loss(terms, 0.7))
  assert total == pytest.approx(np.mean(ce + 0.2 * kl) + 0.7 * np.mean(bce), rel=1e-5)
  assert set(stats) == set(temporal_family.PARTS)


def test_roc_auc_matches_pair_count():
  rng = np.random.default_rng(0)
  scores = np.round(rng.normal(size=60), 1)          # Rounded: many ties.
  labels = rng.integers(0, 2, 60)
  pos, neg = scores[labels == 1], scores[labels == 0]
  brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
  assert classification.roc_auc(scores, labels) == pytest.approx(brute)
  assert classification.roc_auc([0.1, 0.9], [0, 1]) == 1.0
  assert classification.roc_auc([0.9, 0.1], [0, 1]) == 0.0
  assert np.isnan(classification.roc_auc([0.1, 0.2], [1, 1]))
  family_metrics = temporal_family.TemporalClassifierFamily.finalize_eval(
      None, {"logit": scores, "label": labels})
  assert family_metrics == {"auc": pytest.approx(brute)}


def test_dice():
  labels = np.zeros((1, 2, 8, 8, 3), np.int32)
  labels[0, :, 2:6, 2:6, :] = LV                      # 2 x 16 x 3 = 96 LV voxels.
  predicted = labels.copy()
  predicted[0, :, 2:4, 2:6, :] = 0                    # Half of them missed.
  dice = np.asarray(temporal_family.dice_per_structure(jnp.asarray(labels),
                                                      jnp.asarray(predicted)))
  assert dice.shape == (1, 3)
  assert dice[0, 2] == pytest.approx(2 * 48 / (96 + 48))
  assert dice[0, 0] == 1.0 and dice[0, 1] == 1.0     # Absent from both.


def test_stage_switch_and_joint_training_decrease_the_loss(setup):
  config, family, state, batch = setup
  assert family.uses_warmup(0) and family.uses_warmup(config.train.stage1_steps - 1)
  assert not family.uses_warmup(config.train.stage1_steps)
  warmup = jax.jit(family.warmup_train_step)
  joint = jax.jit(family.train_step)
  device_batch = {k: jnp.asarray(v) for k, v in batch.items() if k != "subject"}
  after_warmup, metrics = warmup(state, device_batch, jax.random.key(1))
  assert metrics["stage"] == 1.0 and metrics["finite"] == 1.0
  # Stage 1 leaves the classifier and its optimizer state untouched, trains the VAE.
  for old, new in zip(jax.tree.leaves((state.params["classifier"],
                                       state.opt_state["classifier"])),
                      jax.tree.leaves((after_warmup.params["classifier"],
                                       after_warmup.opt_state["classifier"]))):
    assert np.array_equal(np.asarray(old), np.asarray(new))
  assert not np.array_equal(np.asarray(jax.tree.leaves(state.params["encoder"])[0]),
                            np.asarray(jax.tree.leaves(after_warmup.params["encoder"])[0]))
  current, losses = after_warmup, []
  for i in range(6):
    current, metrics = joint(current, device_batch, jax.random.key(10 + i))
    losses.append(float(metrics["loss"]))
    assert metrics["stage"] == 2.0
  assert not np.array_equal(np.asarray(after_warmup.params["classifier"]["logit"]["kernel"]),
                            np.asarray(current.params["classifier"]["logit"]["kernel"]))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-2:]) < 0.9 * losses[0], losses
  assert int(current.step) == 7
