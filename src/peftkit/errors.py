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


def not_utf8_message(path: object, raw: bytes, err: UnicodeDecodeError) -> str:
    """Where a file stops being UTF-8 (line, column, byte offset and the byte), for error messages."""
    line = raw.count(b"\n", 0, err.start) + 1
    column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
    byte = raw[err.start : err.start + 1].hex()
    return (
        f"{path} is not UTF-8 text: byte 0x{byte} at line {line}, column {column} (byte offset "
        f"{err.start}) is not valid UTF-8; it must be UTF-8 (re-save it with that encoding)"
    )
