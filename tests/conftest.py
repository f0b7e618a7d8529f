"""Shared test fixtures: an isolated data cache, and small in-memory prepared examples."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cardiac_jax import structures


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
  """Every test session generates its synthetic data into its own cache directory."""
  path = str(tmp_path_factory.mktemp("cardiac_jax_cache"))
  previous = os.environ.get("CARDIAC_JAX_CACHE")
  os.environ["CARDIAC_JAX_CACHE"] = path
  yield path
  if previous is None:
    os.environ.pop("CARDIAC_JAX_CACHE", None)
  else:
    os.environ["CARDIAC_JAX_CACHE"] = previous


def make_disc_example(index: int, size: int = 64) -> dict:
  """A prepared-schema example: concentric LV cavity / myocardium discs and an RV crescent,
  with radii (and so attributes) that vary with `index`."""
  yy, xx = np.mgrid[:size, :size]
  radius = size * (0.12 + 0.015 * (index % 7))
  centre = size / 2
  labels = np.zeros((size, size), np.uint8)
  distance = np.hypot(yy - centre, xx - centre)
  labels[np.hypot(yy - centre, xx - centre + 1.6 * radius) < 1.1 * radius] = \
      structures.RV_BLOOD_POOL
  labels[distance < radius + size * 0.06] = structures.LV_MYOCARDIUM
  labels[distance < radius] = structures.LV_BLOOD_POOL
  es_labels = np.where(distance < 0.7 * radius, structures.LV_BLOOD_POOL,
                       np.where(labels == structures.LV_BLOOD_POOL, structures.LV_MYOCARDIUM,
                                labels)).astype(np.uint8)
  intensity = {0: 0.0, structures.RV_BLOOD_POOL: 0.8, structures.LV_MYOCARDIUM: 0.3,
               structures.LV_BLOOD_POOL: 0.9}
  image = np.stack([np.vectorize(intensity.get)(labels), np.vectorize(intensity.get)(es_labels)],
                   axis=-1).astype(np.float32)
  attributes = {name: float((index % 7 + 1) * (k + 1)) for k, name in
                enumerate(structures.ATTRIBUTE_NAMES)}
  return {"subject": f"patient{index + 1:03d}", "group": index % len(structures.GROUPS),
          "image": image, "label": np.stack([labels, es_labels], axis=-1),
          "slice_index": 4, "attributes": attributes}


@pytest.fixture(scope="session")
def disc_examples():
  return [make_disc_example(i) for i in range(24)]


def in_memory_source(train: list, evaluation: list):
  """A training.DataSource over fixed batches: training batch k is train[k % len(train)], so a
  run resumed at step k sees what it would have seen; evaluation is the list of eval batches."""
  from cardiac_jax import training

  def train_batches(start):
    step = start
    while True:
      yield train[step % len(train)]
      step += 1

  return training.DataSource(train_batches=train_batches, eval_batches=lambda: list(evaluation))
