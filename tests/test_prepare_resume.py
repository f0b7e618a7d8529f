"""Tests of resumable and concurrent preparation (data_pipelines.prepare work area and lock).

A cohort of 10 phantom subjects (2 of them hostile, so cached skips are covered too) is
prepared once without interruption as the reference; interrupted runs (an exception injected
after k subjects, a SIGKILL in a child process) are then resumed and must give the same
dataset while recomputing only the subjects that were not done.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from data_pipelines import fingerprints
from data_pipelines import prepare
from data_pipelines import preprocess
from data_pipelines import subject_cache
from data_pipelines import subject_splits
from data_pipelines import tfds_builders
from tests.test_acdc_reader import write_subject

SMALL = preprocess.PreprocessConfig(image_size=32, spacing_mm=2.0)
GROUPS = ("NOR", "DCM", "HCM", "MINF", "RV", "NOR", "DCM", "HCM")
NUM_SUBJECTS = len(GROUPS) + 2
_REAL_RUN_SUBJECT = tfds_builders.run_subject
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_cohort(root: str) -> None:
  for i, group in enumerate(GROUPS):
    write_subject(root, f"patient{i + 1:03d}", group=group, seed=i)
  os.remove(os.path.join(write_subject(root, "patient009", seed=9), "Info.cfg"))
  directory = write_subject(root, "patient010", seed=10)
  with open(os.path.join(directory, "Info.cfg"), "ab") as f:
    f.write(b"ED: 2\n")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("raw"))
  _write_cohort(root)
  return root


@pytest.fixture(scope="module")
def reference(cohort, tmp_path_factory):
  output = str(tmp_path_factory.mktemp("reference") / "out")
  report = prepare.prepare_dataset(cohort, output, SMALL, verbose=False)
  assert report["counts"]["prepared"] == len(GROUPS)
  return output, report


class CountingRunSubject:
  """Stands in for tfds_builders.run_subject: records subjects, optionally fails after k."""

  def __init__(self, fail_after=None, exception=KeyboardInterrupt):
    self.real = _REAL_RUN_SUBJECT
    self.subjects = []
    self.fail_after = fail_after
    self.exception = exception
    self.lock = threading.Lock()

  def __call__(self, ref, *args, **kwargs):
    with self.lock:
      if self.fail_after is not None and len(self.subjects) == self.fail_after:
        raise self.exception("injected interruption")
      self.subjects.append(ref.subject)
    return self.real(ref, *args, **kwargs)


def _work_files(output: str) -> dict[str, int]:
  """{file name: mtime_ns} of the per-subject work area."""
  folder = os.path.join(output, prepare.WORK_DIR, "subjects")
  return {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in sorted(os.listdir(folder))}


def _assert_same_dataset(output: str, reference_output: str) -> None:
  for name in (prepare.ATTRIBUTES, prepare.SPLITS):
    with open(os.path.join(output, name), "rb") as f, \
        open(os.path.join(reference_output, name), "rb") as g:
      assert f.read() == g.read(), name
  with open(os.path.join(output, prepare.REPORT)) as f, \
      open(os.path.join(reference_output, prepare.REPORT)) as g:
    report, expected = json.load(f), json.load(g)
  for r in (report, expected):
    for key in ("seconds", "seconds_per_subject", "resumed_subjects"):
      r.pop(key)
    for entry in r["subjects"]:
      # Another test rewrites a subject with the same bytes: only its file times differ.
      for record in entry.get("inputs", {}).values():
        record.pop("mtime_ns", None)
  assert report == expected
  for split in subject_splits.SPLITS:
    ours = {e["subject"]: e for e in prepare.load_split(output, split)}
    theirs = {e["subject"]: e for e in prepare.load_split(reference_output, split)}
    assert ours.keys() == theirs.keys() and ours
    for subject, example in ours.items():
      for key in ("image", "label", "slice_index", "group"):
        np.testing.assert_array_equal(example[key], theirs[subject][key], err_msg=key)
      assert example["attributes"] == theirs[subject]["attributes"]
  # Finished: no work area, no lock, no staging folder.
  assert sorted(os.listdir(output)) == ["attributes.csv", "report.json", "splits.json", "tfds"]


def test_resume_after_interruption_recomputes_only_the_rest(cohort, reference, tmp_path,
                                                            monkeypatch, capsys):
  output = str(tmp_path / "out")
  k = 4
  first = CountingRunSubject(fail_after=k)
  monkeypatch.setattr(tfds_builders, "run_subject", first)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare_dataset(cohort, output, SMALL, verbose=False)
  done = _work_files(output)
  assert sorted(done) == [f"{s}.npz" for s in first.subjects] and len(done) == k
  with pytest.raises(prepare.InvalidInputError, match="not a complete prepared dataset"):
    prepare.open_prepared(output)

  second = CountingRunSubject()
  monkeypatch.setattr(tfds_builders, "run_subject", second)
  # Before the work area is deleted at the end, the first k files must be untouched.
  mtimes_seen = {}
  real_prepare_locked = prepare._prepare_locked

  def watching(*args, **kwargs):
    real_save = subject_cache.save_outcome

    def save(cache_dir, outcome, *a, **kw):
      mtimes_seen.update(_work_files(output))
      return real_save(cache_dir, outcome, *a, **kw)

    monkeypatch.setattr(subject_cache, "save_outcome", save)
    return real_prepare_locked(*args, **kwargs)

  monkeypatch.setattr(prepare, "_prepare_locked", watching)
  report = prepare.prepare_dataset(cohort, output, SMALL, verbose=True)
  assert not set(second.subjects) & set(first.subjects)
  assert len(second.subjects) == NUM_SUBJECTS - k
  assert report["resumed_subjects"] == k
  assert {n: mtimes_seen[n] for n in done} == done
  assert f"{k} taken from an interrupted run" in capsys.readouterr().out
  _assert_same_dataset(output, reference[0])
  with capsys.disabled():
    print(f"\nresume: interrupted after {k} of {NUM_SUBJECTS} subjects; the rerun processed "
          f"{len(second.subjects)}, reused {report['resumed_subjects']} (work files untouched), "
          "and the dataset equals the uninterrupted one")


def test_resume_after_sigkill_with_stale_lock_and_staging(cohort, reference, tmp_path,
                                                          monkeypatch):
  output = str(tmp_path / "out")
  k = 3
  script = textwrap.dedent(f"""
      import os, signal
      from data_pipelines import prepare, preprocess, tfds_builders
      real, calls = tfds_builders.run_subject, []
      def run_subject(ref, *args, **kwargs):
        if len(calls) == {k}:
          os.kill(os.getpid(), signal.SIGKILL)
        calls.append(ref.subject)
        return real(ref, *args, **kwargs)
      tfds_builders.run_subject = run_subject
      prepare.prepare_dataset({cohort!r}, {output!r},
                              preprocess.PreprocessConfig(image_size=32, spacing_mm=2.0),
                              verbose=False)
  """)
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
  # Killed without any cleanup: the lock file and a staging folder remain beside the work area.
  left = sorted(os.listdir(output))
  assert prepare.LOCK_FILE in left and any(n.startswith(".staging-") for n in left), left
  assert len(_work_files(output)) == k

  rerun = CountingRunSubject()
  monkeypatch.setattr(tfds_builders, "run_subject", rerun)
  report = prepare.prepare_dataset(cohort, output, SMALL, verbose=False)
  assert len(rerun.subjects) == NUM_SUBJECTS - k and report["resumed_subjects"] == k
  _assert_same_dataset(output, reference[0])


def test_changed_input_and_unexpected_errors_are_recomputed(cohort, tmp_path, monkeypatch):
  output = str(tmp_path / "out")
  first = CountingRunSubject(fail_after=3)
  monkeypatch.setattr(tfds_builders, "run_subject", first)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare_dataset(cohort, output, SMALL, verbose=False)
  # A subject whose files changed after it was cached is prepared again, from the new files.
  changed = first.subjects[0]
  write_subject(cohort, changed, group="HCM", seed=0)
  try:
    rerun = CountingRunSubject()
    monkeypatch.setattr(tfds_builders, "run_subject", rerun)
    report = prepare.prepare_dataset(cohort, output, SMALL, verbose=False)
  finally:
    write_subject(cohort, changed, group=GROUPS[0], seed=0)
  assert changed in rerun.subjects and len(rerun.subjects) == NUM_SUBJECTS - 2
  assert prepare.prepared_attributes(output)[changed]["group"] == "HCM"
  assert report["resumed_subjects"] == 2

  # An unexpected exception (not InvalidInputError) is not cached: the next run retries it;
  # a MemoryError is the subject's reason and cached like an input problem.
  ref = tfds_builders.acdc.list_subjects(cohort)[0]
  key = subject_cache.subject_cache_key(SMALL, "acdc")
  cache = str(tmp_path / "cache")
  inputs = fingerprints.subject_inputs(ref.directory)
  for error, cached in ((RuntimeError("transient"), False), (MemoryError("too big"), True)):
    monkeypatch.setattr(tfds_builders.cardiac, "subject_attributes",
                        lambda *a, error=error: (_ for _ in ()).throw(error))
    outcome = tfds_builders.run_subject(ref, SMALL)
    assert outcome.unexpected != cached, outcome.reason
    outcome.inputs = inputs
    if not outcome.unexpected:
      subject_cache.save_outcome(cache, outcome, key)
    reused = subject_cache.load_outcome(cache, ref.subject, key, ref.directory, inputs)
    assert (reused is not None) == cached
  assert "not enough memory to prepare this subject (MemoryError: too big" in reused.reason


def test_other_configuration_takes_over_unfinished_work(cohort, reference, tmp_path,
                                                        monkeypatch, capsys):
  """An unfinished preparation never refuses a run of another configuration (the corrected
  rerun of a failed one): the run takes the work area over, reusing the subjects whose
  preprocessing and inputs match (a changed split seed) and preparing the others."""
  output = str(tmp_path / "out")
  monkeypatch.setattr(tfds_builders, "run_subject", CountingRunSubject(fail_after=2))
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare_dataset(cohort, output, SMALL, split_seed=7, verbose=False)
  before = _work_files(output)
  # A cache file written for another configuration is never reused, even if found.
  ref = tfds_builders.acdc.list_subjects(cohort)[0]
  inputs = fingerprints.subject_inputs(ref.directory)
  cache = os.path.join(output, prepare.WORK_DIR, "subjects")
  other = preprocess.PreprocessConfig(image_size=32, spacing_mm=2.5)
  for config, found in ((SMALL, True), (other, False)):
    key = subject_cache.subject_cache_key(config, "acdc")
    assert (subject_cache.load_outcome(cache, ref.subject, key, ref.directory,
                                       inputs) is not None) == found
  rerun = CountingRunSubject()
  monkeypatch.setattr(tfds_builders, "run_subject", rerun)
  report = prepare.prepare_dataset(cohort, output, SMALL, verbose=True)
  assert "unfinished preparation of another configuration is replaced" in capsys.readouterr().out
  assert report["resumed_subjects"] == len(before) == 2
  assert len(rerun.subjects) == NUM_SUBJECTS - 2
  _assert_same_dataset(output, reference[0])
  # A corrupt cache file is treated as absent, not as an error.
  broken = str(tmp_path / "broken")
  os.makedirs(broken)
  with open(subject_cache.cache_path(broken, ref.subject), "wb") as f:
    f.write(b"PK\x03\x04 broken")
  assert subject_cache.load_outcome(broken, ref.subject, subject_cache.subject_cache_key(
      SMALL, "acdc"), ref.directory, inputs) is None


def test_concurrent_processes_prepare_once(cohort, reference, tmp_path):
  """Two processes call prepare_dataset on one output dir: the first prepares, the second
  waits for the lock (held until the test lets the first go on) and returns the same report;
  each subject is processed once in all."""
  output = str(tmp_path / "out")
  go = str(tmp_path / "go")
  script = textwrap.dedent(f"""
      import json, os, time
      from data_pipelines import prepare, preprocess, tfds_builders
      real, calls = tfds_builders.run_subject, []
      def run_subject(ref, *args, **kwargs):
        while not os.path.exists({go!r}):     # holds the lock until the test says go
          time.sleep(0.05)
        calls.append(ref.subject)
        return real(ref, *args, **kwargs)
      tfds_builders.run_subject = run_subject
      report = prepare.prepare_dataset(
          {cohort!r}, {output!r}, preprocess.PreprocessConfig(image_size=32, spacing_mm=2.0),
          verbose=True)
      print("RESULT", json.dumps({{"calls": len(calls), "counts": report["counts"]}}))
  """)

  def start():
    return subprocess.Popen([sys.executable, "-c", script], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

  first = start()
  lock = os.path.join(output, prepare.LOCK_FILE)
  for _ in range(1200):
    if os.path.exists(lock) or first.poll() is not None:
      break
    threading.Event().wait(0.1)
  assert os.path.exists(lock), first.communicate()[1][-2000:]
  second = start()
  line = second.stdout.readline()          # blocks until the second process reports waiting
  assert "another process is preparing it; waiting" in line, (line, second.poll())
  with open(go, "w"):
    pass
  outputs = [p.communicate(timeout=300) for p in (first, second)]
  for p, (out, err) in zip((first, second), outputs):
    assert p.returncode == 0, err[-2000:]
  results = [json.loads(out.split("RESULT ", 1)[1]) for out, _ in outputs]
  assert [r["calls"] for r in results] == [NUM_SUBJECTS, 0]
  assert results[0]["counts"] == results[1]["counts"] == reference[1]["counts"]
  assert "already prepared" in outputs[1][0]
  _assert_same_dataset(output, reference[0])
