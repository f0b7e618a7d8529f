"""Figures of the papers: image grids, reconstructions, samples, latent traversals, attribute
scatter plots, cine GIFs and segmentation overlays.

Every `save_*` function writes one PNG (or GIF) to the given path, creating parent
directories, and returns the path. Figures are drawn on `matplotlib.figure.Figure` objects
rendered by the Agg canvas, never through pyplot: importing this module on a headless cluster
node needs no display and does not change the matplotlib backend of the calling process.

Image grids have a deterministic size: each cell is `cell_inches` wide and tall and the margins
depend only on the titles, so a grid with twice the columns is (almost exactly) twice as wide.
Images are (H, W) grey levels shown with `cmap` between `vmin` and `vmax`, or (H, W, 3) RGB in
[0, 1] (e.g. from `overlay_labels`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from scipy import stats

from cardiac_jax import structures

_DPI = 100
_CELL_INCHES = 1.4
_GAP_INCHES = 0.04
_EDGE_INCHES = 0.08
_TITLE_INCHES = 0.3
_COL_TITLE_INCHES = 0.26
# Approximate width of one character of 9 pt text, used to size the row-title margin.
_CHAR_INCHES = 0.075
_TITLE_FONTSIZE = 11
_LABEL_FONTSIZE = 9

# Overlay colours of the canonical structures (structures.py label convention).
_LABEL_COLOURS = {
    structures.RV_BLOOD_POOL: (0.0, 0.35, 1.0),   # blue
    structures.LV_MYOCARDIUM: (0.0, 0.85, 0.0),   # green
    structures.LV_BLOOD_POOL: (1.0, 0.0, 0.0),    # red
}


def _prepare_path(path: str | os.PathLike) -> str:
  path = os.fspath(path)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  return path


def _check_image(image: np.ndarray, where: str) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 3)):
    raise ValueError(f"{where}: expected an (H, W) or (H, W, 3) image, got shape {image.shape}")
  return image


def _grid_figure(num_rows: int, num_cols: int, row_titles: Sequence[str] | None,
                 col_titles: Sequence[str] | None, title: str | None,
                 cell_inches: float) -> tuple[Figure, list[list]]:
  """A figure of num_rows x num_cols square image axes with room for the titles."""
  left = _EDGE_INCHES
  if row_titles is not None:
    left += 0.12 + _CHAR_INCHES * max((len(str(t)) for t in row_titles), default=0)
  top = _EDGE_INCHES + (_COL_TITLE_INCHES if col_titles is not None else 0.0)
  top += _TITLE_INCHES if title else 0.0
  width = left + num_cols * cell_inches + (num_cols - 1) * _GAP_INCHES + _EDGE_INCHES
  height = top + num_rows * cell_inches + (num_rows - 1) * _GAP_INCHES + _EDGE_INCHES
  fig = Figure(figsize=(width, height), dpi=_DPI)
  axes = []
  for r in range(num_rows):
    row = []
    for c in range(num_cols):
      x0 = left + c * (cell_inches + _GAP_INCHES)
      y0 = height - top - (r + 1) * cell_inches - r * _GAP_INCHES
      ax = fig.add_axes((x0 / width, y0 / height, cell_inches / width, cell_inches / height))
      ax.set_xticks([])
      ax.set_yticks([])
      for spine in ax.spines.values():
        spine.set_visible(False)
      row.append(ax)
    axes.append(row)
  if row_titles is not None:
    for r, text in enumerate(row_titles):
      axes[r][0].set_ylabel(str(text), rotation=0, ha="right", va="center",
                            fontsize=_LABEL_FONTSIZE, labelpad=6)
  if col_titles is not None:
    for c, text in enumerate(col_titles):
      axes[0][c].set_title(str(text), fontsize=_LABEL_FONTSIZE, pad=3)
  if title:
    fig.suptitle(title, fontsize=_TITLE_FONTSIZE, y=1.0 - (_EDGE_INCHES + 0.05) / height,
                 va="top")
  return fig, axes


def save_image_grid(path: str | os.PathLike, images, row_titles: Sequence[str] | None = None,
                    col_titles: Sequence[str] | None = None, cmap: str = "gray",
                    vmin: float = 0.0, vmax: float = 1.0, title: str | None = None,
                    cell_inches: float = _CELL_INCHES) -> str:
  """Saves a grid of images as a PNG.

  Args:
    path: output file.
    images: (R, C, H, W) or (R, C, H, W, 3) array, or a list of R rows, each a list of (H, W)
      or (H, W, 3) images (rows may differ in length; None leaves a cell blank).
    row_titles: R labels written left of the rows.
    col_titles: labels written above the columns (as many as the longest row).
    cmap, vmin, vmax: colour mapping of grey-level images.
    title: figure title.
    cell_inches: side of one image cell.

  Returns:
    The path written.
  """
  rows = [list(row) for row in images]
  if not rows or max(len(row) for row in rows) == 0:
    raise ValueError(f"save_image_grid({path!r}): no images to draw")
  num_rows, num_cols = len(rows), max(len(row) for row in rows)
  if row_titles is not None and len(row_titles) != num_rows:
    raise ValueError(f"save_image_grid({path!r}): {len(row_titles)} row titles for "
                     f"{num_rows} rows")
  if col_titles is not None and len(col_titles) != num_cols:
    raise ValueError(f"save_image_grid({path!r}): {len(col_titles)} column titles for "
                     f"{num_cols} columns")
  fig, axes = _grid_figure(num_rows, num_cols, row_titles, col_titles, title, cell_inches)
  for r, row in enumerate(rows):
    for c in range(num_cols):
      image = row[c] if c < len(row) else None
      if image is None:
        continue
      image = _check_image(image, f"save_image_grid({path!r}) row {r} column {c}")
      if image.ndim == 2:
        axes[r][c].imshow(image, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
      else:
        axes[r][c].imshow(np.clip(image, 0.0, 1.0), interpolation="nearest")
  path = _prepare_path(path)
  fig.savefig(path, dpi=_DPI)
  return path


def _check_batch(images, name: str, path: str) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"{path!r}: {name} must be (B, H, W, C), got shape {images.shape}")
  return images


def _channel_names(channel_names: Sequence[str] | None, num_channels: int,
                   path: str) -> list[str]:
  if channel_names is None:
    return [f"ch{c}" for c in range(num_channels)] if num_channels > 1 else [""]
  if len(channel_names) != num_channels:
    raise ValueError(f"{path!r}: {len(channel_names)} channel names for {num_channels} "
                     f"channels")
  return [str(name) for name in channel_names]


def save_reconstruction_figure(path: str | os.PathLike, inputs, reconstructions,
                               max_items: int = 8,
                               channel_names: Sequence[str] | None = None,
                               title: str | None = None) -> str:
  """Inputs above their reconstructions, one column per subject.

  Args:
    path: output PNG.
    inputs: (B, H, W, C) images in [0, 1].
    reconstructions: (B, H, W, C) decoded images.
    max_items: at most this many subjects (the first ones) are shown.
    channel_names: C names such as ("ED", "ES") used in the row titles.
    title: figure title.

  Returns:
    The path written. Rows: for each channel, "input" then "reconstruction".
  """
  inputs = _check_batch(inputs, "inputs", str(path))
  reconstructions = _check_batch(reconstructions, "reconstructions", str(path))
  if inputs.shape != reconstructions.shape:
    raise ValueError(f"{str(path)!r}: inputs {inputs.shape} and reconstructions "
                     f"{reconstructions.shape} differ in shape")
  count = min(max_items, inputs.shape[0])
  names = _channel_names(channel_names, inputs.shape[-1], str(path))
  rows, row_titles = [], []
  for c, name in enumerate(names):
    for label, batch in (("input", inputs), ("reconstruction", reconstructions)):
      rows.append([batch[i, :, :, c] for i in range(count)])
      row_titles.append(f"{label} {name}".strip())
  return save_image_grid(path, rows, row_titles=row_titles,
                         col_titles=[f"#{i}" for i in range(count)], title=title)


def save_samples_figure(path: str | os.PathLike, samples, max_items: int = 16,
                        channel_names: Sequence[str] | None = None,
                        title: str | None = None) -> str:
  """Decoded prior samples.

  Args:
    path: output PNG.
    samples: (B, H, W, C) images in [0, 1].
    max_items: at most this many samples are shown.
    channel_names: C names used as row titles when C > 1.
    title: figure title.

  Returns:
    The path written. Single-channel samples fill a near-square grid; multi-channel samples
    are columns with one row per channel (so ED and ES of one sample stay aligned).
  """
  samples = _check_batch(samples, "samples", str(path))
  count = min(max_items, samples.shape[0])
  num_channels = samples.shape[-1]
  if num_channels == 1:
    num_cols = math.ceil(math.sqrt(count))
    rows = [[samples[i, :, :, 0] for i in range(start, min(start + num_cols, count))]
            for start in range(0, count, num_cols)]
    return save_image_grid(path, rows, title=title)
  names = _channel_names(channel_names, num_channels, str(path))
  rows = [[samples[i, :, :, c] for i in range(count)] for c in range(num_channels)]
  return save_image_grid(path, rows, row_titles=names, title=title)


def save_traversal_grid(path: str | os.PathLike, images, dim_labels: Sequence[str],
                        step_values: Sequence[float], title: str | None = None,
                        cmap: str = "gray", vmin: float = 0.0, vmax: float = 1.0) -> str:
  """Latent traversals: one row per regularised dimension, one column per latent value.

  Args:
    path: output PNG.
    images: (num_dims, num_steps, H, W) decoded images (or (..., H, W, 3) RGB).
    dim_labels: num_dims row labels, e.g. "z0 lv_edv_ml".
    step_values: num_steps latent values (or offsets in sigma) written above the columns.
    title, cmap, vmin, vmax: as in `save_image_grid`.

  Returns:
    The path written.
  """
  images = np.asarray(images)
  if images.ndim not in (4, 5):
    raise ValueError(f"{str(path)!r}: traversal images must be (num_dims, num_steps, H, W), "
                     f"got shape {images.shape}")
  if len(dim_labels) != images.shape[0] or len(step_values) != images.shape[1]:
    raise ValueError(f"{str(path)!r}: {len(dim_labels)} dim labels and {len(step_values)} "
                     f"step values for traversal images of shape {images.shape}")
  return save_image_grid(path, images, row_titles=dim_labels,
                         col_titles=[f"{float(v):+.3g}" for v in step_values], cmap=cmap,
                         vmin=vmin, vmax=vmax, title=title)


def _check_pairs(latents, attribute, path: str) -> tuple[np.ndarray, np.ndarray]:
  latents = np.asarray(latents, dtype=np.float64)
  attribute = np.asarray(attribute, dtype=np.float64)
  if latents.shape != attribute.shape:
    raise ValueError(f"{path!r}: latents {latents.shape} and attributes {attribute.shape} "
                     f"differ in shape")
  if latents.shape[0] < 3:
    raise ValueError(f"{path!r}: a scatter with correlations needs at least 3 points, got "
                     f"{latents.shape[0]}")
  return latents, attribute


def _correlation_title(x: np.ndarray, y: np.ndarray) -> str:
  if np.ptp(x) == 0 or np.ptp(y) == 0:
    return "constant input: no correlation"
  rho = stats.spearmanr(x, y).statistic
  r = stats.pearsonr(x, y).statistic
  return f"Spearman \u03c1 = {rho:.3f}, Pearson r = {r:.3f}"


def _draw_scatter(ax, x: np.ndarray, y: np.ndarray, xlabel: str, ylabel: str) -> None:
  ax.scatter(x, y, s=8, alpha=0.6, linewidths=0)
  ax.set_xlabel(xlabel, fontsize=_LABEL_FONTSIZE)
  ax.set_ylabel(ylabel, fontsize=_LABEL_FONTSIZE)
  ax.set_title(_correlation_title(x, y), fontsize=_LABEL_FONTSIZE)
  ax.tick_params(labelsize=8)


def save_attribute_scatter(path: str | os.PathLike, latents, attribute, xlabel: str,
                           ylabel: str) -> str:
  """Scatter of one latent dimension against one attribute, correlations in the title.

  Args:
    path: output PNG.
    latents: (N,) values of one latent dimension.
    attribute: (N,) attribute values.
    xlabel, ylabel: axis labels, e.g. "z0" and "lv_edv_ml".

  Returns:
    The path written.
  """
  x, y = _check_pairs(latents, attribute, str(path))
  if x.ndim != 1:
    raise ValueError(f"{str(path)!r}: expected (N,) latents, got shape {x.shape}; use "
                     f"save_attribute_scatter_grid for several dimensions")
  fig = Figure(figsize=(4.2, 3.6), dpi=_DPI, layout="constrained")
  _draw_scatter(fig.add_subplot(), x, y, xlabel, ylabel)
  path = _prepare_path(path)
  fig.savefig(path, dpi=_DPI)
  return path


def save_attribute_scatter_grid(path: str | os.PathLike, latents, attributes,
                                xlabels: Sequence[str], ylabels: Sequence[str],
                                num_cols: int = 3, title: str | None = None) -> str:
  """Several latent-vs-attribute scatters, panel k = latents[:, k] vs attributes[:, k].

  Args:
    path: output PNG.
    latents: (N, K) latent values, e.g. the K regularised dimensions.
    attributes: (N, K) attribute values, column k paired with latent column k.
    xlabels, ylabels: K axis labels.
    num_cols: panels per row.
    title: figure title.

  Returns:
    The path written.
  """
  x, y = _check_pairs(latents, attributes, str(path))
  if x.ndim != 2:
    raise ValueError(f"{str(path)!r}: expected (N, K) latents, got shape {x.shape}")
  num_panels = x.shape[1]
  if len(xlabels) != num_panels or len(ylabels) != num_panels:
    raise ValueError(f"{str(path)!r}: {len(xlabels)} x labels and {len(ylabels)} y labels "
                     f"for {num_panels} panels")
  num_cols = max(1, min(num_cols, num_panels))
  num_rows = math.ceil(num_panels / num_cols)
  fig = Figure(figsize=(4.2 * num_cols, 3.6 * num_rows + (0.4 if title else 0.0)), dpi=_DPI,
               layout="constrained")
  for k in range(num_panels):
    ax = fig.add_subplot(num_rows, num_cols, k + 1)
    _draw_scatter(ax, x[:, k], y[:, k], str(xlabels[k]), str(ylabels[k]))
  if title:
    fig.suptitle(title, fontsize=_TITLE_FONTSIZE)
  path = _prepare_path(path)
  fig.savefig(path, dpi=_DPI)
  return path


def _to_uint8(image: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
  scaled = (np.asarray(image, dtype=np.float64) - vmin) / (vmax - vmin)
  return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def save_cine_gif(path: str | os.PathLike, frames, fps: float = 10.0, vmin: float = 0.0,
                  vmax: float = 1.0, scale: int = 1) -> str:
  """Saves a cine sequence as a looping GIF.

  Args:
    path: output GIF.
    frames: (T, H, W) grey-level frames (mapped from [vmin, vmax] to 0..255) or (T, H, W, 3)
      RGB frames in [0, 1].
    fps: frames per second (GIF stores delays in 1/100 s, so the delay is rounded).
    vmin, vmax: intensity window of grey-level frames.
    scale: integer nearest-neighbour upscaling factor (small crops are hard to see).

  Returns:
    The path written. The GIF writer merges consecutive identical frames into one longer
    frame, so a sequence with repeated frames yields fewer GIF frames than T.
  """
  frames = np.asarray(frames)
  if frames.ndim == 4 and frames.shape[-1] == 1:
    frames = frames[..., 0]
  if not (frames.ndim == 3 or (frames.ndim == 4 and frames.shape[-1] == 3)):
    raise ValueError(f"{str(path)!r}: cine frames must be (T, H, W) or (T, H, W, 3), got "
                     f"shape {frames.shape}")
  if frames.shape[0] < 1:
    raise ValueError(f"{str(path)!r}: no frames to write")
  if fps <= 0:
    raise ValueError(f"{str(path)!r}: fps must be > 0, got {fps}")
  if int(scale) < 1:
    raise ValueError(f"{str(path)!r}: scale must be a positive integer, got {scale}")
  grey = frames.ndim == 3
  pixels = _to_uint8(frames, vmin, vmax) if grey else _to_uint8(frames, 0.0, 1.0)
  if scale > 1:
    pixels = pixels.repeat(int(scale), axis=1).repeat(int(scale), axis=2)
  images = [Image.fromarray(frame) for frame in pixels]
  if not grey:
    images = [image.quantize(colors=256) for image in images]
  path = _prepare_path(path)
  images[0].save(path, format="GIF", save_all=True, append_images=images[1:],
                 duration=int(round(1000.0 / fps)), loop=0)
  return path


def overlay_labels(image, labels, alpha: float = 0.4, vmin: float = 0.0,
                   vmax: float = 1.0) -> np.ndarray:
  """Blends a canonical label map over a grey-level image.

  Args:
    image: (H, W) intensities, windowed to [vmin, vmax].
    labels: (H, W) canonical labels (structures.py): RV blood pool drawn blue, LV myocardium
      green, LV blood pool red; background left grey.
    alpha: opacity of the label colours.

  Returns:
    (H, W, 3) float RGB in [0, 1].
  """
  image = np.asarray(image, dtype=np.float64)
  labels = np.asarray(labels)
  if image.ndim != 2 or labels.shape != image.shape:
    raise ValueError(f"overlay_labels: expected (H, W) image and labels of the same shape, "
                     f"got {image.shape} and {labels.shape}")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"overlay_labels: alpha must be in [0, 1], got {alpha}")
  unknown = sorted(set(np.unique(labels).tolist()) - {structures.BACKGROUND, *_LABEL_COLOURS})
  if unknown:
    raise ValueError(f"overlay_labels: label values {unknown} are not canonical labels "
                     f"(0..{structures.NUM_LABELS - 1}); remap them with "
                     f"structures.remap_labels first")
  grey = np.clip((image - vmin) / (vmax - vmin), 0.0, 1.0)
  rgb = np.repeat(grey[..., None], 3, axis=-1)
  for value, colour in _LABEL_COLOURS.items():
    mask = labels == value
    rgb[mask] = (1.0 - alpha) * rgb[mask] + alpha * np.asarray(colour)
  return rgb


def save_curves_figure(path: str | os.PathLike,
                       panels: Sequence[tuple[str, Sequence[tuple[str, Sequence[float],
                                                                  Sequence[float]]]]]) -> str:
  """Line plots side by side: one panel per (title, [(label, steps, values), ...]), one line
  per label in the same colour across panels. Non-finite values leave gaps. A panel whose
  finite values are all positive and span more than a factor of 50 uses a log y axis (said in
  its title)."""
  if not panels:
    raise ValueError(f"{str(path)!r}: no curves to draw")
  fig = Figure(figsize=(4.6 * len(panels), 3.6), dpi=_DPI, layout="constrained")
  labels = list(dict.fromkeys(label for _, lines in panels for label, _, _ in lines))
  colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
  for i, (title, lines) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1)
    finite = np.concatenate([np.asarray(v, float)[np.isfinite(np.asarray(v, float))]
                             for _, _, v in lines] or [np.zeros(0)])
    log = finite.size > 0 and finite.min() > 0 and finite.max() / finite.min() > 50
    for label, steps, values in lines:
      values = np.asarray(values, float)
      # Markers where points are few (validation every few hundred steps; a single point).
      ax.plot(np.asarray(steps), np.where(np.isfinite(values), values, np.nan),
              color=colours[label], label=label, linewidth=1.2,
              marker="o" if len(values) < 20 else None, markersize=3)
    if log:
      ax.set_yscale("log")
    ax.set_title(title + (" (log scale)" if log else ""), fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  fig.axes[0].legend(fontsize=7)
  path = _prepare_path(path)
  fig.savefig(path, dpi=_DPI)
  return path
