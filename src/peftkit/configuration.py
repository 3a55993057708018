"""Typed configuration: dataclasses that explain and check themselves.

Every config section is a plain ``@dataclass``. Each field carries its explanation in
``metadata={"help": ...}``; a section may define ``validate(self) -> list[str]`` for cross-field
checks. :func:`from_dict` builds a section from YAML data, reporting *all* problems at once:
unknown keys (with the closest valid keys), wrong types, and failed validations.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from enum import Enum
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

T = TypeVar("T")


class ConfigError(ValueError):
    """One or more problems in a configuration; ``problems`` lists them one per line."""

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration{where}:\n{lines}")


def closest(name: str, candidates: typing.Iterable[str], n: int = 3) -> list[str]:
    """The valid names that look most like ``name`` (for 'did you mean' messages)."""
    candidates = list(candidates)
    found = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if not found:
        found = [c for c in candidates if name.lower() in c.lower() or c.lower() in name.lower()][:n]
    return found


def unknown_key_message(key: str, where: str, valid: typing.Iterable[str]) -> str:
    valid = sorted(valid)
    near = closest(key, valid)
    hint = (
        f"did you mean {' or '.join(repr(k) for k in near)}?" if near else f"valid keys: {', '.join(valid)}"
    )
    return f"unknown key '{where}{key}': {hint}"


def field_help(cls: type, name: str) -> str:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (coerced where harmless)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        if len(args) == 2 and type(None) in args:  # Optional[X]: X's own, more precise problems
            (arg,) = (a for a in args if a is not type(None))
            return _convert(value, arg, where, problems)
        if float in args and str not in args and isinstance(value, (float, str)):
            # int | float: report a float's own, precise problems ("nan", "ten")
            return _convert(value, float, where, problems)
        for arg in args:
            if arg is type(None):
                continue
            trial: list[str] = []
            out = _convert(value, arg, where, trial)
            if not trial:
                return out
        problems.append(f"'{where}' must be {_type_name(tp)}, got {value!r}")
        return value
    if origin is Literal:
        if value not in get_args(tp):
            near = closest(str(value), [str(a) for a in get_args(tp)])
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            problems.append(f"'{where}' must be one of {_type_name(tp)}, got {value!r}{hint}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            problems.append(f"'{where}' must be a list, got {value!r}")
            return value
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_convert(v, item_tp, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"'{where}' must be a mapping, got {value!r}")
            return value
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {k: _convert(v, val_tp, f"{where}.{k}", problems) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            problems.append(f"'{where}' must be a mapping of {tp.__name__} options, got {value!r}")
            return value
        return _build(tp, value, where + ".", problems)
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError:
            problems.append(f"'{where}' must be one of {[e.value for e in tp]}, got {value!r}")
            return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads "1e-4" as a string; accept numeric strings for floats.
            try:
                value = float(value)
            except (TypeError, ValueError):
                problems.append(f"'{where}' must be a number, got {value!r}")
                return value
        value = float(value)
        if not math.isfinite(value):  # YAML reads .nan and .inf as floats; no setting means them
            problems.append(f"'{where}' must be a finite number, got {value}: nan and inf are not allowed")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"'{where}' must be an integer, got {value!r}{_integer_hint(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"'{where}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            hint = ""
            if isinstance(value, bool):  # PyYAML reads unquoted yes / no / on / off as booleans
                hint = "; YAML reads unquoted yes, no, on, off, true and false as booleans: quote the text"
            problems.append(f"'{where}' must be a string, got {value!r}{hint}")
        return value
    return value


def _integer_hint(value: Any) -> str:
    """Why a number given for an integer field was refused (nothing for a bool or a word)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    if isinstance(value, str):  # PyYAML reads 1e15 (no dot) and 1.0e15 (no exponent sign) as text
        return ": YAML reads a number in exponent form as text; write the integer in digits (e.g. 100000)"
    return ": a float is not accepted for a count; write a whole number in digits, without '.' or exponent"


def _build(cls: type[T], data: dict[str, Any], prefix: str, problems: list[str]) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            problems.append(unknown_key_message(str(key), prefix, fields))
            continue
        n_before = len(problems)
        converted = _convert(value, hints[key], prefix + key, problems)
        if len(problems) == n_before:
            # A mistyped value is reported above and left at its default, so that the
            # cross-field checks below still run on well-typed values and report the rest.
            kwargs[key] = converted
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as err:
        problems.append(f"{prefix.rstrip('.') or cls.__name__}: {err}")
        return None  # type: ignore[return-value]
    validate = getattr(obj, "validate", None)
    if callable(validate):
        problems.extend(_with_prefix(p, prefix, fields) for p in validate())
    return obj


def _with_prefix(problem: str, prefix: str, fields: typing.Iterable[str]) -> str:
    """A section's ``validate()`` message, made to say which section it is about.

    ``r must be ...`` becomes ``lora.r must be ...``; a message that already names its full key
    (``'training.x' ...``) is kept; any other (``set either ...``, ``'val_size' ...``) is put
    after the section's name: ``data: set either ...``.
    """
    if not prefix or problem.startswith(f"'{prefix}"):
        return problem
    first = re.match(r"[A-Za-z_][A-Za-z0-9_]*", problem)
    if first and first[0] in fields:
        return f"{prefix}{problem}"
    return f"{prefix.rstrip('.')}: {problem}"


def from_dict(cls: type[T], data: dict[str, Any] | None, *, where: str = "", source: str | None = None) -> T:
    """Build ``cls`` from ``data``; raise :class:`ConfigError` listing every problem found."""
    problems: list[str] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of {cls.__name__} options, got {data!r}", source)
    obj = _build(cls, data, f"{where}." if where else "", problems)
    if problems:
        raise ConfigError(problems, source)
    return obj


def to_dict(obj: Any) -> Any:
    """A dataclass as plain YAML/JSON data (enums become their values)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, set):
        return sorted(to_dict(v) for v in obj)
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
