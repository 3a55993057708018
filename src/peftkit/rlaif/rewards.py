"""Ready-made reward functions for verifiable answers, named in a config as
``peftkit.rlaif.rewards:NAME``::

    data: {train: builtin:arithmetic}              # rows {prompt, answer}
    reward:
      functions: [peftkit.rlaif.rewards:exact_answer, peftkit.rlaif.rewards:number_format]
      weights: [1.0, 0.2]

Each has TRL's signature ``fn(prompts, completions, **columns) -> list[float | None]``: one row per
answer, ``completions`` as text or as ``[{"role": "assistant", "content": ...}]`` (chat prompts),
the data's other columns as keyword arguments. Numbers are read as :mod:`peftkit.answer_match`
reads them (Unicode NFKC, the typographic minus "−" is "-", thousands commas, decimals).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from peftkit.answer_match import first_number, matches

__all__ = ["exact_answer", "number_format"]

# A whole answer that is one number: a sign, digits (thousands commas in groups of three), an
# optional decimal part; an optional trailing period; whitespace around.
_JUST_A_NUMBER = re.compile(r"\s*[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?\.?\s*")


def completion_text(completion: Any) -> str:
    """An answer as text: a string as it is; a list of messages (chat prompts): the last one's
    content; None: ""."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    if completion:
        return completion_text(completion[-1])
    return ""


def exact_answer(
    prompts: list[Any], completions: list[Any], answer: list[Any] | None = None, **_: Any
) -> list[float | None]:
    """1.0 when the answer's FIRST number equals the row's ``answer`` column numerically
    (:mod:`peftkit.answer_match`'s ``number`` mode), else 0.0; None (not scored) for a row whose
    ``answer`` is empty or None. An answer that restates the question first ("17 - 25 = -8")
    reads 17, so it is wrong: the reward asks for the result first.

    >>> exact_answer(["What is 17 - 25?"] * 5, ["-8", " −8.", "It is -8", "17 - 25 = -8", "8"],
    ...              answer=["-8"] * 5)
    [1.0, 1.0, 1.0, 0.0, 0.0]
    >>> exact_answer(["1,000 + 234?", "?"], ["1,234", "4"], answer=[1234, None])
    [1.0, None]

    Raises ValueError when the data has no ``answer`` column, or an answer holds no number.
    """
    if answer is None:
        raise ValueError(
            "exact_answer needs an 'answer' column in the data (the expected number of each prompt)"
        )
    out: list[float | None] = []
    for completion, expected in zip(completions, answer):
        expected_text = "" if expected is None else str(expected)
        if not expected_text.strip():
            out.append(None)
            continue
        if first_number(expected_text) is None:
            raise ValueError(f"exact_answer: the expected answer {expected_text!r} contains no number")
        out.append(1.0 if matches(completion_text(completion), expected_text, "number") else 0.0)
    return out


def number_format(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    """1.0 when the whole answer is one number (whitespace around it and a trailing period
    allowed), else 0.0: a small bonus that teaches "Answer with the number only".

    >>> number_format(["?"] * 6, ["-8", " 42.\\n", "1,234", "3.5", "The answer is 8", "4 5"])
    [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    """
    return [1.0 if _JUST_A_NUMBER.fullmatch(_normalise(completion_text(c))) else 0.0 for c in completions]


def _normalise(text: str) -> str:
    return unicodedata.normalize("NFKC", text).replace("\u2212", "-")
