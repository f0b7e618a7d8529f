"""Property-based tests: the cine readers (UK Biobank layout) on random hostile subject folders.

A subject folder holds sa.nii.gz (short-axis cine), seg_sa.nii.gz (its labels, UK Biobank
convention) and la_4ch.nii.gz (4-chamber cine); each file is a valid phantom, a random NIfTI of
`hostile_files.nifti_files` (random shapes, voxel types, affines, fuzzed headers,
truncation), random bytes, or absent. `cine.read_ukbb_cine` and `cine.prepare_subject` must either
accept the folder and return sane output (finite float32 cine, canonical labels on the cine grid,
ED/ES inside the series, prepared fields of the documented shapes and ranges) or raise an
`InvalidInputError` that names the folder or the file; `cine.run_subject` never raises and never
records an unexpected exception. The counts join the README's reliability numbers through
`hostile_files.TRIED` when both modules run in one process.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import nibabel as nib
import numpy as np

from cardiac_jax import structures
from data_pipelines import cine
from tests.hostile_files import PROPERTY_SETTINGS
from tests.hostile_files import _call
from tests.hostile_files import draw_file
from tests.hostile_files import write_folder

FRAMES = 6
CONFIG = cine.CineConfig(num_frames=4, image_size=16, spacing_mm=4.0, long_axis=False)
CONFIG_LA = cine.CineConfig(num_frames=4, image_size=16, spacing_mm=4.0, long_axis=True)


def _phantom_series() -> dict[str, bytes]:
  """Valid sa / seg_sa / la_4ch files: an LV disc, myocardial ring and RV disc that contract
  over FRAMES frames on 4 slices (UK Biobank labels: LV 1, myocardium 2, RV 3)."""
  x, y, z = 32, 32, 4
  yy, xx = np.mgrid[:x, :y]
  seg = np.zeros((x, y, z, FRAMES), np.uint8)
  image = np.zeros((x, y, z, FRAMES), np.float32)
  for t in range(FRAMES):
    radius = 6.0 * (1 - 0.3 * np.sin(np.pi * t / FRAMES))
    for s in range(z):
      d = np.hypot(yy - 16, xx - 16)
      plane = np.zeros((x, y), np.uint8)
      plane[np.hypot(yy - 16, xx - 5) < 5.5 * (1 - 0.25 * np.sin(np.pi * t / FRAMES))] = 3
      plane[d < radius + 3] = 2
      plane[d < radius] = 1
      seg[:, :, s, t] = plane
      image[:, :, s, t] = np.choose(plane, [0.1, 0.9, 0.3, 0.8]) * 500
  affine = np.diag([2.0, 2.0, 8.0, 1.0])
  la = np.zeros((40, 36, 1, FRAMES), np.float32)
  for t in range(FRAMES):
    la[10:30 - t, 8:28, 0, t] = 400.0
    la[14:24, 12:20, 0, t] = 900.0 - 50 * t
  return {cine.UKBB_SHORT_AXIS: nib.Nifti1Image(image, affine).to_bytes(),
          cine.UKBB_SEGMENTATION: nib.Nifti1Image(seg, affine).to_bytes(),
          cine.UKBB_LONG_AXIS: nib.Nifti1Image(la, np.diag([1.8, 1.8, 6.0, 1.0])).to_bytes()}


PHANTOMS = _phantom_series()


@st.composite
def ukbb_folders(draw):
  """{file name: bytes or None (absent)}: each file valid, random, random bytes or missing."""
  return {name: draw_file(draw, PHANTOMS[name])
          for name in (cine.UKBB_SHORT_AXIS, cine.UKBB_SEGMENTATION, cine.UKBB_LONG_AXIS)}


def _check_subject(subject, directory):
  data = subject.cine
  assert data.ndim == 4 and data.dtype == np.float32 and min(data.shape) > 0, directory
  assert data.shape[3] >= 2 and np.all(np.isfinite(data)), directory
  assert all(np.isfinite(s) and s > 0 for s in subject.spacing_mm), subject.spacing_mm
  assert 0 <= subject.ed_frame < data.shape[3]
  if subject.labels is not None:
    assert subject.labels.shape == data.shape and subject.labels.dtype == np.uint8
    assert set(np.unique(subject.labels).tolist()) <= {0, 1, 2, 3}
    assert subject.es_frame is not None and 0 <= subject.es_frame < data.shape[3]
  if subject.long_axis is not None:
    assert subject.long_axis.ndim == 3 and np.all(np.isfinite(subject.long_axis))


@settings(PROPERTY_SETTINGS, max_examples=50)
@given(files=ukbb_folders(), long_axis=st.booleans())
def test_ukbb_cine_reader_and_preparation_on_random_folders(files, long_axis):
  root = tempfile.mkdtemp()
  try:
    directory = os.path.join(root, "1000001")
    write_folder(directory, files)
    subject = _call("read_ukbb_cine: random subject folders", cine.read_ukbb_cine, directory,
                    "ukbb", long_axis, path=directory)
    if subject is not None:
      _check_subject(subject, directory)
    config = CONFIG_LA if long_axis else CONFIG
    outcome = _call("cine prepare_subject: random subject folders", cine.prepare_subject,
                    directory, "ukbb", config, path=directory)
    if outcome is not None:
      assert subject is not None
      example = outcome.example
      assert example["sa_image"].shape == (4, 16, 16, 3)
      assert example["sa_label"].shape == (4, 16, 16, 3)
      assert np.all(np.isfinite(example["sa_image"]))
      # The LV volume curve is measured from seg_sa.nii.gz; without it the curve is unknown.
      volumes = example["lv_volume_ml"]
      if subject.labels is None:
        assert np.all(np.isnan(volumes)) and not example["sa_label"].any()
      else:
        assert np.all(np.isfinite(volumes)) and volumes.max() > 0
      if long_axis:
        la = example["la_image"]
        assert la.shape == (4, 16, 16, 1) and la.min() >= -1.0 and la.max() <= 1.0
    run = cine.run_subject("1000001", directory, "ukbb", config)
    assert run.status == ("prepared" if outcome is not None else "skipped")
    assert not run.unexpected, run.reason
  finally:
    shutil.rmtree(root)


def test_valid_phantom_folder_is_accepted():
  """The phantom files themselves are valid: the property above exercises both outcomes."""
  root = tempfile.mkdtemp()
  try:
    for name, content in PHANTOMS.items():
      with open(os.path.join(root, name), "wb") as f:
        f.write(gzip.compress(content))
    subject = cine.read_ukbb_cine(root)
    _check_subject(subject, root)
    assert subject.ed_frame == 0 and subject.es_frame == FRAMES // 2
    outcome = cine.prepare_subject(root, "ukbb", CONFIG_LA)
    assert outcome.example["la_image"].shape == (4, 16, 16, 1)
  finally:
    shutil.rmtree(root)
