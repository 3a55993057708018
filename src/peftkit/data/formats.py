"""Row formats: a raw :class:`Record` becomes a :class:`Sample` (a conversation, or plain text).

Every non-text format ends up as turns, so encoding has one path for "user asks, assistant
answers" whatever the file looked like::

    instruction        {instruction, [input], output}  -> [system?] user(instruction\\n\\ninput) assistant(output)
    prompt_completion  {prompt, completion}             -> [system?] user(prompt) assistant(completion)
    chat               {messages: [{role, content}]}   -> the messages as given ([system?] prepended)
    text               {text}                           -> text (every token is trained on)

``columns`` renames fields (``{prompt: question}`` reads the prompt from column ``question``);
``prompt_template`` / ``completion_template`` build the prompt / completion from any columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn

from peftkit.data.config import FORMAT_FIELDS, DataConfig, template_fields
from peftkit.data.readers import Record
from peftkit.errors import DataError


class RowError(ValueError):
    """A problem with one row; the caller adds the row's origin (or skips the row)."""


class EmptyRowError(RowError):
    """A row with nothing to learn (an empty completion or text): the loader counts these rows
    of a file and refuses them together, or skips them with ``skip_bad_rows``."""


@dataclass
class Sample:
    """A row in a format-independent shape: ``messages`` (role/content dicts) or ``text``.

    Rows of the non-LM task formats (:mod:`.task_formats`) keep their checked ``fields``
    instead; the task's encoder reads them.
    """

    origin: str
    messages: list[dict[str, str]] | None = None
    text: str | None = None
    fields: dict[str, Any] | None = None

    @property
    def answer(self) -> str | None:
        """The last assistant message: what a model should generate for this sample's prompt."""
        for message in reversed(self.messages or []):
            if message["role"] == "assistant":
                return message["content"]
        return None

    @property
    def prompt(self) -> str | None:
        """The user message the last assistant message answers, as the data file has it (no chat
        template): what evaluation shows next to a prediction."""
        messages = self.messages or []
        answer_at = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        for message in reversed(messages[:answer_at] if answer_at is not None else []):
            if message["role"] == "user":
                return message["content"]
        return None


def _required(fmt: str) -> list[str]:
    return [f for f in FORMAT_FIELDS[fmt] if not f.startswith("[")]


def _expected_layouts(formats: tuple[str, ...]) -> str:
    return "; ".join(f"{fmt}: {', '.join(FORMAT_FIELDS[fmt])}" for fmt in formats)


LM_FORMATS = ("instruction", "chat", "prompt_completion", "text")


def detect_format(cfg: DataConfig, record: Record, formats: tuple[str, ...] = LM_FORMATS) -> str:
    """The format of a source: ``cfg.format``, or guessed from its first row's keys.

    Only ``formats`` (those of the job's task) are candidates. Templates imply
    prompt_completion; otherwise a ``columns`` mapping naming one format's fields decides;
    otherwise the format whose required fields are all present, if exactly one.
    """
    if cfg.format != "auto":
        if cfg.format not in formats:
            raise DataError(
                f"data.format is {cfg.format}, which the job's task cannot train on (with its objective): use one of "
                f"{', '.join(formats)} (or auto)"
            )
        return cfg.format
    if "prompt_completion" in formats and (
        cfg.prompt_template is not None or cfg.completion_template is not None
    ):
        return "prompt_completion"
    named = {fmt for fmt in formats if any(f.strip("[]") in cfg.columns for f in FORMAT_FIELDS[fmt])}
    if len(named) == 1:
        return named.pop()
    keys = set(record.data)
    found = [fmt for fmt in formats if all(cfg.columns.get(f, f) in keys for f in _required(fmt))]
    if len(found) == 1:
        return found[0]
    what = f"fits several formats ({', '.join(found)})" if found else "fits no known format"
    raise DataError(
        f"{record.origin}: cannot detect the data format: the row has keys {sorted(keys)} and {what}. "
        f"Expected keys per format: {_expected_layouts(formats)}. Set data.format, and data.columns to map "
        f"your column names (e.g. columns: {{prompt: question, completion: answer}})."
    )


def check_templates(cfg: DataConfig, record: Record) -> None:
    """Fail early (whatever ``skip_bad_rows`` says) when a template names a column the data lacks."""
    for name in ("prompt_template", "completion_template"):
        template = getattr(cfg, name)
        if template is None:
            continue
        missing = [f for f in template_fields(template) if f not in record.data]
        if missing:
            raise DataError(
                f"data.{name} names column(s) {', '.join(repr(m) for m in missing)}, which {record.origin} "
                f"does not have; available columns: {', '.join(sorted(map(str, record.data)))}"
            )


