"""One-line user errors of the GenEval plugin (the CLI prints them and exits 2)."""

from __future__ import annotations

from densegrpo.api import UserError


class MissingWeightsError(UserError, FileNotFoundError):
    """Weights that are neither in a local folder nor in the hub cache, while offline."""


class MetadataError(UserError, ValueError):
    """A GenEval metadata JSONL file that cannot be read."""
