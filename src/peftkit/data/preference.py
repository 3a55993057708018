"""Preference rows: paired (``preference``) and unpaired (``kto``) rows become checked conversations.

::

    preference  {prompt, chosen, rejected}   DPO, ORPO, SimPO, reward models
    kto         {prompt, completion, label}  KTO: one completion, desirable (true) or not (false)
    prompt      {prompt, ...}                online_dpo / grpo: the model writes the answers; the
                                             other columns go to the reward functions

Each of ``prompt`` / ``chosen`` / ``rejected`` / ``completion`` is either a string or OpenAI-style
messages (``[{role, content}]``; ShareGPT ``{from, value}`` too, as for ``chat`` rows)::

    {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
        -> prompt [user "2+2?"], chosen [assistant "4"], rejected [assistant "5"]
    {"prompt": [{"role": "user", "content": "2+2?"}],
     "chosen": [{"role": "assistant", "content": "4"}], "rejected": {"role": "assistant", ...}}
    {"chosen": [user, assistant "4"], "rejected": [user, assistant "5"]}      (implicit prompt)
        -> prompt: the longest message prefix both share; completions: the rest of each

A conversational prompt ends with a user turn (or a tool result the assistant answers); a
completion is assistant turn(s), possibly with tool results between them, and must end with
the assistant. ``columns`` renames fields and ``system_prompt`` is put before a prompt that has
no system message, as for the SFT formats (:mod:`.formats`).

KTO labels: JSON booleans, or the text ``true`` / ``false`` (any case) because CSV and TSV
cells are always text. Numbers (``1`` / ``0``) and other words are refused: a column of ratings
or scores read as "desirable" by accident would silently train the wrong way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from peftkit.data.config import FORMAT_FIELDS, DataConfig

# Private helpers of .formats, imported rather than copied so that preference rows read
# fields, messages and turn order exactly as the SFT formats do (task_formats does the same).
from peftkit.data.formats import (
    _TOOL_ROLES,
    EmptyRowError,
    RowError,
    _check_turns,
    _message,
    _missing,
    _text,
    _where,
)
from peftkit.data.readers import Record
from peftkit.errors import DataError

Messages = list[dict[str, str]]

#: The fields each preference format reads (after ``columns`` renaming); optional in brackets.
PREFERENCE_FIELDS: dict[str, tuple[str, ...]] = {name: FORMAT_FIELDS[name] for name in ("preference", "kto")}

_TRUE, _FALSE = "true", "false"

ANNOTATION_COLUMNS = ("score_chosen", "score_rejected", "scores", "origin")
"""Columns a ``preference`` row may carry for people to read (``peftkit label-pairs`` writes the
judges' scores and the prompt's file:line): not read, and not warned about."""


@dataclass
class PreferencePair:
    """A paired row: one prompt, a preferred and a dispreferred completion (messages each)."""

    origin: str
    prompt: Messages
    chosen: Messages
    rejected: Messages


@dataclass
class UnpairedCompletion:
    """A KTO row: a prompt, one completion, and whether that completion is desirable."""

    origin: str
    prompt: Messages
    completion: Messages
    desirable: bool


def read_preference(
    records: Iterable[Record],
    fmt: str,
    cfg: DataConfig,
    on_error: Callable[[str, str], None] | None = None,
) -> list[PreferencePair] | list[UnpairedCompletion]:
    """Every good row of ``records`` in format ``fmt`` (``preference`` or ``kto``).

    A bad row goes to ``on_error(origin, reason)`` (the data loader's ``bad_row`` counts and
    skips it under ``skip_bad_rows``); without ``on_error`` it raises :class:`DataError` naming
    its ``file:line``.
    """
    if fmt not in PREFERENCE_FIELDS:
        raise DataError(f"unknown preference format {fmt!r}: use one of {', '.join(PREFERENCE_FIELDS)}")
    convert = to_pair if fmt == "preference" else to_unpaired
    rows: list[Any] = []
    for record in records:
        if record.problem is not None:
            _report(on_error, record.origin, record.problem)
            continue
        try:
            rows.append(convert(record, cfg))
        except RowError as err:
            _report(on_error, record.origin, str(err))
    return rows


def _report(on_error: Callable[[str, str], None] | None, origin: str, reason: str) -> None:
    if on_error is None:
        raise DataError(f"{origin}: {reason}")
    on_error(origin, reason)


def to_pair(record: Record, cfg: DataConfig) -> PreferencePair:
    """Convert one ``preference`` row; raise :class:`RowError` (no origin) saying what is wrong."""
    row = record.data
    prompt_column = cfg.columns.get("prompt", "prompt")
    if row.get(prompt_column) is None and _is_conversation(row, "chosen", cfg):
        prompt, chosen, rejected = _split_shared_prompt(
            _messages(row, "chosen", cfg, "assistant"), _messages(row, "rejected", cfg, "assistant"), cfg
        )
    else:
        if row.get(prompt_column) is None:
            _missing(row, "prompt", prompt_column)  # string completions need their prompt
        prompt = _messages(row, "prompt", cfg, "user")
        chosen = _messages(row, "chosen", cfg, "assistant")
        rejected = _messages(row, "rejected", cfg, "assistant")
    _check_prompt(prompt, "prompt")
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        _check_completion(prompt, completion, name, cfg)
    if _comparable(chosen) == _comparable(rejected):
        raise RowError(
            f"{_where('chosen', cfg.columns.get('chosen', 'chosen'))} and "
            f"{_where('rejected', cfg.columns.get('rejected', 'rejected'))} are the same answer: a pair "
            "teaches nothing unless they differ (fix the rejected answer or drop the row)"
        )
    return PreferencePair(record.origin, _with_system(prompt, cfg), chosen, rejected)


def to_unpaired(record: Record, cfg: DataConfig) -> UnpairedCompletion:
    """Convert one ``kto`` row; raise :class:`RowError` (no origin) saying what is wrong."""
    row = record.data
    prompt = _messages(row, "prompt", cfg, "user")
    completion = _messages(row, "completion", cfg, "assistant")
    _check_prompt(prompt, "prompt")
    _check_completion(prompt, completion, "completion", cfg)
    desirable = _desirable(row, cfg)
    return UnpairedCompletion(record.origin, _with_system(prompt, cfg), completion, desirable)


def pair_fields(row: dict[str, Any], cfg: DataConfig) -> dict[str, Any]:
    """A ``preference`` row as the fields a preference task encodes (data/task_formats.py)."""
    pair = to_pair(Record("", row), cfg)
    return {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}


def unpaired_fields(row: dict[str, Any], cfg: DataConfig) -> dict[str, Any]:
    """A ``kto`` row as the fields KTO encodes."""
    row_ = to_unpaired(Record("", row), cfg)
    return {"prompt": row_.prompt, "completion": row_.completion, "desirable": row_.desirable}


def prompt_fields(row: dict[str, Any], cfg: DataConfig) -> dict[str, Any]:
    """A ``prompt`` row (online objectives): its prompt as messages, and the row's other columns,
    which the reward functions receive as keyword arguments."""
    column = cfg.columns.get("prompt", "prompt")
    prompt = _messages(row, "prompt", cfg, "user")
    _check_prompt(prompt, "prompt")
    if not any(m["content"].strip() for m in prompt):
        raise EmptyRowError(f"{_where('prompt', column)} is empty: there is nothing to answer")
    columns = {str(k): v for k, v in row.items() if k != column}
    return {
        "prompt": _with_system(prompt, cfg),
        "columns": columns,
        "text_prompt": isinstance(row[column], str),
    }


def _is_conversation(row: dict[str, Any], name: str, cfg: DataConfig) -> bool:
    return isinstance(row.get(cfg.columns.get(name, name)), list)


def _messages(row: dict[str, Any], name: str, cfg: DataConfig, string_role: str) -> Messages:
    """Field ``name`` as messages: a string (or number) is one ``string_role`` message; a dict
    is one message; a list is a conversation."""
    column = cfg.columns.get(name, name)
    value = row.get(column)
    if value is None:
        _missing(row, name, column)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise RowError(
                f"{_where(name, column)} must be a string or a list of {{role, content}} messages, "
                f"got {type(value).__name__} {value!r:.60}"
            )
        return [{"role": string_role, "content": _text(row, name, cfg)}]
    if not value:
        raise EmptyRowError(f"{_where(name, column)} is an empty list of messages: nothing to train on")
    try:
        return [_message(m, i) for i, m in enumerate(value)]
    except RowError as err:
        raise RowError(f"{_where(name, column)}: {err}") from None


def _split_shared_prompt(chosen: Messages, rejected: Messages, cfg: DataConfig) -> tuple[Messages, ...]:
    """Implicit prompt: the longest message prefix both conversations share."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise RowError(
            "without a 'prompt' column, 'chosen' and 'rejected' must be whole conversations that start "
            "with the same prompt, but their first messages differ; add a prompt column or fix the row"
        )
    if shared == min(len(chosen), len(rejected)):
        shorter = "chosen" if len(chosen) < len(rejected) else "rejected"
        which = (
            "they are the same conversation"
            if len(chosen) == len(rejected)
            else f"{shorter} is the start of the other"
        )
        raise RowError(
            f"without a 'prompt' column the prompt is what 'chosen' and 'rejected' share, and the "
            f"answers are what follows; here {which}, so one answer is empty (fix the row)"
        )
    for name, rest in (("chosen", chosen[shared:]), ("rejected", rejected[shared:])):
        if rest[0]["role"] != "assistant":
            raise RowError(
                f"'chosen' and 'rejected' first differ at message {shared}, which is a "
                f"{rest[0]['role']} message in {name}: after the shared prompt both must continue with "
                "the assistant's answer (give a 'prompt' column, or make the conversations differ only "
                "in their last assistant turn(s))"
            )
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _check_prompt(prompt: Messages, name: str) -> None:
    last = prompt[-1]["role"]
    if last != "user" and last not in _TOOL_ROLES:
        raise RowError(
            f"the {name} ends with a message of role {last!r}: a prompt ends with the user's turn (or a tool "
            "result) that the completions answer; move trailing assistant messages into the completions"
        )


