"""``evaluation.general``: perplexity on general text before and after fine-tuning.

Fine-tuning teaches a task and may cost the model some of what it knew (catastrophic forgetting,
what users of full fine-tuning fear most). The held-out task metrics cannot show it; the loss on
ordinary text the run never trained on can. ``builtin`` is peftkit's own general English text
(``data/general_text.py``); a ``.txt`` file is read as paragraphs separated by blank lines, a
``.jsonl`` file as one ``{"text": ...}`` object per line. Every paragraph or row is tokenized
whole (with the tokenizer's special tokens) and cut into pieces of at most ``max_len`` tokens; the
loss is taken on every token, weighted per token, by the same function as validation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftkit.errors import DataError, not_utf8_message

BUILTIN = "builtin"
DEFAULT_MAX_LEN = 512


@dataclass
class TextPiece:
    """A piece of general text, as :func:`peftkit.evaluation.evaluate_loss` reads an example."""

    input_ids: list[int]
    labels: list[int]
    origin: str


def source_problem(source: str | None, key: str = "evaluation.general") -> str | None:
    """What is wrong with ``source`` (None: nothing), before any model loads."""
    if source is None or source == BUILTIN:
        return None
    path = Path(source).expanduser()
    if not path.is_file():
        return (
            f"'{key}': {source} is not a file; use {BUILTIN!r} (peftkit's general text) or a .txt/.jsonl file"
        )
    if path.suffix not in (".txt", ".jsonl"):
        return f"'{key}': {source} must be a .txt file (paragraphs) or a .jsonl file ({{\"text\": ...}} per line)"
    return None


def read_texts(source: str) -> list[tuple[str, str]]:
    """``(origin, text)`` pairs of ``source``: ``builtin`` or a file (see the module docstring)."""
    if source == BUILTIN:
        from peftkit.data.general_text import PARAGRAPHS

        return [(f"builtin general text, paragraph {n}", p) for n, p in enumerate(PARAGRAPHS, start=1)]
    path = Path(source).expanduser()
    raw = path.read_bytes()
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"evaluation.general: {not_utf8_message(path, raw, err)}") from None
    texts: list[tuple[str, str]] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise DataError(f"{path}:{n}: not valid JSON ({err})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f'{path}:{n}: expected an object with a "text" string')
            if row["text"].strip():
                texts.append((f"{path}:{n}", row["text"]))
    else:
        start, paragraph = 0, []
        for n, line in enumerate([*lines, ""], start=1):
            if line.strip():
                start = start or n
                paragraph.append(line)
            elif paragraph:
                texts.append((f"{path}:{start}", "\n".join(paragraph)))
                start, paragraph = 0, []
    if not texts:
        raise DataError(f"evaluation.general: {path} holds no text")
    return texts


def general_pieces(source: str, tokenizer: Any, max_len: int | None = None) -> list[TextPiece]:
    """The tokenized pieces of ``source``, each at most ``max_len`` tokens (and at least 2)."""
    max_len = max_len or DEFAULT_MAX_LEN
    pieces = []
    for origin, text in read_texts(source):
        ids = tokenizer(text)["input_ids"]
        for start in range(0, len(ids), max_len):
            chunk = ids[start : start + max_len]
            if len(chunk) > 1:  # one token predicts nothing
                pieces.append(TextPiece(chunk, list(chunk), origin))
    return pieces


def general_perplexity(
    model: Any,
    tokenizer: Any,
    source: str,
    *,
    batch_size: int,
    max_len: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """``{"loss", "perplexity", "tokens", "source"}`` of ``model`` on ``source``'s text."""
    from peftkit.evaluation import evaluate_loss

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pieces = general_pieces(source, tokenizer, max_len)
    out = evaluate_loss(
        model, pieces, batch_size=batch_size, pad_token_id=pad, autocast_dtype=autocast_dtype, progress=False
    )
    return {**out, "source": source}


def forgetting_lines(general: dict[str, Any] | None) -> list[str]:
    """The report's line: general-text perplexity before -> after, and the change."""
    if not general or "before" not in general:
        return []
    before = general["before"]
    line = f"general text perplexity before: {before['perplexity']:.3f}"
    after = general.get("after")
    if after:
        change = after["perplexity"] / before["perplexity"] - 1
        line = (
            f"general text perplexity: {before['perplexity']:.3f} -> {after['perplexity']:.3f} "
            f"({change:+.1%}; {before['source']}, {after['tokens']} tokens): what the task cost the model "
            "on text it was not fine-tuned on"
        )
    return [line]
