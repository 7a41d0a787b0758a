"""User-facing errors.

Every error a user can fix is raised as a :class:`HvdtrainError` with a one-line message that says what is wrong
and how to fix it. The CLI prints that line and exits with the error's code (2 for usage errors, 1 for runtime
errors); the traceback is shown only with ``--debug``.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class HvdtrainError(Exception):
    """An error with a message meant for the user; ``exit_code`` is what the CLI returns."""

    exit_code = 1


class UsageError(HvdtrainError):
    """The command line, the recipe or the config is wrong (exit code 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A config key or value is wrong."""


class DataError(HvdtrainError):
    """The data is missing, empty, or does not fit the model."""


class ModelFileError(HvdtrainError):
    """A model file is missing, corrupt, or of the wrong kind."""


def closest(name: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the nearest valid name, or ``""`` when none is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""
