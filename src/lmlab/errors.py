"""User-facing errors.

Every error a user can cause (a missing file, a malformed record, a bad config
field) is raised as a subclass of :class:`LmlabError`. The CLI catches this one
base class, prints its message on one line and exits with status 2; anything
else is a bug in lmlab and keeps its traceback.
"""

from __future__ import annotations


class LmlabError(Exception):
    """Base class of errors caused by input: message says what, where, and the fix."""

    exit_code = 2


class InputError(LmlabError):
    """A file, record or field the user gave cannot be used."""


class ConfigError(LmlabError):
    """A configuration value is missing, unknown or out of range."""
