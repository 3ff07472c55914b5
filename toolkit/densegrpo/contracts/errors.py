"""User-facing errors. The CLI prints their message on one line and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; its message says what is wrong and how to fix it."""


class UnknownComponentError(UserError, KeyError):
    """A component name that no installed package registers."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DuplicateComponentError(UserError):
    """Two installed packages register the same component name."""


class PluginImportError(UserError, ImportError):
    """A registered component whose module fails to import."""


class ConfigError(UserError, ValueError):
    """A configuration file or value that does not validate."""


class CheckpointError(UserError):
    """A checkpoint that is missing, damaged, or could not be written; ``folder`` names it and
    ``problem`` says what is wrong with it, in a few words."""

    def __init__(self, message: str, folder: object = None, problem: str = "") -> None:
        super().__init__(message)
        self.folder = folder
        self.problem = problem
