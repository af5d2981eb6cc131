"""The one base class of the errors that mean bad input or a run that cannot go on (not a bug): their messages
name the file, key or resource, so the CLI prints them as one line (``except EuphoniumError``)."""

from __future__ import annotations

__all__ = ["ConfigError", "EuphoniumError", "RunError"]


class EuphoniumError(Exception):
    """Bad input, a missing resource or a run that cannot continue; the message says what and where."""


class ConfigError(EuphoniumError, ValueError):
    """A config that cannot be used; the message names the offending key or value."""


class RunError(EuphoniumError, RuntimeError):
    """A run that cannot start or continue; the message says what is wrong and where."""