def _check_completion(prompt: Messages, completion: Messages, name: str, cfg: DataConfig) -> None:
    """A completion is assistant turn(s) (tool results between them allowed) with text to learn."""
    where = _where(name, cfg.columns.get(name, name))
    roles = [m["role"] for m in completion]
    if any(role != "assistant" and role not in _TOOL_ROLES for role in roles) or roles[0] != "assistant":
        raise RowError(
            f"{where} must be the assistant's answer (assistant turns, with tool results between them), "
            f"got roles {roles}; put user and system messages in the prompt"
        )
    if any(not m["content"].strip() for m in completion if m["role"] == "assistant"):
        raise EmptyRowError(f"{where} has an empty assistant answer: nothing to train on")
    try:
        _check_turns(prompt + completion)
    except RowError as err:
        raise RowError(f"prompt + {name} (messages numbered from the prompt's first): {err}") from None


def _comparable(messages: Messages) -> list[tuple[str, str]]:
    # Answers that differ only in surrounding whitespace are the same answer to a reader.
    return [(m["role"], m["content"].strip()) for m in messages]


def _with_system(prompt: Messages, cfg: DataConfig) -> Messages:
    if cfg.system_prompt is not None and prompt[0]["role"] != "system":
        return [{"role": "system", "content": cfg.system_prompt}, *prompt]
    return prompt


def _desirable(row: dict[str, Any], cfg: DataConfig) -> bool:
    column = cfg.columns.get("label", "label")
    value = row.get(column)
    if value is None:
        _missing(row, "label", column)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in (_TRUE, _FALSE):
        return value.strip().lower() == _TRUE
    raise RowError(
        f"{_where('label', column)} must be true (a desirable completion) or false (an undesirable one), "
        f"as a JSON boolean or the text true/false; got {type(value).__name__} {value!r:.40}"
    )
