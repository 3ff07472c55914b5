"""One-line user errors of the ImageReward plugin (the CLI prints them and exits 2)."""

from __future__ import annotations

from densegrpo.api import UserError


class ImageRewardNotInstalledError(UserError, ImportError):
    """The ``image-reward`` package is missing."""


class MissingWeightsError(UserError, FileNotFoundError):
    """Weights that are neither in a local folder nor in the hub cache, while offline."""