def to_sample(record: Record, fmt: str, cfg: DataConfig) -> Sample:
    """Convert one good record; raise :class:`RowError` saying what is wrong with it."""
    from peftkit.data.task_formats import TASK_FORMATS  # it reuses this module's field readers

    row = record.data
    if fmt in TASK_FORMATS:
        return Sample(record.origin, fields=TASK_FORMATS[fmt](row, cfg))
    if fmt == "text":
        text = _text(row, "text", cfg)
        if not text.strip():
            raise EmptyRowError(
                f"{_where('text', cfg.columns.get('text', 'text'))} is empty: nothing to train on"
            )
        return Sample(record.origin, text=text)
    if fmt == "chat":
        messages = _messages(row, cfg)
    else:
        prompt = _format(cfg.prompt_template, row, "prompt_template")
        if prompt is None:
            prompt = _instruction_prompt(row, cfg) if fmt == "instruction" else _text(row, "prompt", cfg)
        completion = _format(cfg.completion_template, row, "completion_template")
        if completion is None:
            completion = _text(row, "output" if fmt == "instruction" else "completion", cfg)
        _check_answer(prompt, completion, fmt, cfg)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if cfg.system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    return Sample(record.origin, messages=messages)


def _check_answer(prompt: str, completion: str, fmt: str, cfg: DataConfig) -> None:
    """An empty (or blank) completion leaves no answer tokens to learn under train_on: completion."""
    if completion.strip():
        return
    name = "output" if fmt == "instruction" else "completion"
    what = (
        "data.completion_template gives an empty completion"
        if cfg.completion_template is not None
        else f"{_where(name, cfg.columns.get(name, name))} is empty"
    )
    if not prompt.strip():
        raise EmptyRowError(f"{what} and so is the prompt: the row has nothing to train on")
    if cfg.train_on == "completion":
        raise EmptyRowError(f"{what}: with data.train_on: completion the row trains on nothing")


def read_columns(fmt: str, cfg: DataConfig) -> set[str]:
    """The row columns that format ``fmt`` reads under ``cfg`` (``columns`` and templates applied)."""
    fields = [f.strip("[]") for f in FORMAT_FIELDS[fmt]]
    if fmt in ("instruction", "prompt_completion"):
        prompt_fields = ["instruction", "input"] if fmt == "instruction" else ["prompt"]
        completion_field = "output" if fmt == "instruction" else "completion"
        used: set[str] = set()
        for template, replaced in (
            (cfg.prompt_template, prompt_fields),
            (cfg.completion_template, [completion_field]),
        ):
            if template is not None:
                fields = [f for f in fields if f not in replaced]
                used.update(template_fields(template))
        return used | {cfg.columns.get(f, f) for f in fields}
    return {cfg.columns.get(f, f) for f in fields}


def _instruction_prompt(row: dict[str, Any], cfg: DataConfig) -> str:
    instruction = _text(row, "instruction", cfg)
    extra = _optional_text(row, "input", cfg)
    return f"{instruction}\n\n{extra}" if extra else instruction


def _format(template: str | None, row: dict[str, Any], name: str) -> str | None:
    if template is None:
        return None
    try:
        return template.format_map(row)
    except KeyError as err:
        raise RowError(
            f"data.{name} names column {err.args[0]!r}, which this row does not have; "
            f"columns: {', '.join(sorted(map(str, row)))}"
        ) from None
    except (IndexError, AttributeError, ValueError, TypeError) as err:
        raise RowError(f"data.{name} cannot be filled from this row ({err})") from None


def _where(name: str, column: str) -> str:
    return f"field '{name}'" + (f" (column '{column}')" if column != name else "")


def _text(row: dict[str, Any], name: str, cfg: DataConfig) -> str:
    """The string in the row's column for field ``name`` (numbers are accepted and printed;
    missing, null or another type is an error)."""
    value = _optional_text(row, name, cfg)
    if value is None:
        _missing(row, name, cfg.columns.get(name, name))
    return value


def _optional_text(row: dict[str, Any], name: str, cfg: DataConfig) -> str | None:
    column = cfg.columns.get(name, name)
    value = row.get(column)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # numeric answers (e.g. GSM8K-style) are common: printed
    raise RowError(f"{_where(name, column)} must be a string, got {type(value).__name__} {value!r:.60}")


