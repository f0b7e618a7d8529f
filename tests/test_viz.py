"""Tests of cardiac_jax.viz: files are written where asked, reopen as PNG/GIF, grid sizes scale
with rows and columns, overlays use the structure colours."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from cardiac_jax import structures, viz


@pytest.fixture(scope="module")
def rng():
  return np.random.default_rng(0)


def _open(path: str) -> Image.Image:
  assert os.path.isfile(path), path
  image = Image.open(path)
  image.load()
  return image


def _grid_size(tmp_path, rows: int, cols: int, **kwargs) -> tuple[int, int]:
  images = np.random.default_rng(rows * 10 + cols).random((rows, cols, 16, 16))
  path = viz.save_image_grid(tmp_path / f"grid_{rows}x{cols}.png", images, **kwargs)
  image = _open(path)
  assert image.format == "PNG"
  return image.size


def test_image_grid_size_scales_with_rows_and_columns(tmp_path):
  base_w, base_h = _grid_size(tmp_path, 2, 3)
  wide_w, wide_h = _grid_size(tmp_path, 2, 6)
  tall_w, tall_h = _grid_size(tmp_path, 4, 3)
  cell_px = (viz._CELL_INCHES + viz._GAP_INCHES) * viz._DPI
  assert wide_h == base_h and tall_w == base_w
  assert wide_w - base_w == pytest.approx(3 * cell_px, abs=2)
  assert tall_h - base_h == pytest.approx(2 * cell_px, abs=2)


def test_image_grid_titles_add_margins_and_write_nested_dirs(tmp_path):
  plain = _grid_size(tmp_path, 2, 2)
  titled = _grid_size(tmp_path / "nested" / "dir", 2, 2, row_titles=["input", "recon"],
                      col_titles=["a", "b"], title="Grid")
  assert titled[0] > plain[0] and titled[1] > plain[1]
  assert os.path.isfile(tmp_path / "nested" / "dir" / "grid_2x2.png")


def test_image_grid_draws_the_pixels(tmp_path):
  # One white image on a grid: the PNG must contain white pixels and black (image) pixels.
  images = np.zeros((1, 2, 8, 8))
  images[0, 1] = 1.0
  image = np.asarray(_open(viz.save_image_grid(tmp_path / "bw.png", images)).convert("L"))
  height, width = image.shape
  left_cell = image[height // 2, int(width * 0.25)]
  right_cell = image[height // 2, int(width * 0.75)]
  assert left_cell < 10 and right_cell > 245


def test_image_grid_accepts_ragged_rows_and_rgb(tmp_path, rng):
  rgb = viz.overlay_labels(rng.random((16, 16)), np.full((16, 16), structures.LV_BLOOD_POOL))
  path = viz.save_image_grid(tmp_path / "ragged.png",
                             [[rng.random((16, 16)), rgb, None], [rgb]],
                             row_titles=["a", "b"])
  assert _open(path).format == "PNG"


def test_image_grid_rejects_bad_titles(tmp_path, rng):
  with pytest.raises(ValueError, match="row titles"):
    viz.save_image_grid(tmp_path / "bad.png", rng.random((2, 2, 8, 8)), row_titles=["a"])
  with pytest.raises(ValueError, match="expected an"):
    viz.save_image_grid(tmp_path / "bad.png", rng.random((1, 1, 8, 8, 4)))


def test_reconstruction_figure_layout(tmp_path, rng):
  inputs = rng.random((10, 16, 16, 2))
  recon = rng.random((10, 16, 16, 2))
  path = viz.save_reconstruction_figure(tmp_path / "figs" / "rec.png", inputs, recon,
                                        max_items=4, channel_names=["ED", "ES"])
  width, height = _open(path).size
  # 4 rows (input/recon x ED/ES) by 4 subjects: same cell arithmetic as the grid.
  cell_px = (viz._CELL_INCHES + viz._GAP_INCHES) * viz._DPI
  assert height > 4 * cell_px - viz._GAP_INCHES * viz._DPI
  assert width > 4 * cell_px - viz._GAP_INCHES * viz._DPI
  assert width < 6 * cell_px
  with pytest.raises(ValueError, match="differ in shape"):
    viz.save_reconstruction_figure(tmp_path / "x.png", inputs, recon[:, :8])


def test_samples_figure_single_and_multi_channel(tmp_path, rng):
  square = _open(viz.save_samples_figure(tmp_path / "s1.png", rng.random((9, 16, 16, 1))))
  assert square.size[0] == pytest.approx(square.size[1], abs=2)  # 3 x 3 grid
  strip = _open(viz.save_samples_figure(tmp_path / "s2.png", rng.random((6, 16, 16, 2)),
                                        channel_names=["ED", "ES"]))
  assert strip.size[0] > 2.5 * strip.size[1]  # 2 rows x 6 columns


def test_traversal_grid(tmp_path, rng):
  images = rng.random((3, 7, 16, 16))
  path = viz.save_traversal_grid(tmp_path / "trav.png", images,
                                 ["z0 lv_edv_ml", "z1 myo_ed_ml", "z2 rv_edv_ml"],
                                 np.linspace(-3, 3, 7), title="Traversals")
  width, height = _open(path).size
  assert width > 7 * viz._CELL_INCHES * viz._DPI
  assert 3 * viz._CELL_INCHES * viz._DPI < height < 4 * viz._CELL_INCHES * viz._DPI
  with pytest.raises(ValueError, match="step values"):
    viz.save_traversal_grid(tmp_path / "bad.png", images, ["a", "b", "c"], [0.0, 1.0])


def test_attribute_scatter_and_grid(tmp_path, rng):
  attribute = rng.normal(150, 30, 200)
  latent = (attribute - 150) / 30 + 0.2 * rng.standard_normal(200)
  single = viz.save_attribute_scatter(tmp_path / "scatter.png", latent, attribute, "z0",
                                      "lv_edv_ml")
  assert _open(single).format == "PNG"
  assert viz._correlation_title(latent, attribute).startswith("Spearman")
  assert "0.9" in viz._correlation_title(latent, attribute)
  one_row = _open(viz.save_attribute_scatter_grid(
      tmp_path / "grid3.png", np.stack([latent] * 3, 1), np.stack([attribute] * 3, 1),
      ["z0", "z1", "z2"], ["a", "b", "c"]))
  two_rows = _open(viz.save_attribute_scatter_grid(
      tmp_path / "grid4.png", np.stack([latent] * 4, 1), np.stack([attribute] * 4, 1),
      ["z0", "z1", "z2", "z3"], ["a", "b", "c", "d"]))
  assert two_rows.size[0] == one_row.size[0]
  assert two_rows.size[1] == pytest.approx(2 * one_row.size[1], abs=2)
  with pytest.raises(ValueError, match="save_attribute_scatter_grid"):
    viz.save_attribute_scatter(tmp_path / "bad.png", np.stack([latent] * 2, 1),
                               np.stack([attribute] * 2, 1), "z", "a")


def test_cine_gif_frames_and_timing(tmp_path, rng):
  frames = rng.random((12, 20, 24))
  path = viz.save_cine_gif(tmp_path / "cine" / "subject.gif", frames, fps=10, scale=2)
  gif = _open(path)
  assert gif.format == "GIF"
  assert gif.n_frames == 12
  assert gif.size == (48, 40)
  assert gif.info["duration"] == 100
  # Grey levels survive: frame 3 decodes to the 8-bit version of the input.
  gif.seek(3)
  decoded = np.asarray(gif.convert("L"))[::2, ::2].astype(int)
  np.testing.assert_allclose(decoded, np.round(frames[3] * 255), atol=1)


def test_cine_gif_rgb_overlay_frames(tmp_path, rng):
  labels = np.zeros((16, 16), int)
  labels[4:8, 4:8] = structures.LV_BLOOD_POOL
  frames = np.stack([viz.overlay_labels(rng.random((16, 16)), np.roll(labels, t, axis=1))
                     for t in range(5)])
  gif = _open(viz.save_cine_gif(tmp_path / "overlay.gif", frames, fps=5))
  assert gif.n_frames == 5


def test_overlay_label_colours():
  image = np.full((4, 4), 0.5)
  labels = np.array([[0, 1, 2, 3]] * 4)
  rgb = viz.overlay_labels(image, labels, alpha=1.0)
  assert rgb.shape == (4, 4, 3)
  np.testing.assert_allclose(rgb[0, 0], [0.5, 0.5, 0.5])
  assert np.argmax(rgb[0, structures.RV_BLOOD_POOL]) == 2     # blue
  assert np.argmax(rgb[0, structures.LV_MYOCARDIUM]) == 1     # green
  assert np.argmax(rgb[0, structures.LV_BLOOD_POOL]) == 0     # red
  half = viz.overlay_labels(image, labels, alpha=0.5)
  np.testing.assert_allclose(half[0, 3], [0.75, 0.25, 0.25])
  with pytest.raises(ValueError, match="not canonical"):
    viz.overlay_labels(image, np.full((4, 4), 7))
