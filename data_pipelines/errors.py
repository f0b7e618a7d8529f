"""The error type of the data pipelines: input data that cannot be used as it is.

Readers and the prepare job raise `InvalidInputError` with a message naming the offending file
and the problem, so a cohort job can record the reason for one subject and go on with the rest.
"""

from __future__ import annotations


class InvalidInputError(ValueError):
  """A file or directory of an input cohort is missing, unreadable or inconsistent."""


class InvalidArgumentError(ValueError):
  """An argument of a job (a flag value, a folder to write into) that cannot be used."""
