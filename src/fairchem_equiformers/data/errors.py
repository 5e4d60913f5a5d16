"""The one exception type of the dataset builder."""

from __future__ import annotations


class DataBuildError(Exception):
    """A problem with the user's input or output folder; the CLI prints its message, no traceback."""
