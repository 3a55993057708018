"""Readers: a data file (or an in-memory list) becomes a stream of :class:`Record` rows.

Readers never raise for a single bad row: they yield a record with ``problem`` set, so the
caller decides whether to stop (naming ``origin``) or to skip and count it. Only problems that
make the rest of the file unreadable (a missing file, broken JSON document, unreadable Parquet)
raise :class:`DataError` directly.

Origins are ``path:line`` with the real 1-based line for line-based files (JSONL, CSV/TSV; the
line where a multi-line CSV record starts) and ``path[index]`` for JSON, Parquet and lists.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.errors import DataError


@dataclass
class Record:
    """One row as read: its fields, where it came from, and what is wrong with it (if anything)."""

    origin: str
    data: dict[str, Any]
    problem: str | None = None


Reader = Callable[[Path, str, str], Iterator[Record]]


def read_rows(rows: list[Any], name: str) -> Iterator[Record]:
    """Rows given in memory (the Python API); ``name`` (e.g. ``data.train``) prefixes origins."""
    for index, row in enumerate(rows):
        yield _as_record(f"{name}[{index}]", row, "a dict")


def read_file(path: str | os.PathLike, encoding: str = "utf-8", errors: str = "strict") -> Iterator[Record]:
    """Rows of a data file, chosen by extension (see :data:`READERS`)."""
    path = check_data_file(path)
    return READERS[_extension(path)](path, encoding, errors)


def check_data_file(path: str | Path) -> Path:
    """``path``, if it is a file of a type peftkit reads; otherwise a DataError saying what to change."""
    path = Path(path)
    if _extension(path) not in READERS:
        supported = ", ".join(sorted(READERS))
        raise DataError(
            f"{path}: unsupported file type {_extension(path) or '(none)'!r}; supported: {supported}"
        )
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise DataError(f"data file {path} {what} (resolved from {Path.cwd()}); check the path in the config")
    return path


def _extension(path: Path) -> str:
    return path.suffix.lower()


def _as_record(origin: str, row: Any, expected: str) -> Record:
    if not isinstance(row, dict):
        return Record(origin, {}, f"expected {expected} of fields, got {type(row).__name__} {_short(row)}")
    return Record(origin, row)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _decoded_lines(path: Path, encoding: str, errors: str) -> Iterator[tuple[int, str, str | None]]:
    """``(line_number, text, problem)`` per physical line, decoding each line on its own.

    Decoding per line pins an undecodable byte to its line (a whole-file decode would only
    give a byte offset) and lets ``skip_bad_rows`` drop just that row. Encodings where a newline
    is not the single byte 0x0A (UTF-16/32) are decoded whole instead.
    """
    codec = codecs.lookup(encoding).name
    with open(path, "rb") as handle:
        if codec.startswith(("utf-16", "utf-32")):
            text = _decode_whole(handle.read(), path, encoding, errors)
            for number, line in enumerate(text.splitlines(keepends=True), start=1):
                yield number, line, None
            return
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8) and codec == "utf-8":
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                yield number, raw.decode(encoding, errors), None
            except UnicodeDecodeError as err:
                bad = raw[err.start : err.start + 1]
                problem = (
                    f"bytes are not valid {encoding} (byte 0x{bad.hex()} at column {err.start + 1}); set "
                    f"data.encoding to the file's encoding (e.g. latin-1) or data.encoding_errors: replace"
                )
                yield number, raw.decode(encoding, "replace"), problem


def _decode_whole(raw: bytes, path: Path, encoding: str, errors: str) -> str:
    try:
        return raw.decode(encoding, errors)
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: bytes are not valid {encoding} ({err.reason}); set data.encoding to the "
            f"file's encoding or data.encoding_errors: replace"
        ) from None


def read_jsonl(path: Path, encoding: str, errors: str) -> Iterator[Record]:
    """One JSON object per line; blank lines are ignored."""
    for number, line, problem in _decoded_lines(path, encoding, errors):
        origin = f"{path}:{number}"
        if problem is not None:
            yield Record(origin, {}, problem)
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            yield Record(
                origin,
                {},
                f"invalid JSON ({err.msg} at column {err.colno}); each line must be one JSON object",
            )
            continue
        yield _as_record(origin, row, "a JSON object")


def read_json(path: Path, encoding: str, errors: str) -> Iterator[Record]:
    """A JSON document holding a list of objects, or ``{"data": [...]}``."""
    text = _decode_whole(path.read_bytes(), path, encoding, errors)
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno}); a .json file must be "
            f"one JSON document (use .jsonl for one object per line)"
        ) from None
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        document = document["data"]
    if not isinstance(document, list):
        keys = f" with keys {sorted(document)}" if isinstance(document, dict) else ""
        raise DataError(
            f'{path}: expected a JSON list of objects or {{"data": [...]}}, got {type(document).__name__}{keys}'
        )
    for index, row in enumerate(document):
        yield _as_record(f"{path}[{index}]", row, "a JSON object")


def _read_delimited(path: Path, encoding: str, errors: str, delimiter: str) -> Iterator[Record]:
    """CSV/TSV with a header row; a record's origin is the line where it starts."""
    bad_lines: dict[int, str] = {}

    def lines() -> Iterator[str]:
        for number, line, problem in _decoded_lines(path, encoding, errors):
            if problem is not None:
                bad_lines[number] = problem
            yield line

    reader = csv.reader(lines(), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            return
        _check_header(path, header)
        end = reader.line_num
        for values in reader:
            start, end = end + 1, reader.line_num
            origin = f"{path}:{start}"
            problem = next((bad_lines[n] for n in range(start, end + 1) if n in bad_lines), None)
            if problem is not None:
                yield Record(origin, {}, problem)
            elif not values or values == [""]:
                continue  # blank line
            elif len(values) != len(header):
                yield Record(
                    origin,
                    {},
                    f"row has {len(values)} fields but the header has {len(header)} ({', '.join(header)}); "
                    f"quote fields that contain '{delimiter}' or line breaks",
                )
            else:
                yield Record(origin, dict(zip(header, values)))
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: cannot parse the file ({err})") from None


def _check_header(path: Path, header: list[str]) -> None:
    seen = set()
    for index, name in enumerate(header):
        if not name.strip():
            raise DataError(
                f"{path}:1: header column {index + 1} has no name; the first line must name every column"
            )
        if name in seen:
            raise DataError(f"{path}:1: header names column {name!r} twice; column names must be unique")
        seen.add(name)


def read_csv(path: Path, encoding: str, errors: str) -> Iterator[Record]:
    return _read_delimited(path, encoding, errors, ",")


def read_tsv(path: Path, encoding: str, errors: str) -> Iterator[Record]:
    return _read_delimited(path, encoding, errors, "\t")


def read_parquet(path: Path, encoding: str, errors: str) -> Iterator[Record]:
    """A Parquet table; strings are already decoded, so ``encoding`` does not apply."""
    import pyarrow.parquet as pq

    try:
        rows: Iterable[dict[str, Any]] = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several unrelated types for broken files
        raise DataError(f"{path}: cannot read as Parquet ({type(err).__name__}: {err})") from None
    for index, row in enumerate(rows):
        yield Record(f"{path}[{index}]", row)


#: File extension -> reader. Add an entry here to support another format.
READERS: dict[str, Reader] = {
    ".jsonl": read_jsonl,
    ".ndjson": read_jsonl,
    ".json": read_json,
    ".csv": read_csv,
    ".tsv": read_tsv,
    ".parquet": read_parquet,
}
