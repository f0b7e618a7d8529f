"""The U-Net segmenter: it learns drawn hearts and segments unseen ones, its augmentation moves
labels with images, Dice formulas, and parameters survive a save/load round trip."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from cardiac_jax import segmenter, structures
from tests.test_factors import draw_heart

SIZE = 32
CONFIG = segmenter.SegmenterConfig(channels=(8, 16), learning_rate=3e-3)


def random_hearts(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(count, S, S, 1) images and (count, S, S, 1) labels of hearts of random size, wall,
  rotation and position."""
  rng = np.random.default_rng(seed)
  images, labels = [], []
  for _ in range(count):
    lab, img = draw_heart(lv_radius=rng.uniform(3.0, 6.0), wall=rng.uniform(1.5, 3.0),
                          rv_radius=rng.uniform(2.5, 4.0), angle_deg=rng.uniform(-180, 180),
                          centre=tuple(rng.uniform(13.0, 18.0, 2)), size=SIZE,
                          lv_intensity=rng.uniform(0.8, 1.0))
    images.append(img[..., None].astype(np.float32))
    labels.append(lab[..., None])
  return np.stack(images), np.stack(labels)


def batches(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int):
  rng = np.random.default_rng(seed)
  while True:
    index = rng.choice(len(images), batch_size, replace=False)
    yield {"image": images[index], "label": labels[index]}


@pytest.fixture(scope="module")
def trained():
  images, labels = random_hearts(48, seed=0)
  logged = []
  params = segmenter.train_segmenter(batches(images, labels, 8, seed=1), 150, 0, CONFIG,
                                     log_every=50, log=lambda s, m: logged.append((s, m)))
  return params, logged


def test_segmenter_segments_unseen_hearts(trained):
  params, logged = trained
  assert [s for s, _ in logged] == [50, 100, 150]
  assert logged[-1][1]["loss"] < logged[0][1]["loss"]
  images, labels = random_hearts(16, seed=7)
  predicted = segmenter.segment(params, images, CONFIG)
  assert predicted.shape == (16, SIZE, SIZE) and predicted.dtype == np.uint8
  dice = segmenter.dice_scores(predicted, labels[..., 0])
  assert dice["rv"] > 0.85 and dice["myo"] > 0.75 and dice["lv"] > 0.85, dice
  # (B, S, S) and (B, S, S, 1) inputs, and chunking with a padded last chunk, agree.
  np.testing.assert_array_equal(segmenter.segment(params, images[..., 0], CONFIG, batch_size=5),
                                predicted)


def test_save_and_load_round_trip(trained, tmp_path):
  params, _ = trained
  directory = str(tmp_path / "seg")
  segmenter.save_segmenter(directory, params, CONFIG, {"image_size": SIZE, "dice": 0.9})
  loaded, config, meta = segmenter.load_segmenter(directory)
  assert config == CONFIG and meta == {"image_size": SIZE, "dice": 0.9}
  images, _ = random_hearts(4, seed=3)
  np.testing.assert_array_equal(segmenter.segment(loaded, images, config),
                                segmenter.segment(params, images, CONFIG))
  with open(os.path.join(directory, segmenter.META_FILE)) as f:
    assert json.load(f)["config"]["channels"] == [8, 16]
  with pytest.raises(FileNotFoundError, match="no saved segmenter"):
    segmenter.load_segmenter(str(tmp_path / "empty"))


def test_augmentation_moves_the_labels_with_the_images():
  labels = np.stack([draw_heart(angle_deg=40.0, size=SIZE, lv_radius=5.0, wall=2.0,
                                rv_radius=3.0, centre=(12.0, 18.0))[0]] * 2)
  levels = np.array([0.0, 0.6, 0.3, 0.9], np.float32)
  images = levels[labels][..., None]
  for dihedral in ([True, False, False], [False, True, True], [True, True, False]):
    augmentation = {"dihedral": np.array(dihedral), "scale": np.array([1.0, 0.5], np.float32),
                    "noise": np.zeros(images.shape, np.float32)}
    out_images, out_labels = segmenter.augment_batch(jnp.asarray(images), jnp.asarray(labels),
                                                     augmentation)
    out_images, out_labels = np.asarray(out_images), np.asarray(out_labels)
    assert not np.array_equal(out_labels[0], labels[0])  # The heart moved...
    np.testing.assert_allclose(out_images[0, ..., 0], levels[out_labels[0]])  # ...with labels.
    np.testing.assert_allclose(out_images[1, ..., 0], 0.5 * levels[out_labels[1]], rtol=1e-6)
    assert sorted(np.bincount(out_labels[0].ravel(), minlength=4)) == sorted(
        np.bincount(labels[0].ravel(), minlength=4))
  config = segmenter.SegmenterConfig(intensity_jitter=0.2, noise_std=0.05)
  drawn = segmenter.draw_augmentation(np.random.default_rng(0), 64, SIZE, config)
  assert drawn["scale"].min() >= 0.8 and drawn["scale"].max() <= 1.2
  assert abs(drawn["noise"].std() - 0.05) < 0.005


def test_dice_scores_and_errors():
  target = np.zeros((2, 4, 4), np.uint8)
  target[:, :2, :2] = structures.LV_BLOOD_POOL
  predicted = target.copy()
  predicted[0, 0, 0] = 0
  dice = segmenter.dice_scores(predicted, target)
  assert dice["lv"] == pytest.approx(2 * 7 / (7 + 8))
  assert np.isnan(dice["rv"]) and np.isnan(dice["myo"])
  assert dice["mean"] == dice["lv"]
  with pytest.raises(ValueError, match="differ"):
    segmenter.dice_scores(predicted[0], target)
  with pytest.raises(ValueError, match="divisible by 4"):
    segmenter.init_params(segmenter.SegmenterConfig(), 0, 30)
  with pytest.raises(ValueError, match=r"\(B, S, S\)"):
    segmenter.segment({}, np.zeros((2, 8, 8, 3)))
  with pytest.raises(ValueError, match="'image' and 'label'"):
    segmenter.image_label_pair({"image": np.zeros((1, 8, 8, 1))})
  with pytest.raises(ValueError, match="at least one"):
    segmenter.train_segmenter(iter([]), 0, 0)
