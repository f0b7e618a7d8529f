"""Tests of the cine data path: the synthetic 4-chamber view and data_pipelines.cine.

One toy cohort (6 subjects with the 4-chamber view, small images, 10-12 frames) is generated and
prepared once per module; the tests read the written files and the prepared tfds dataset.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import ml_collections
import nibabel as nib
import numpy as np
import pytest

from cardiac_jax import structures
from data_pipelines import cine
from data_pipelines import prepare
from data_pipelines import synthetic
from experiments.configs import cine_data

SEED = 3
NUM_SUBJECTS = 6
RANGES = synthetic.AcquisitionRanges(image_size=(128, 144), spacing_mm=(1.6, 1.8),
                                     num_frames=(10, 12))
CINE = cine.CineConfig(num_frames=8, image_size=32, spacing_mm=3.0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("cine_raw"))
  subjects = synthetic.synthesize_cohort(root, NUM_SUBJECTS, SEED, ranges=RANGES,
                                         long_axis_4ch=True)
  return root, subjects


@pytest.fixture(scope="module")
def prepared(cohort, tmp_path_factory):
  root, _ = cohort
  out = str(tmp_path_factory.mktemp("cine_prepared") / "out")
  report = cine.prepare_cine_dataset(root, out, CINE, split_fractions=(0.5, 0.17, 0.33))
  return out, report


def _subject_dir(root, params):
  return os.path.join(root, "training", params.subject)


def _load(path):
  image = nib.load(path)
  return np.asarray(image.dataobj), image


def _long_axis(root, params):
  image_name, labels_name = synthetic.long_axis_files(params)
  image, header = _load(os.path.join(_subject_dir(root, params), image_name))
  labels, _ = _load(os.path.join(_subject_dir(root, params), labels_name))
  return image, labels, header


def _data_config(out, **overrides):
  config = ml_collections.ConfigDict()
  config.seed = 5
  fields = dict(dataset="prepared", prepared_dir=out, num_frames=CINE.num_frames,
                image_size=CINE.image_size,
                prepare=dict(image_size=CINE.image_size, spacing_mm=CINE.spacing_mm))
  config.data = cine_data.get_data_config(**{**fields, **overrides})
  config.train = ml_collections.ConfigDict({"batch_size": 4, "eval_batch_size": 4})
  return config


# ----------------------------------------------------------------------------- 4-chamber view

def test_long_axis_files_shapes_affine_and_labels(cohort):
  root, subjects = cohort
  for params in subjects:
    image, labels, header = _long_axis(root, params)
    assert header.get_data_dtype() == np.int16 and labels.dtype == np.uint8
    assert image.shape == labels.shape == (params.nx, params.ny, 1, params.nb_frame)
    zooms = header.header.get_zooms()
    np.testing.assert_allclose(zooms[:2], (params.spacing_mm,) * 2, rtol=1e-5)
    assert 6.0 <= zooms[2] <= 8.0
    np.testing.assert_allclose(zooms[3], params.frame_duration_ms, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(header.affine[:3, :3], axis=0), zooms[:3],
                               rtol=1e-5)
    values = set(np.unique(labels).tolist())
    assert values == {0, 1, 2, 3, structures.LA_BLOOD_POOL, structures.RA_BLOOD_POOL}
    # The plane holds the short-axis slice normal (the LV long axis)...
    short_affine = nib.load(os.path.join(_subject_dir(root, params),
                                         f"{params.subject}_4d.nii.gz")).affine
    normal = short_affine[:3, 2] / np.linalg.norm(short_affine[:3, 2])
    plane_normal = header.affine[:3, 2] / np.linalg.norm(header.affine[:3, 2])
    assert abs(normal @ plane_normal) < 1e-6
    # ...and cuts the LV where the short-axis stack has it: LV blood-pool centroids in
    # scanner space agree across the long axis within the axis drift of the stack.
    ed = params.ed_frame - 1
    sa_labels = np.asarray(nib.load(os.path.join(
        _subject_dir(root, params), f"{params.subject}_4d_gt.nii.gz")).dataobj)[..., ed]
    sa_centre = short_affine @ np.append(np.argwhere(sa_labels == 3).mean(axis=0), 1.0)
    la_centre = header.affine @ np.append(np.argwhere(labels[..., ed] == 3).mean(axis=0), 1.0)
    offset = (la_centre - sa_centre)[:3]
    across = offset - (offset @ normal) * normal
    assert np.linalg.norm(across) < 12.0, (params.subject, across)


def test_long_axis_is_deterministic_and_added_without_rewriting(cohort, tmp_path):
  root, subjects = cohort
  other = str(tmp_path / "later")
  synthetic.synthesize_cohort(other, 1, SEED, ranges=RANGES)
  first = subjects[0]
  short_files = [os.path.join(_subject_dir(other, first), n)
                 for n in os.listdir(_subject_dir(other, first))]
  before = {p: os.stat(p).st_mtime_ns for p in short_files}
  assert not synthetic.long_axis_is_complete(other, first)
  synthetic.synthesize_cohort(other, 1, SEED, ranges=RANGES, long_axis_4ch=True)
  assert {p: os.stat(p).st_mtime_ns for p in short_files} == before
  for a, b in zip(_long_axis(root, first)[:2], _long_axis(other, first)[:2]):
    np.testing.assert_array_equal(a, b)
  # A cohort of another seed differs.
  rng = synthetic.subject_generator(SEED + 1, 0)
  params = synthetic.sample_subject_parameters(rng, synthetic.group_of_subject(SEED + 1, 0),
                                               first.subject, 0, RANGES)
  image, _, _ = synthetic.render_long_axis_4ch(params, synthetic.long_axis_generator(SEED + 1,
                                                                                     0))
  assert image.shape != _long_axis(root, first)[0].shape or not np.array_equal(
      image, _long_axis(root, first)[0])


def test_valve_plane_descends_and_chambers_follow_the_cycle(cohort):
  root, subjects = cohort
  for params in subjects:
    _, labels, _ = _long_axis(root, params)
    labels = labels[:, :, 0]
    ed, es = params.ed_frame - 1, params.es_frame - 1
    area = {t: np.bincount(labels[..., t].ravel(), minlength=6) for t in (ed, es)}
    assert area[es][structures.LV_BLOOD_POOL] < 0.85 * area[ed][structures.LV_BLOOD_POOL]
    assert area[es][structures.LA_BLOOD_POOL] > area[ed][structures.LA_BLOOD_POOL]
    assert area[es][structures.RA_BLOOD_POOL] > area[ed][structures.RA_BLOOD_POOL]
    # Valve plane: LV blood pixels next to LA blood; apex: the LV myocardium pixel farthest
    # from it at ED (fixed). The plane moves towards the apex by the base descent.
    def valve(t):
      la = labels[..., t] == structures.LA_BLOOD_POOL
      near = np.zeros_like(la)
      near[1:] |= la[:-1]
      near[:-1] |= la[1:]
      near[:, 1:] |= la[:, :-1]
      near[:, :-1] |= la[:, 1:]
      return np.argwhere(near & (labels[..., t] == structures.LV_BLOOD_POOL)).mean(axis=0)

    myo = np.argwhere(labels[..., ed] == structures.LV_MYOCARDIUM)
    apex = myo[np.argmax(np.linalg.norm(myo - valve(ed), axis=1))]
    length = {t: np.linalg.norm(valve(t) - apex) * params.spacing_mm for t in (ed, es)}
    descent = length[ed] - length[es]
    assert 0.5 * params.base_descent_mm < descent < 1.6 * params.base_descent_mm + 3.0, (
        params.subject, descent, params.base_descent_mm)


# ----------------------------------------------------------------------------- preprocessing

def test_resample_time_starts_at_ed_and_wraps():
  series = np.arange(10, dtype=np.float32)[None, :] * np.ones((2, 1), np.float32)
  out = cine.resample_time(series, ed_frame=3, num_frames=4)
  # Source positions 3, 5.5, 8 and 10.5, which wraps to 0.5 (between the last cycle's end and
  # frame 1).
  np.testing.assert_allclose(out[0], [3.0, 5.5, 8.0, 0.5])
  nearest = cine.resample_time(series.astype(np.uint8), ed_frame=3, num_frames=4, nearest=True)
  np.testing.assert_array_equal(nearest[0], [3, 6, 8, 0])
  assert nearest.dtype == np.uint8


def test_prepared_fields_shapes_dtypes_ranges(cohort, prepared):
  root, subjects = cohort
  out, report = prepared
  assert report["counts"] == {"found": 6, "prepared": 6, "skipped": 0, "train": 3, "val": 1,
                              "test": 2}
  by_name = {p.subject: p for p in subjects}
  t, s = CINE.num_frames, CINE.image_size
  seen = 0
  for split in ("train", "val", "test"):
    source = prepare.load_split(out, split)
    for i in range(len(source)):
      ex = source[i]
      params = by_name[ex["subject"].decode() if isinstance(ex["subject"], bytes)
                       else ex["subject"]]
      seen += 1
      # Images are stored as float16 (half-size records), labels as uint8.
      assert ex["sa_image"].shape == (t, s, s, 3) and ex["sa_image"].dtype == np.float16
      assert ex["sa_label"].shape == (t, s, s, 3) and ex["sa_label"].dtype == np.uint8
      for name in ("la_image", "sa_mid_image"):
        assert ex[name].shape == (t, s, s, 1) and ex[name].dtype == np.float16
        assert ex[name].min() == -1.0 and ex[name].max() == 1.0
      assert 0.0 <= ex["sa_image"].min() and ex["sa_image"].max() <= 1.0
      assert ex["sa_image"].std() > 0.1
      assert set(np.unique(ex["sa_label"]).tolist()) == {0, 1, 2, 3}
      # The 4-chamber labels of the same pixels: every structure present, and the LV pool
      # brighter than its myocardium in la_image.
      assert ex["la_label"].shape == (t, s, s, 1) and ex["la_label"].dtype == np.uint8
      assert set(np.unique(ex["la_label"]).tolist()) == set(range(6))
      la, la_label = ex["la_image"].astype(np.float32), ex["la_label"]
      assert (la[la_label == structures.LV_BLOOD_POOL].mean()
              > la[la_label == structures.LV_MYOCARDIUM].mean() + 0.3)
      assert int(ex["group"]) == structures.GROUP_INDEX[params.group]
      assert float(ex["pixel_spacing_mm"]) == CINE.spacing_mm
      assert float(ex["slice_thickness_mm"]) == pytest.approx(params.slice_thickness_mm)
      # LV-centred: the ED blood-pool centroid of the middle slice is the crop centre.
      centre = np.argwhere(ex["sa_label"][0, :, :, 1] == structures.LV_BLOOD_POOL).mean(axis=0)
      np.testing.assert_allclose(centre, [(s - 1) / 2] * 2, atol=1.0)
      # LV volume: whole-stack label volume of the nearest source frame, from ED.
      raw = np.asarray(nib.load(os.path.join(_subject_dir(root, params),
                                             f"{params.subject}_4d_gt.nii.gz")).dataobj)
      volumes = synthetic.lv_volume_curve_from_labels(raw, params.voxel_spacing_mm)
      frames = np.rint(cine.resampled_frame_positions(params.nb_frame, params.ed_frame - 1,
                                                      t)).astype(int) % params.nb_frame
      np.testing.assert_allclose(ex["lv_volume_ml"], volumes[frames], rtol=1e-5)
      assert int(np.argmax(ex["lv_volume_ml"])) == 0
      assert ex["lv_volume_ml"][0] == pytest.approx(params.lv_edv_ml, rel=0.05)
      # The middle-slice LV area shrinks in systole like the volume curve.
      area = (ex["sa_label"][..., 1] == structures.LV_BLOOD_POOL).sum(axis=(1, 2))
      assert area[int(np.argmin(ex["lv_volume_ml"]))] < area[0]
  assert seen == 6
  # A record holds the arrays as raw bytes at 2 bytes per image value (float16) and 1 per label:
  # 3 + 3 + 1 + 1 + 1 values per pixel and frame, plus the small fields and the framing.
  raw = prepare.load_split(out, "train").data_source[0]
  per_pixel = 2 * 3 + 3 + 2 + 2 + 1
  assert t * s * s * per_pixel <= len(raw) <= t * s * s * per_pixel + 600
  with open(os.path.join(out, prepare.SPLITS)) as f:
    splits = json.load(f)
  assert sorted(splits["train"] + splits["val"] + splits["test"]) == sorted(by_name)


def test_long_axis_crop_is_on_the_heart(cohort):
  root, subjects = cohort
  for params in subjects[:3]:
    image, labels, _ = _long_axis(root, params)
    centre = np.array(cine.heart_crop_centre(image[:, :, 0].astype(np.float32)))
    heart = np.argwhere(labels[:, :, 0, params.ed_frame - 1] > 0)
    box_centre = (heart.min(axis=0) + heart.max(axis=0)) / 2.0
    assert np.linalg.norm(centre - box_centre) * params.spacing_mm < 16.0


# ----------------------------------------------------------------------------- batches

def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_train_batches_are_a_pure_function_of_seed_and_step(prepared):
  out, _ = prepared
  config = _data_config(out, augment=dict(max_shift_px=3, flip_prob=0.5))
  source = prepare.load_split(out, "train")
  kwargs = dict(global_batch_size=4, seed=11)
  run = _take(cine.train_batches(source, config.data, **kwargs), 3)
  resumed = _take(cine.train_batches(source, config.data, start_step=2, **kwargs), 1)
  _assert_same(run[2], resumed[0])
  assert not np.array_equal(run[0]["sa_image"], run[1]["sa_image"])
  other_seed = next(cine.train_batches(source, config.data, global_batch_size=4, seed=12))
  assert not np.array_equal(other_seed["sa_image"], run[0]["sa_image"])
  batch = run[0]
  assert batch["sa_label"].dtype == np.int32 and batch["sa_image"].shape == (4, 8, 32, 32, 3)
  assert batch["la_label"].dtype == np.int32 and batch["la_label"].shape == (4, 8, 32, 32, 1)
  for name in ("sa_image", "sa_mid_image", "la_image", "lv_volume_ml"):
    assert batch[name].dtype == np.float32, name
  assert batch["la_image"].min() >= -1.0 and batch["la_image"].max() <= 1.0
  assert batch["subject"].dtype.kind == "U" and batch["group"].dtype == np.int32


def test_process_sharding_partitions_the_global_batch(prepared):
  out, _ = prepared
  config = _data_config(out, augment=dict(max_shift_px=2, flip_prob=0.5))
  source = prepare.load_split(out, "train")
  whole = _take(cine.train_batches(source, config.data, global_batch_size=4, seed=3), 2)
  parts = [_take(cine.train_batches(source, config.data, global_batch_size=4, seed=3,
                                    process_index=p, process_count=2), 2) for p in range(2)]
  for step in range(2):
    assert parts[0][step]["sa_image"].shape[0] == 2
    joined = {k: np.concatenate([parts[0][step][k], parts[1][step][k]]) for k in whole[step]}
    _assert_same(whole[step], joined)
  with pytest.raises(ValueError, match="not divisible"):
    cine.train_batches(source, config.data, global_batch_size=4, seed=3, process_count=3)


def test_flip_and_shift_move_images_and_labels_together(prepared):
  out, _ = prepared
  source = prepare.load_split(out, "train")
  plain = next(cine.train_batches(source, _data_config(out, augment=dict(max_shift_px=0)).data,
                                  global_batch_size=4, seed=1))
  flipped = next(cine.train_batches(
      source, _data_config(out, augment=dict(max_shift_px=0, flip_prob=1.0)).data,
      global_batch_size=4, seed=1))
  np.testing.assert_array_equal(flipped["sa_label"], plain["sa_label"][:, :, :, ::-1])
  np.testing.assert_allclose(flipped["la_image"], plain["la_image"][:, :, :, ::-1], atol=1e-5)
  np.testing.assert_array_equal(flipped["la_label"], plain["la_label"][:, :, :, ::-1])
  shifted = next(cine.train_batches(source, _data_config(out, augment=dict(max_shift_px=4)).data,
                                    global_batch_size=4, seed=1))
  assert not np.array_equal(shifted["sa_label"], plain["sa_label"])
  # Labels and image still agree: the LV blood pool is brighter than the myocardium.
  lv = shifted["sa_image"][shifted["sa_label"] == structures.LV_BLOOD_POOL].mean()
  myo = shifted["sa_image"][shifted["sa_label"] == structures.LV_MYOCARDIUM].mean()
  assert lv > myo + 0.2
  # Shifted-in pixels of [-1, 1] images are -1.
  assert (shifted["la_image"] == -1.0).mean() >= (plain["la_image"] == -1.0).mean()


def test_data_source_eval_batches_and_resize(prepared):
  out, _ = prepared
  config = _data_config(out, image_size=16, eval_split="test")
  source = cine.make_data_source(config, process_index=0, process_count=1)
  batches = list(source.eval_batches())
  assert len(batches) == 1 and batches[0]["mask"].tolist() == [True, True, False, False]
  assert batches[0]["sa_image"].shape == (4, 8, 16, 16, 3)
  np.testing.assert_allclose(batches[0]["pixel_spacing_mm"][:2], 2 * CINE.spacing_mm)
  assert batches[0]["subject"][2] == ""
  train = next(source.train_batches(0))
  assert train["la_image"].shape == (4, 8, 16, 16, 1)


# ----------------------------------------------------------------------------- preparation

def test_resume_skips_finished_subjects(cohort, tmp_path, monkeypatch):
  root, _ = cohort
  out = str(tmp_path / "resumed")
  calls = []
  original = cine.prepare_subject

  def interrupted(*args, **kwargs):
    calls.append(args[0])
    if len(calls) == 4:
      raise KeyboardInterrupt
    return original(*args, **kwargs)

  monkeypatch.setattr(cine.outcomes, "prepare_subject", interrupted)
  with pytest.raises(KeyboardInterrupt):
    cine.prepare_cine_dataset(root, out, CINE)
  assert not os.path.exists(os.path.join(out, prepare.REPORT))
  calls.clear()
  monkeypatch.setattr(cine.outcomes, "prepare_subject", lambda *a, **k: (calls.append(a[0]),
                                                                         original(*a, **k))[1])
  report = cine.prepare_cine_dataset(root, out, CINE)
  assert report["resumed_subjects"] == 3 and len(calls) == 3
  assert report["counts"]["prepared"] == 6
  # Complete: a rerun does nothing.
  calls.clear()
  assert cine.prepare_cine_dataset(root, out, CINE) == report and not calls
  with pytest.raises(FileExistsError, match="different configuration"):
    cine.prepare_cine_dataset(root, out, cine.CineConfig(num_frames=6, image_size=32,
                                                         spacing_mm=3.0))


def test_broken_subjects_get_reasons_and_the_rest_is_prepared(cohort, tmp_path):
  root, subjects = cohort
  copy = str(tmp_path / "raw")
  shutil.copytree(root, copy)
  truncated = os.path.join(_subject_dir(copy, subjects[1]), f"{subjects[1].subject}_4d_gt.nii.gz")
  with open(truncated, "r+b") as f:
    f.truncate(200)
  missing_la = os.path.join(_subject_dir(copy, subjects[2]),
                            synthetic.long_axis_files(subjects[2])[0])
  os.remove(missing_la)
  bad_la_labels = os.path.join(_subject_dir(copy, subjects[3]),
                               synthetic.long_axis_files(subjects[3])[1])
  volume = nib.load(bad_la_labels)
  data = np.asarray(volume.dataobj).copy()
  data[0, 0, 0, 0] = 9
  nib.save(nib.Nifti1Image(data, volume.affine, volume.header), bad_la_labels)
  report = cine.prepare_cine_dataset(copy, str(tmp_path / "out"), CINE)
  reasons = {e["subject"]: e.get("reason") for e in report["subjects"]}
  assert report["counts"]["prepared"] == 3 and report["counts"]["skipped"] == 3
  assert truncated in reasons[subjects[1].subject]
  assert "4-chamber" in reasons[subjects[2].subject]
  assert _subject_dir(copy, subjects[2]) in reasons[subjects[2].subject]
  assert bad_la_labels in reasons[subjects[3].subject]
  assert "label values [0, 1, 2, 3, 4, 5, 9] outside 0..5" in reasons[subjects[3].subject]


# ----------------------------------------------------------------------------- UK Biobank

def _write_ukbb_subject(directory, image, affine, seg=None, la=None, la_affine=None):
  os.makedirs(directory)
  nib.save(nib.Nifti1Image(image.astype(np.int16), affine),
           os.path.join(directory, cine.UKBB_SHORT_AXIS))
  if seg is not None:
    nib.save(nib.Nifti1Image(seg.astype(np.uint8), affine),
             os.path.join(directory, cine.UKBB_SEGMENTATION))
  if la is not None:
    nib.save(nib.Nifti1Image(la.astype(np.int16), la_affine),
             os.path.join(directory, cine.UKBB_LONG_AXIS))


def test_ukbb_reader_and_preparation(cohort, tmp_path):
  root, subjects = cohort
  ukbb = tmp_path / "ukbb"
  to_ukbb = {structures.LV_BLOOD_POOL: 1, structures.LV_MYOCARDIUM: 2,
             structures.RV_BLOOD_POOL: 3, 0: 0}
  params = next(p for p in subjects if p.ed_frame == 1)
  sa, sa_image = _load(os.path.join(_subject_dir(root, params), f"{params.subject}_4d.nii.gz"))
  gt, _ = _load(os.path.join(_subject_dir(root, params), f"{params.subject}_4d_gt.nii.gz"))
  la, _, la_header = _long_axis(root, params)
  seg = np.vectorize(to_ukbb.get)(gt)
  _write_ukbb_subject(str(ukbb / "1000001"), sa, sa_image.affine, seg, la, la_header.affine)
  _write_ukbb_subject(str(ukbb / "1000002"), sa, sa_image.affine, None, la, la_header.affine)
  os.makedirs(ukbb / "1000003")
  (ukbb / "1000003" / cine.UKBB_SHORT_AXIS).write_bytes(b"not a nifti at all")
  bad_seg = seg.copy()
  bad_seg[0, 0, 0, 0] = 7
  _write_ukbb_subject(str(ukbb / "1000004"), sa, sa_image.affine, bad_seg, la,
                      la_header.affine)
  _write_ukbb_subject(str(ukbb / "1000005"), sa[..., :1], sa_image.affine)

  subject = cine.read_ukbb_cine(str(ukbb / "1000001"))
  np.testing.assert_array_equal(subject.labels, gt)
  assert subject.ed_frame == 0 and subject.es_frame == params.es_frame - 1
  assert subject.group is None and subject.long_axis.shape == la[:, :, 0].shape

  report = cine.prepare_cine_dataset(str(ukbb), str(tmp_path / "out"), CINE, dataset="ukbb")
  status = {e["subject"]: e for e in report["subjects"]}
  assert status["1000001"]["status"] == status["1000002"]["status"] == "prepared"
  assert cine.UKBB_SHORT_AXIS in status["1000003"]["reason"]
  assert "1000003" in status["1000003"]["reason"]
  assert cine.UKBB_SEGMENTATION in status["1000004"]["reason"]
  assert "7" in status["1000004"]["reason"]
  assert "single-frame" in status["1000005"]["reason"]
  examples = {}
  for split in ("train", "val", "test"):
    if report["counts"][split]:
      source = prepare.load_split(str(tmp_path / "out"), split)
      examples.update({source[i]["subject"].decode(): source[i] for i in range(len(source))})
  assert int(examples["1000001"]["group"]) == cine.UNKNOWN_GROUP
  assert np.all(np.isfinite(examples["1000001"]["lv_volume_ml"]))
  assert np.all(np.isnan(examples["1000002"]["lv_volume_ml"]))
  assert not examples["1000002"]["sa_label"].any()
  np.testing.assert_array_equal(examples["1000001"]["la_image"], examples["1000002"]["la_image"])


# ----------------------------------------------------------------------------- config

def test_config_fields_and_cache_layout(tmp_path):
  data = cine_data.get_data_config(cache_dir=str(tmp_path), synthetic=dict(num_subjects=6))
  assert data.format == "cine" and data.synthetic.seed == 0 and data.synthetic.num_subjects == 6
  for name, default in cine.config._OPTIONAL_FIELDS.items():  # pylint: disable=protected-access
    assert cine.data_field(data, name) == default, name
  with pytest.raises(KeyError, match="not a cine data field"):
    cine_data.get_data_config(max_shift=3)
  config = ml_collections.ConfigDict({"data": data})
  assert cine.synthetic_raw_dir(data) == os.path.join(str(tmp_path), "synthetic", "n6_seed0",
                                                      "raw")
  out = cine.prepared_cine_dir(config, create=False)
  assert out.startswith(os.path.join(str(tmp_path), "synthetic", "n6_seed0", "cine"))
  data.view = "sa_mid"
  data.prepare.long_axis = False
  assert cine.prepared_cine_dir(config, create=False) != out
  data.view = "la_4ch"
  with pytest.raises(ValueError, match="long_axis"):
    cine.prepared_cine_dir(config, create=False)


def test_fields_keep_only_the_requested_arrays_with_the_same_values(prepared):
  out, _ = prepared
  config = _data_config(out, augment=dict(max_shift_px=3, flip_prob=0.5))
  source = prepare.load_split(out, "train")
  kwargs = dict(global_batch_size=4, seed=5)
  full = next(cine.train_batches(source, config.data, **kwargs))
  only = next(cine.train_batches(source, config.data, fields=("sa_label",), **kwargs))
  arrays = {"sa_label", "lv_volume_ml"}
  assert arrays <= set(only) and not {"sa_image", "sa_mid_image", "la_image"} & set(only)
  for key in only:
    np.testing.assert_array_equal(only[key], full[key], err_msg=key)
  evaluation = next(cine.eval_batches(source, config.data, batch_size=4, fields=("la_image",)))
  np.testing.assert_array_equal(
      evaluation["la_image"],
      next(cine.eval_batches(source, config.data, batch_size=4))["la_image"])
  with pytest.raises(ValueError, match=r"no field \['sa_images'\]"):
    cine.train_batches(source, config.data, fields=("sa_images",), **kwargs)


def test_a_first_cine_preparation_is_announced_in_one_line(tmp_path, monkeypatch, capsys):
  """A command that prepares cines on a first run says what it prepares before the minutes it
  takes (the tfds bars are silenced), and says it with the dataset's own settings."""
  from data_pipelines import synthetic
  from data_pipelines.cine import prepared
  from experiments.configs import get_config
  calls = []
  monkeypatch.setattr(synthetic, "synthesize_cohort", lambda *args, **kwargs: None)
  monkeypatch.setattr(prepared, "prepare_cine_dataset",
                      lambda raw, out, *args, **kwargs: calls.append((out, kwargs)))
  config = get_config("diffae3d:smoke")
  config.data.cache_dir = str(tmp_path)
  out = prepared.prepared_cine_dir(config)
  printed = capsys.readouterr().out
  assert printed.startswith("Preparing the cines of ") and out in printed
  settings = prepared.cine_config_from(config.data)
  assert f"({settings.num_frames} frames, {settings.image_size} px" in printed
  assert calls == [(out, calls[0][1])] and calls[0][1]["verbose"] is True


