"""Tests of preparation with Apache Beam (`--beam`): the same outputs as the default path.

A toy slice cohort (phantoms of test_acdc_reader, with refused subjects) and the shared cine
cohort of conftest are prepared once without Beam and once on the DirectRunner; every record,
report.json, attributes.csv, splits.json and the dataset's features and split sizes must be
equal byte for byte. Without apache_beam these are skipped (requirements-beam.txt); the clear
error without it is tested always.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest

from cardiac_jax import structures
from data_pipelines import beam_prepare
from data_pipelines import cine
from data_pipelines import prepare
from data_pipelines import preprocess
from data_pipelines.errors import InvalidArgumentError
from tests.conftest import tree_files
from tests.test_acdc_reader import ED_RADII_MM
from tests.test_acdc_reader import phantom_labels
from tests.test_acdc_reader import save_nifti
from tests.test_acdc_reader import write_subject

try:
  import apache_beam  # pylint: disable=unused-import
  HAS_BEAM = True
except ImportError:
  HAS_BEAM = False
needs_beam = pytest.mark.skipif(not HAS_BEAM, reason="apache_beam is not installed "
                                "(pip install -r requirements-beam.txt)")

SMALL = preprocess.PreprocessConfig(image_size=32, spacing_mm=2.0)
# Two worker processes, as on a multi-core machine; the cine run uses Beam's default (in this
# process) so that both execution modes are covered.
MULTI_PROCESSING = ("--runner=DirectRunner --direct_num_workers=2 "
                    "--direct_running_mode=multi_processing")
GROUPS = ("DCM", "HCM", "MINF", "NOR", "RV")
# Timings are the only report fields that differ between two runs of the same path.
_TIMINGS = re.compile(rb'"(seconds|seconds_per_subject)": [0-9.e+-]+')


def _slice_cohort(root: str) -> dict[str, str]:
  """Ten plausible subjects, two per group, and three refused ones; {subject: reason}."""
  for i in range(10):
    write_subject(root, f"patient{i + 1:03d}", group=GROUPS[i % 5], seed=i)
  refused = {}
  d = write_subject(root, "patient011", seed=11)
  with open(os.path.join(d, "patient011_frame01.nii.gz"), "wb") as f:
    f.write(b"\x5c\x01 not gzip " * 100)
  refused["patient011"] = "patient011_frame01.nii.gz: cannot read NIfTI, the file is not gzip"
  d = write_subject(root, "patient012", seed=12)
  labels = phantom_labels(ED_RADII_MM)
  labels[labels == structures.LV_BLOOD_POOL] = structures.LV_MYOCARDIUM
  save_nifti(os.path.join(d, "patient012_frame01_gt.nii.gz"), labels)
  refused["patient012"] = "patient012_frame01_gt.nii.gz: the ED labels have no LV blood pool"
  write_subject(root, "patient34b", seed=34)
  refused["patient34b"] = "training/patient34b: folder name is not a subject id"
  return refused


def _records(output_dir: str) -> dict[str, list[tuple[str, dict]]]:
  """{split: [(subject, decoded example)]} of a prepared dataset, in order of subject id."""
  builder = prepare.open_prepared(output_dir)
  out = {}
  for split in builder.info.splits:
    source = builder.as_data_source(split)
    examples = [source[i] for i in range(len(source))]
    out[split] = sorted(((e["subject"].decode(), e) for e in examples), key=lambda x: x[0])
  return out


def _serialized_records(output_dir: str) -> dict[str, list[bytes]]:
  """{split: [each record's tf.Example, serialised deterministically]}, in file order."""
  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import decode
  from tensorflow_datasets.proto import tf_example_pb2
  builder = prepare.open_prepared(output_dir)
  out = {}
  for split in builder.info.splits:
    raw = builder.as_data_source(split, deserialize_method=decode.DeserializeMethod.RAW_BYTES)
    out[split] = [tf_example_pb2.Example.FromString(raw[i]).SerializeToString(deterministic=True)
                  for i in range(len(raw))]
  return out


def _assert_same_preparation(default_dir: str, beam_dir: str) -> None:
  """Both prepared datasets are equal: records, report.json (but its timings), attributes.csv,
  splits.json, the dataset's features and split sizes, and every tfds file's bytes."""
  default_files, beam_files = tree_files(default_dir), tree_files(beam_dir)
  assert sorted(default_files) == sorted(beam_files)
  report = default_files.pop(prepare.REPORT)
  assert _TIMINGS.sub(b"", beam_files.pop(prepare.REPORT)) == _TIMINGS.sub(b"", report)
  info = {n: (json.loads(default_files[n]), json.loads(beam_files[n])) for n in default_files
          if n.endswith(("dataset_info.json", "features.json"))}
  for name, (default_info, beam_info) in info.items():
    if name.endswith("dataset_info.json"):
      assert beam_info["splits"] == default_info["splits"]   # names, shard lengths, bytes
    else:
      assert default_info["featuresDict"] and beam_info == default_info
  assert len(info) == 2
  # The record files hold the same records in the same order (tfds's BeamWriter shuffles by
  # the same key hash as its Writer and cuts the same shards), each the same tf.Example; their
  # bytes are not compared, since protobuf writes the map of an Example's features in an order
  # that varies from process to process (two default runs differ there too).
  records = [n for n in default_files if ".array_record-" in n]
  assert records and all(n in beam_files for n in records)
  assert ({n: v for n, v in beam_files.items() if n not in records}
          == {n: v for n, v in default_files.items() if n not in records})
  assert _serialized_records(beam_dir) == _serialized_records(default_dir)
  default_records, beam_records = _records(default_dir), _records(beam_dir)
  assert sorted(beam_records) == sorted(default_records)
  for split, examples in default_records.items():
    assert [s for s, _ in beam_records[split]] == [s for s, _ in examples]
    for (subject, expected), (_, actual) in zip(examples, beam_records[split]):
      assert sorted(actual) == sorted(expected), subject
      for name, value in expected.items():
        np.testing.assert_array_equal(np.asarray(actual[name]), np.asarray(value),
                                      err_msg=f"{split} {subject} {name}")


@contextlib.contextmanager
def _beam_calls():
  """Yields {"subjects": [number of subjects per resolve_subjects call], "splits": [number of
  subjects per examples_transform call]}: what went through Beam."""
  calls = {"subjects": [], "splits": []}
  resolve, examples = beam_prepare.resolve_subjects, beam_prepare.examples_transform

  def spy_resolve(fn, subjects, *args):
    calls["subjects"].append(len(subjects))
    return resolve(fn, subjects, *args)

  def spy_examples(subjects, read):
    calls["splits"].append(len(subjects))
    return examples(subjects, read)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(beam_prepare, "resolve_subjects", spy_resolve)
    patch.setattr(beam_prepare, "examples_transform", spy_examples)
    yield calls


@pytest.fixture(scope="module")
def slice_preparations(tmp_path_factory):
  """(raw root, refused {subject: reason}, default output, Beam output)."""
  root = str(tmp_path_factory.mktemp("beam_raw"))
  refused = _slice_cohort(root)
  default_dir = str(tmp_path_factory.mktemp("default") / "out")
  beam_dir = str(tmp_path_factory.mktemp("beam") / "out")
  prepare.prepare_dataset(root, default_dir, SMALL, verbose=False)
  with _beam_calls() as calls:
    prepare.prepare_dataset(root, beam_dir, SMALL, verbose=False, beam=True,
                            beam_options=MULTI_PROCESSING)
  # Every subject folder (not the one that is no subject id) and every split went through Beam.
  assert calls == {"subjects": [12], "splits": [7, 1, 2]}
  return root, refused, default_dir, beam_dir


@needs_beam
def test_slice_preparation_with_beam_equals_the_default(slice_preparations):
  _, _, default_dir, beam_dir = slice_preparations
  _assert_same_preparation(default_dir, beam_dir)
  report = prepare.read_report(beam_dir)
  assert report["counts"]["prepared"] == 10 and report["counts"]["skipped"] == 3
  # The work area and the scratch file of the outcomes are gone, as after the default path.
  assert sorted(os.listdir(beam_dir)) == sorted(os.listdir(default_dir))


@needs_beam
def test_beam_refuses_bad_subjects_with_the_same_reasons(slice_preparations):
  _, refused, default_dir, beam_dir = slice_preparations
  for output_dir in (default_dir, beam_dir):
    entries = {e["subject"]: e for e in prepare.read_report(output_dir)["subjects"]}
    for subject, reason in refused.items():
      assert entries[subject]["status"] == "skipped" and reason in entries[subject]["reason"]
      assert entries[subject]["subject"] not in prepare.prepared_attributes(output_dir)
  default = [e for e in prepare.read_report(default_dir)["subjects"] if e["status"] == "skipped"]
  assert [e for e in prepare.read_report(beam_dir)["subjects"]
          if e["status"] == "skipped"] == default


@needs_beam
def test_beam_rerun_follows_the_inputs_like_the_default(tmp_path):
  """A rerun after one subject changed takes the others from the dataset (on the workers, from
  the previous preparation) and ends with the default path's outputs."""
  raw = str(tmp_path / "raw")
  _slice_cohort(raw)
  outputs = {"default": str(tmp_path / "default"), "beam": str(tmp_path / "beam")}
  prepare.prepare_dataset(raw, outputs["default"], SMALL, verbose=False)
  shutil.copytree(outputs["default"], outputs["beam"])
  write_subject(raw, "patient003", group=GROUPS[2], seed=103)     # new image contents
  reports = {"default": prepare.prepare_dataset(raw, outputs["default"], SMALL, verbose=False)}
  with _beam_calls() as calls:
    reports["beam"] = prepare.prepare_dataset(raw, outputs["beam"], SMALL, verbose=False,
                                              beam=True)
  assert calls == {"subjects": [12], "splits": [7, 1, 2]}
  # The 12 subject folders but patient003 (the folder that is no subject id is not counted).
  assert reports["beam"]["unchanged_subjects"] == reports["default"]["unchanged_subjects"] == 11
  assert reports["beam"]["changes"] == reports["default"]["changes"]
  assert list(reports["beam"]["changes"]["changed"]) == ["patient003"]
  _assert_same_preparation(outputs["default"], outputs["beam"])


@needs_beam
def test_cine_preparation_with_beam_equals_the_default(cine_cohort, tmp_path):
  root, default_dir = cine_cohort
  beam_dir = str(tmp_path / "beam")
  # The configuration of conftest's `cine_cohort`.
  with _beam_calls() as calls:
    cine.prepare_cine_dataset(root, beam_dir, cine.CineConfig(num_frames=8, image_size=32,
                                                              spacing_mm=3.0),
                              split_fractions=(0.5, 0.17, 0.33), beam=True,
                              beam_options="--runner=DirectRunner")
  assert calls == {"subjects": [12], "splits": [6, 2, 4]}
  _assert_same_preparation(default_dir, beam_dir)


def test_beam_without_apache_beam_fails_in_one_line(monkeypatch, tmp_path):
  """Without apache_beam, --beam stops before anything is written, with one line saying how
  to install it; the default path does not need it."""
  root = str(tmp_path / "raw")
  write_subject(root, "patient001", seed=1)
  monkeypatch.setitem(sys.modules, "apache_beam", None)        # `import apache_beam` fails
  out = str(tmp_path / "out")
  with pytest.raises(InvalidArgumentError) as error:
    prepare.prepare_dataset(root, out, SMALL, verbose=False, beam=True)
  message = str(error.value)
  assert "\n" not in message and "pip install -r requirements-beam.txt" in message
  assert not os.path.exists(out)
  with pytest.raises(InvalidArgumentError, match="requirements-beam.txt"):
    cine.prepare_cine_dataset(root, out, beam=True)
  assert not os.path.exists(out)


def test_beam_options_without_beam_are_refused(tmp_path):
  with pytest.raises(InvalidArgumentError, match="without --beam"):
    beam_prepare.optional_options(False, "--runner=DirectRunner")
  assert beam_prepare.optional_options(False, "") is None


@needs_beam
def test_beam_options_are_parsed_like_a_command_line():
  options = beam_prepare.pipeline_options(MULTI_PROCESSING).get_all_options()
  assert options["runner"] == "DirectRunner" and options["direct_num_workers"] == 2
  assert options["direct_running_mode"] == "multi_processing"
  with pytest.raises(InvalidArgumentError, match="beam_options"):
    beam_prepare.pipeline_options('--runner="DirectRunner')


# What resolve_subjects reads of an outcome (pickled by the pipeline: a module-level class).
_Outcome = collections.namedtuple("_Outcome", "subject")


@needs_beam
def test_outcomes_must_be_one_per_subject(tmp_path):
  """The driver takes the Beam results only when every subject came back once: an outcome of a
  subject not asked for, or one subject twice and another never, is refused, not split."""
  import tensorflow_datasets as tfds
  config = tfds.download.DownloadConfig(
      beam_options=beam_prepare.pipeline_options("--runner=DirectRunner"))
  subjects = [("patient001", "a"), ("patient002", "b")]
  ok = beam_prepare.resolve_subjects(lambda s, d: (_Outcome(s), d), subjects[::-1], config,
                                     str(tmp_path))
  assert [(o.subject, d) for o, d in ok] == [("patient002", "b"), ("patient001", "a")]
  for resolve in (lambda s, d: (_Outcome(s + "x"), d), lambda s, d: (_Outcome("patient001"), d)):
    with pytest.raises(RuntimeError, match="not one per subject"):
      beam_prepare.resolve_subjects(resolve, subjects, config, str(tmp_path))
  assert os.listdir(tmp_path) == []  # The scratch folder is removed either way.
