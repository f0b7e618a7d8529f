"""The error type of the data pipelines: input data that cannot be used as it is.

Readers and the prepare job raise `InvalidInputError` with a message naming the offending file
and the problem, so a cohort job can record the reason for one subject and go on with the rest;
`printable_path` writes the file's name so that the message can always be printed.
"""

from __future__ import annotations

import os


class InvalidInputError(ValueError):
  """A file or directory of an input cohort is missing, unreadable or inconsistent."""


class InvalidArgumentError(ValueError):
  """An argument of a job (a flag value, a folder to write into) that cannot be used."""


def printable_path(path: str) -> str:
  """`path` with bytes that are not UTF-8 (kept by Python as surrogates) as backslash escapes,
  so that messages and reports holding it can be printed and written as UTF-8."""
  return os.fsencode(path).decode("utf-8", "backslashreplace")