def test_the_held_out_concept_pool_is_announced_once(tmp_path, monkeypatch, capsys):
  """TCAV's first run generates and prepares its held-out negatives for minutes: it says how
  many, of which group and seed, and where, then stays silent once they are prepared."""
  from data_pipelines import prepare, synthetic
  from data_pipelines.cine import prepared
  from experiments.configs import get_config
  calls = []
  monkeypatch.setattr(prepared, "prepared_cine_dir", lambda config, create=True: "main")
  monkeypatch.setattr(prepare, "read_report", lambda out: {
      "config": {"dataset": "synthetic", "input_dir": str(tmp_path / "raw"),
                 "cine": dataclasses.asdict(prepared.cine_config_from(config.data))},
      "subjects": [{"subject": "patient007"}]})
  monkeypatch.setattr(prepare, "is_prepared", lambda out: bool(calls))
  monkeypatch.setattr(synthetic, "synthesize_held_out_cohort", lambda *args, **kwargs: None)
  monkeypatch.setattr(prepared, "prepare_cine_dataset",
                      lambda raw, out, *args, **kwargs: calls.append(kwargs))
  config = get_config("temporal_classifier:smoke")
  config.data.cache_dir = str(tmp_path)
  out = prepared.held_out_cine_dir(config, 30)
  printed = capsys.readouterr().out
  seed = config.data.synthetic.seed
  assert printed.startswith(f"Held-out concept pool: 30 NOR subjects of seed {seed} ")
  assert out in printed and printed.count("\n") == 1
  assert calls[0]["verbose"] is True
  prepared.held_out_cine_dir(config, 30)
  assert capsys.readouterr().out == ""
