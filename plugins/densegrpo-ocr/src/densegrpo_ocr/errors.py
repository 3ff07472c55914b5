"""One-line user errors of the OCR plugin (the CLI prints them and exits 2)."""

from __future__ import annotations

from densegrpo.api import UserError


class OCRBackendMissingError(UserError, ImportError):
    """The package of the chosen OCR backend is not installed."""


class MissingWeightsError(UserError, FileNotFoundError):
    """OCR weight files that are not where the config points."""
