"""Preview figures of a written cohort and the LV volume curve measured from its labels.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import nibabel as nib
import numpy as np

from cardiac_jax import cardiac
from cardiac_jax import structures
from data_pipelines.synthetic.layout import (PARAMETERS_CSV, PARTITION, long_axis_files,
                                             read_parameters_csv)
from data_pipelines.synthetic.parameters import SubjectParameters


def lv_volume_curve_from_labels(labels: np.ndarray, spacing_mm) -> np.ndarray:
  """(T,) LV blood-pool volume in ml of a (X, Y, Z, T) label map."""
  voxel_ml = cardiac.voxel_volume_ml(spacing_mm)
  return np.count_nonzero(labels == structures.LV_BLOOD_POOL, axis=(0, 1, 2)) * voxel_ml


def _pyplot():
  """matplotlib's pyplot on the file-only Agg backend (previews are written, never shown)."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  return plt


def _one_subject_per_group(output_dir: str, subjects: Optional[Sequence[SubjectParameters]],
                           ) -> list[SubjectParameters]:
  """The first subject of each group, in order; `subjects` None: the cohort's parameters CSV."""
  if subjects is None:
    subjects = read_parameters_csv(os.path.join(output_dir, PARAMETERS_CSV))
  shown, seen = [], set()
  for params in subjects:
    if params.group not in seen:
      shown.append(params)
      seen.add(params.group)
  return shown