def _missing(row: dict[str, Any], name: str, column: str) -> NoReturn:
    """Raise for a required field the row lacks, or has as null (``None``)."""
    if column in row:
        raise RowError(f"{_where(name, column)} is null; give it a value, or fix the row")
    present = ", ".join(sorted(map(str, row))) or "none"
    raise RowError(
        f"missing {_where(name, column)}; the row has: {present}. Map your column with data.columns, "
        "or fix the row"
    )


ROLES = ("system", "user", "assistant", "tool", "developer", "ipython")
"""The message roles a conversation may use: those common HF chat templates render (tool /
ipython: a tool's result; developer: OpenAI-style system turns). Anything else is a typo."""

_SHAREGPT_ROLES = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}


def _messages(row: dict[str, Any], cfg: DataConfig) -> list[dict[str, str]]:
    """OpenAI-style ``[{role, content}]`` (ShareGPT ``[{from, value}]`` is accepted too)."""
    column = cfg.columns.get("messages", "messages")
    value = row.get(column)
    if value is None:
        _missing(row, "messages", column)
    if not isinstance(value, list) or not value:
        raise RowError(
            f"'{column}' must be a non-empty list of {{role, content}} messages, got {value!r:.60}"
        )
    messages = [_message(m, i) for i, m in enumerate(value)]
    if not any(m["role"] == "assistant" for m in messages):
        roles = ", ".join(m["role"] for m in messages)
        raise RowError(f"conversation has no assistant message to learn from (roles: {roles})")
    _check_turns(messages)
    return messages


_SYSTEM_ROLES = ("system", "developer")
_TOOL_ROLES = ("tool", "ipython")


def _check_turns(messages: list[dict[str, str]]) -> None:
    """The order chat templates and models expect: system messages first, then user and assistant
    alternating (an assistant turn may be followed by tool results, then the assistant again),
    ending with the assistant's answer; no empty content except in a tool result."""
    previous: str | None = None
    for i, message in enumerate(messages):
        role = message["role"]
        if role not in _TOOL_ROLES and not message["content"].strip():
            raise RowError(f"message {i} ({role}) has empty content: fill it in or remove the message")
        if role in _SYSTEM_ROLES and previous not in (None, *_SYSTEM_ROLES):
            raise RowError(
                f"message {i} ({role}) comes after a {previous} message: a system message must be first"
            )
        if role == previous and role in ("user", "assistant"):
            raise RowError(
                f"messages {i - 1} and {i} are both {role} turns: user and assistant turns must alternate "
                "(merge the two messages into one)"
            )
        if role == "user" and previous in _TOOL_ROLES:
            raise RowError(f"message {i} (user) follows a {previous} result that no assistant turn answers")
        if role == "assistant" and previous in (None, *_SYSTEM_ROLES):
            raise RowError(
                f"message {i} (assistant) comes before any user message: after the system message a "
                "conversation starts with a user turn"
            )
        if role in _TOOL_ROLES and previous not in ("assistant", *_TOOL_ROLES):
            raise RowError(
                f"message {i} ({role}) follows {previous or 'nothing'}: a tool result follows the "
                "assistant message that called the tool"
            )
        previous = role
    if previous != "assistant":
        raise RowError(
            f"the conversation ends with a {previous} message: a training row ends with the assistant's "
            "answer (remove the trailing message, or add the answer)"
        )


def _message(message: Any, index: int) -> dict[str, str]:
    if not isinstance(message, dict):
        raise RowError(f"message {index} must be an object with role and content, got {message!r:.60}")
    if "role" in message:
        role, content = message.get("role"), message.get("content")
    elif "from" in message:
        role, content = _SHAREGPT_ROLES.get(message["from"], message["from"]), message.get("value")
    else:
        raise RowError(f"message {index} has no 'role' (keys: {', '.join(sorted(map(str, message)))})")
    if not isinstance(role, str) or not role:
        raise RowError(f"message {index}: role must be a non-empty string, got {role!r}")
    if role not in ROLES:
        sharegpt = "" if "role" in message else f"; ShareGPT 'from': {', '.join(_SHAREGPT_ROLES)}"
        raise RowError(
            f"unknown role {role!r} in message {index} (expected one of: {', '.join(ROLES)}{sharegpt})"
        )
    if isinstance(content, list):  # OpenAI content parts: keep the text parts
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
            raise RowError(f"message {index}: only text content parts are supported")
        content = "".join(parts)
    if not isinstance(content, str):
        raise RowError(f"message {index} ({role}): content must be a string, got {content!r:.60}")
    return {"role": role, "content": content}
