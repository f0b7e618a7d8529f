"""Apache Beam runs of a preparation: the per-subject work and the split writing on workers.

A `tfds_builders.SubjectBuilder` given `tfds.download.DownloadConfig(beam_options=...)` (or a
beam_runner) prepares in two Beam pipelines on that runner (DirectRunner, Dataflow, Flink,
Spark), instead of a loop in this process:
1. `resolve_subjects`: every (subject, folder) goes through `SubjectLoop.resolve`, the same
   per-subject function as the default path (previous dataset, work area, or a fresh
   `run_subject` saved to the work area). Each worker returns the outcome's metadata (no
   arrays); one step collects them into a file the driver reads back, so the driver holds every
   outcome (prepared or skipped with its reason, unexpected failures too, with the input
   fingerprint) exactly as the default path would, and splits them the same way.
2. `examples_transform`: each split's PTransform, subject ids -> (subject, example) read from
   the work area (or the previous dataset) by the same reader as the default path; tfds's
   BeamWriter writes the records.
So report.json, attributes.csv, splits.json and the records are those of the default path.
The work area, the input folder and the output folder must be one file system that the driver
and every worker see at the same paths (docs/cluster.md).

Apache Beam is optional (requirements-beam.txt); without it `pipeline_options` raises one
InvalidArgumentError saying how to install it.
"""

from __future__ import annotations

import os
import pickle
import shlex
import uuid
from typing import Callable, Optional, Sequence

from data_pipelines.errors import InvalidArgumentError

INSTALL_HINT = "pip install -r requirements-beam.txt"
_OUTCOMES_FILE = "outcomes.pickle"


def import_beam():
  """The apache_beam module; InvalidArgumentError naming the install command without it."""
  try:
    import apache_beam as beam  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise InvalidArgumentError(f"--beam needs Apache Beam, which is not installed ({e}); "
                               f"install it with `{INSTALL_HINT}`") from None
  return beam


def pipeline_options(beam_options: str = ""):
  """Beam PipelineOptions from a command-line string, e.g. "--runner=DirectRunner
  --direct_num_workers=2 --direct_running_mode=multi_processing" (empty: the DirectRunner
  with Beam's defaults). InvalidArgumentError without Apache Beam or for unparsable text."""
  beam = import_beam()
  try:
    args = shlex.split(beam_options or "")
  except ValueError as e:
    raise InvalidArgumentError(f"beam_options {beam_options!r}: {e}") from None
  return beam.options.pipeline_options.PipelineOptions(args)


def is_beam(download_config) -> bool:
  """Whether a tfds DownloadConfig asks for Beam (a runner or options given)."""
  return download_config is not None and (download_config.beam_runner is not None
                                          or download_config.beam_options is not None)


def _pipeline(download_config):
  beam = import_beam()
  options = download_config.beam_options or beam.options.pipeline_options.PipelineOptions()
  return beam.Pipeline(runner=download_config.beam_runner, options=options)


def _write_outcomes(results: list, path: str) -> None:
  # pylint: disable=g-import-not-at-top
  from etils import epath
  epath.Path(path).write_bytes(pickle.dumps(results))


def resolve_subjects(resolve: Callable[[str, str], tuple], subjects: Sequence[tuple[str, str]],
                     download_config, scratch_dir: str) -> list[tuple[object, str]]:
  """[(outcome, source)] of `resolve(subject, directory)` for every (subject, directory) of
  `subjects`, in their order, computed on the Beam runner of `download_config`. The results
  travel to this process through a file under `scratch_dir` (seen by driver and workers),
  removed afterwards."""
  beam = import_beam()
  from etils import epath  # pylint: disable=g-import-not-at-top
  folder = epath.Path(scratch_dir) / f"beam-outcomes-{uuid.uuid4().hex[:12]}"
  folder.mkdir(parents=True, exist_ok=True)
  path = os.fspath(folder / _OUTCOMES_FILE)
  try:
    with _pipeline(download_config) as pipeline:
      _ = (pipeline
           | "Subjects" >> beam.Create(list(subjects))
           # Spreads the subjects over the workers (a Create is read by one).
           | "Spread" >> beam.Reshuffle()
           | "Prepare" >> beam.MapTuple(resolve)
           | "Collect" >> beam.combiners.ToList()
           | "Write" >> beam.Map(_write_outcomes, path=path))
    results = pickle.loads(epath.Path(path).read_bytes())
  finally:
    folder.rmtree(missing_ok=True)
  position = {subject: i for i, (subject, _) in enumerate(subjects)}
  returned = sorted(position.get(result[0].subject, -1) for result in results)
  if returned != list(range(len(subjects))):  # Each subject once, none other.
    raise RuntimeError(f"the Beam pipeline returned {len(results)} outcomes for the "
                       f"{len(subjects)} subjects, not one per subject")
  results.sort(key=lambda result: position[result[0].subject])
  return results


def examples_transform(subjects: Sequence[str], read: Callable[[str], dict]):
  """The PTransform of one split: subject ids -> (subject id, example) by `read`, keyed by
  subject id as in the default path's `_generate_examples`."""
  beam = import_beam()

  def keyed(subject: str) -> tuple[str, dict]:
    return subject, read(subject)

  return (beam.Create(list(subjects)) | "Spread" >> beam.Reshuffle()
          | "Read" >> beam.Map(keyed))


def optional_options(beam: bool, beam_options: str = "") -> Optional[object]:
  """`pipeline_options(beam_options)` when `beam`, else None (the default path); a
  `beam_options` without `beam` is refused, so options are never silently ignored."""
  if not beam:
    if beam_options:
      raise InvalidArgumentError("beam_options is set without --beam: add --beam to prepare "
                                 "with Apache Beam, or drop beam_options")
    return None
  return pipeline_options(beam_options)