def _save(figure, png_path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
  figure.savefig(png_path, bbox_inches="tight")
  _pyplot().close(figure)


def save_cohort_preview(output_dir: str, png_path: str,
                        subjects: Optional[Sequence[SubjectParameters]] = None,
                        num_slices_shown: int = 6) -> None:
  """Montage of one subject per group read back from the written files.

  Per subject: ED and ES mid-ventricular slices, the same with label overlays, ED slices from
  base to apex, and the LV volume curve measured from the labels of every frame (ED, ES marked).
  """
  plt = _pyplot()
  from matplotlib import colors

  shown = _one_subject_per_group(output_dir, subjects)
  columns = 4 + num_slices_shown + 1
  figure = plt.figure(figsize=(1.6 * columns + 1.2, 1.75 * len(shown)), dpi=110)
  grid = figure.add_gridspec(len(shown), columns, width_ratios=[1] * (columns - 1) + [1.9],
                             wspace=0.05, hspace=0.12)
  overlay = colors.ListedColormap([(0, 0, 0, 0), (0.2, 0.5, 1.0, 0.45), (0.1, 0.9, 0.2, 0.45),
                                   (1.0, 0.2, 0.2, 0.45)])
  for row, params in enumerate(shown):
    directory = os.path.join(output_dir, PARTITION, params.subject)
    cine = nib.load(os.path.join(directory, f"{params.subject}_4d.nii.gz"))
    image = np.asarray(cine.dataobj, dtype=np.float32)
    labels = np.asarray(nib.load(os.path.join(directory, f"{params.subject}_4d_gt.nii.gz")
                                 ).dataobj, dtype=np.uint8)
    spacing = cine.header.get_zooms()[:3]
    ed, es = params.ed_frame - 1, params.es_frame - 1
    lv_area = np.count_nonzero(labels[..., ed] == structures.LV_BLOOD_POOL, axis=(0, 1))
    mid = int(np.flatnonzero(lv_area)[len(np.flatnonzero(lv_area)) // 2])
    # Crop around the heart for the mid-slice panels.
    heart = np.argwhere(labels[:, :, mid, ed] > 0)
    centre = heart.mean(axis=0).astype(int)
    half = int(75 / spacing[0])
    window = (slice(max(centre[0] - half, 0), centre[0] + half),
              slice(max(centre[1] - half, 0), centre[1] + half))
    vmax = np.percentile(image[..., mid, ed], 99.5)
    panels = [(image[..., mid, ed], None, "ED"), (image[..., mid, es], None, "ES"),
              (image[..., mid, ed], labels[..., mid, ed], "ED labels"),
              (image[..., mid, es], labels[..., mid, es], "ES labels")]
    for col, (picture, label_map, title) in enumerate(panels):
      axes = figure.add_subplot(grid[row, col])
      axes.imshow(picture[window].T, cmap="gray", vmin=0, vmax=vmax)
      if label_map is not None:
        axes.imshow(label_map[window].T, cmap=overlay, vmin=0, vmax=3, interpolation="nearest")
      axes.set_xticks([])
      axes.set_yticks([])
      if row == 0:
        axes.set_title(title, fontsize=8)
      if col == 0:
        axes.set_ylabel(f"{params.subject}\n{params.group}", fontsize=8)
    levels = np.linspace(0, params.nz - 1, num_slices_shown).round().astype(int)
    for j, k in enumerate(levels):
      axes = figure.add_subplot(grid[row, 4 + j])
      axes.imshow(image[..., k, ed].T, cmap="gray", vmin=0, vmax=vmax)
      axes.set_xticks([])
      axes.set_yticks([])
      axes.set_xlabel(f"z{k}", fontsize=6, labelpad=1)
      if row == 0 and j == 0:
        axes.set_title("ED, base -> apex", fontsize=8, loc="left")
    axes = figure.add_subplot(grid[row, columns - 1])
    volumes = lv_volume_curve_from_labels(labels, spacing)
    frames = np.arange(1, params.nb_frame + 1)
    axes.plot(frames, volumes, "k.-", lw=1, ms=3, label="measured")
    axes.plot(frames, params.lv_volume_curve_ml(), color="tab:orange", lw=0.8, label="target")
    axes.axvline(params.ed_frame, color="tab:blue", lw=0.8)
    axes.axvline(params.es_frame, color="tab:red", lw=0.8)
    axes.tick_params(labelsize=6)
    axes.set_ylabel("LV ml", fontsize=7, labelpad=1)
    axes.yaxis.set_label_position("right")
    axes.yaxis.tick_right()
    axes.text(0.02, 0.04, f"EF {params.lv_ef_percent:.0f}%  ED {params.ed_frame} "
              f"ES {params.es_frame}", transform=axes.transAxes, fontsize=6)
    if row == 0:
      axes.set_title("LV volume", fontsize=8)
      axes.legend(fontsize=5, loc="upper right", frameon=False)
    if row == len(shown) - 1:
      axes.set_xlabel("frame", fontsize=7)
  _save(figure, png_path)


def save_long_axis_preview(output_dir: str, png_path: str,
                           subjects: Optional[Sequence[SubjectParameters]] = None,
                           num_frames_shown: int = 6) -> None:
  """Strip of 4-chamber frames from ED to ES, one subject per group, read from the files.

  Per subject: `num_frames_shown` frames evenly spaced from ED to ES (valve plane drawn as a
  line through the ED and current mitral-annulus level), then the ED and ES labels.
  """
  plt = _pyplot()
  from matplotlib import colors

  shown = _one_subject_per_group(output_dir, subjects)
  columns = num_frames_shown + 2
  figure, axes = plt.subplots(len(shown), columns, figsize=(1.7 * columns, 1.8 * len(shown)),
                              dpi=110, squeeze=False)
  overlay = colors.ListedColormap([(0, 0, 0, 0), (0.2, 0.5, 1.0, 0.5), (0.1, 0.9, 0.2, 0.5),
                                   (1.0, 0.2, 0.2, 0.5), (1.0, 0.65, 0.0, 0.5),
                                   (0.9, 0.2, 0.9, 0.5)])
  for row, params in enumerate(shown):
    directory = os.path.join(output_dir, PARTITION, params.subject)
    image_name, labels_name = long_axis_files(params)
    image = np.asarray(nib.load(os.path.join(directory, image_name)).dataobj,
                       dtype=np.float32)[:, :, 0]
    labels = np.asarray(nib.load(os.path.join(directory, labels_name)).dataobj,
                        dtype=np.uint8)[:, :, 0]
    ed, es = params.ed_frame - 1, params.es_frame - 1
    heart = np.argwhere(labels[..., ed] > 0)
    centre = ((heart.min(axis=0) + heart.max(axis=0)) // 2).astype(int)
    half = int(0.55 * (heart.max(axis=0) - heart.min(axis=0)).max()) + 4
    window = (slice(max(centre[0] - half, 0), centre[0] + half),
              slice(max(centre[1] - half, 0), centre[1] + half))
    vmax = np.percentile(image[..., ed][window], 99.5)
    frames = np.linspace(ed, es, num_frames_shown).round().astype(int)
    for col, frame in enumerate(frames):
      ax = axes[row, col]
      ax.imshow(image[..., frame][window].T, cmap="gray", vmin=0, vmax=vmax)
      phase = "ED" if frame == ed else "ES" if frame == es else f"frame {frame + 1}"
      if row == 0 or frame in (ed, es):
        ax.set_title(phase, fontsize=7, pad=2)
    for col, frame in ((num_frames_shown, ed), (num_frames_shown + 1, es)):
      ax = axes[row, col]
      ax.imshow(image[..., frame][window].T, cmap="gray", vmin=0, vmax=vmax)
      ax.imshow(labels[..., frame][window].T, cmap=overlay, vmin=0, vmax=5,
                interpolation="nearest")
      ax.set_title(f"{'ED' if frame == ed else 'ES'} labels", fontsize=7, pad=2)
    axes[row, 0].set_ylabel(f"{params.subject}\n{params.group}", fontsize=7)
    for ax in axes[row]:
      ax.set_xticks([])
      ax.set_yticks([])
  figure.suptitle("Synthetic 4-chamber cine, ED -> ES (labels: RV blue, LV myo green, LV red, "
                  "LA orange, RA magenta)", fontsize=8, y=0.995)
  figure.tight_layout(pad=0.3, rect=(0.0, 0.0, 1.0, 0.975))
  _save(figure, png_path)
