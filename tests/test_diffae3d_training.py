"""End to end: training.train_and_evaluate of the tiny diffae3d config on in-memory toy volumes."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from cardiac_jax import checkpointing
from cardiac_jax import parallel
from cardiac_jax import families
from cardiac_jax import training
from tests.conftest import in_memory_source
from tests.test_diffae3d import tiny_config, toy_volumes


def test_tiny_config_trains_evaluates_draws_and_checkpoints_the_ema(tmp_path):
  config = tiny_config()
  config.train.num_steps = 2
  config.train.log_every = 1
  config.train.checkpoint_every = 2
  config.train.eval_every = 2
  config.train.figure_every = 2
  b, t, s = config.train.batch_size, config.data.num_frames, config.data.image_size
  train = [{"la_image": toy_volumes(b, t, s, seed=k)} for k in range(2)]
  evaluation = {"la_image": toy_volumes(4, t, s, seed=99), "mask": np.array([True] * 3 + [False])}

  data = in_memory_source(train, [evaluation])
  state = training.train_and_evaluate(config, str(tmp_path), data)
  assert int(state.step) == 2
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  assert [l["step"] for l in lines if "train/loss" in l] == [1, 2]
  val = [l for l in lines if "val/ssim" in l][-1]
  for key in ("val/eps_loss", "val/eps_loss_t500", "val/ssim", "val/nrmse", "val/psnr",
              "val/z_sem_std"):
    assert np.isfinite(val[key]), key
  assert os.path.exists(os.path.join(tmp_path, "figures", "reconstructions_0000002.png"))

  # The checkpoint holds the EMA and the flat optimizer state: a restore gives the state back.
  family = families.make_family(config)
  target = parallel.abstract_state(family.init_state, jax.random.key(config.seed),
                                   parallel.make_mesh(0))
  with checkpointing.Checkpointer(os.path.join(tmp_path, "checkpoints")) as checkpointer:
    restored, step = checkpointer.restore_latest(target)
  assert step == 2
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
      got, want = jax.random.key_data(got), jax.random.key_data(want)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  ema, params = restored.params["ema"], family.trainable(restored.params)
  assert any(not np.array_equal(e, p) for e, p in zip(jax.tree.leaves(ema),
                                                      jax.tree.leaves(params)))


def test_data_source_serves_only_the_view_the_model_reads(cine_cohort):
  from experiments import common
  from tests.conftest import diffae_smoke_config
  _, prepared = cine_cohort
  config = diffae_smoke_config(prepared)
  batches = common.make_data_source(config).train_batches(0)
  batch = next(batches)
  batches.close()
  assert families.make_family(config).batch_fields == ("la_image",)
  assert {"la_image", "lv_volume_ml", "group", "subject"} <= set(batch)
  assert not {"sa_image", "sa_label", "sa_mid_image"} & set(batch)
  assert batch["la_image"].dtype == np.float32
  assert batch["la_image"].shape[1:] == (config.data.num_frames, config.data.image_size,
                                         config.data.image_size, 1)
