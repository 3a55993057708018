"""Errors that peftkit reports to users: each says what is wrong and what to change."""

from __future__ import annotations


class PeftkitError(Exception):
    """Base class for user-facing errors (bad input, missing files, impossible requests)."""


class DataError(PeftkitError, ValueError):
    """A data file or row is malformed; the message names the file and line."""


class TargetModulesError(PeftkitError, ValueError):
    """The requested target modules do not exist in the model."""


class ModelLoadError(PeftkitError):
    """The base model or adapter cannot be found or loaded."""
