"""Errors raised by the data pipelines."""

from __future__ import annotations


class DataNotFoundError(FileNotFoundError):
  """A data set's files are absent and cannot be downloaded here.

  The message always says what is missing, where it was looked for, what to
  download and where to put it, and that the shipped ``cifar10_subset`` /
  ``mnist_subset`` work offline. Subclassing ``FileNotFoundError`` lets
  callers that already handle missing files catch it without knowing this
  library.
  """


class CorruptDataError(ValueError):
  """A data file exists but does not have the expected format."""
