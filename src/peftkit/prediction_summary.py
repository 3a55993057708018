"""What an accuracy number means: the majority-answer baseline, how varied the predictions are,
whether the model collapsed to one answer, and recall per answer for label-like answer sets.

Pure functions over the predictions, the expected answers and the correct flags of an
evaluation (``evaluate_generation``'s samples carry all three); nothing here runs a model.
Answers and predictions are grouped after :func:`peftkit.answer_match.normalise` (whitespace,
case), and shown as first written.

    summary = summarise_predictions(predictions, answers, correct)
    for line in summary_lines(summary): print(line)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from peftkit.answer_match import MatchOptions, match_flags, normalise

COLLAPSE_SHARE = 0.5  # one prediction on more than this share of inputs is suspicious...
COLLAPSE_RATIO = 0.5  # ...when it is right for less than this fraction of that share
MAX_CLASSES = 20  # more distinct answers than this is not a label set
MIN_ROWS_PER_CLASS = 2.0  # nor is one where answers are, on average, not repeated


class MajorityBaseline(NamedTuple):
    """The most common expected answer (as first written) and the accuracy of always giving it."""

    answer: str
    accuracy: float


class PredictionSpread(NamedTuple):
    """How varied the predictions are: distinct ones, the most common one and its share."""

    distinct: int
    most_common: str
    share: float


class ClassRecall(NamedTuple):
    """How many rows expecting ``answer`` were answered correctly."""

    answer: str
    correct: int
    total: int

    @property
    def recall(self) -> float:
        return self.correct / self.total


@dataclass(frozen=True)
class PredictionSummary:
    """Everything :func:`summary_lines` prints; see the module docstring."""

    majority: MajorityBaseline
    spread: PredictionSpread
    recall: list[ClassRecall] | None  # None when the answers do not look like labels
    collapse: str | None  # the warning of :func:`collapse_warning`, if any


def majority_baseline(answers: Sequence[str]) -> MajorityBaseline:
    """The most common expected answer and the accuracy of always answering it.

    The accuracy is its share among the answers (grouped after normalisation); under a lenient
    match mode (number, contains) always answering it may score a little more.
    """
    return MajorityBaseline(*_most_common(_nonempty(answers, "answers")))


def prediction_spread(predictions: Sequence[str]) -> PredictionSpread:
    """How many distinct predictions there are, and the most common one with its share."""
    predictions = _nonempty(predictions, "predictions")
    return PredictionSpread(len({normalise(p) for p in predictions}), *_most_common(predictions))


def collapse_warning(
    predictions: Sequence[str],
    answers: Sequence[str],
    correct: Sequence[bool],
    *,
    mode: str = "first_word",
    options: MatchOptions | None = None,
    min_share: float = COLLAPSE_SHARE,
    ratio: float = COLLAPSE_RATIO,
) -> str | None:
    """A warning when one prediction X covers more than ``min_share`` of the inputs while X is
    right for less than ``ratio`` times that share (scored with the evaluation's ``mode`` and
    ``options``, so "10." counts as the answer "10" where the mode says so); else None."""
    _check_lengths(predictions, answers, correct)
    top = prediction_spread(predictions)
    if top.share <= min_share:
        return None
    always = match_flags([top.most_common] * len(answers), answers, mode, options)
    expected_share = sum(always) / len(answers)
    if expected_share >= ratio * top.share:
        return None
    accuracy = sum(correct) / len(correct)
    x = repr(_short(top.most_common))
    return (
        f"the model answered {x} for {_percent(top.share)} of inputs, but {x} is the expected answer "
        f"for only {_percent(expected_share)}: accuracy {accuracy:.3f}, and always answering {x} "
        f"scores {expected_share:.3f}; it likely collapsed to one answer"
    )


def class_recall(
    answers: Sequence[str],
    correct: Sequence[bool],
    *,
    max_classes: int = MAX_CLASSES,
    min_rows_per_class: float = MIN_ROWS_PER_CLASS,
) -> list[ClassRecall] | None:
    """Correct rows per distinct expected answer, most common answer first; None unless the
    answers look like labels (at most ``max_classes`` of them, each on average on at least
    ``min_rows_per_class`` rows)."""
    _check_lengths(answers, answers, correct)
    groups: dict[str, list[int]] = {}  # normalised answer -> [correct, total]
    written: dict[str, str] = {}
    for answer, flag in zip(answers, correct):
        key = normalise(answer)
        written.setdefault(key, answer)
        counts = groups.setdefault(key, [0, 0])
        counts[0] += bool(flag)
        counts[1] += 1
    if len(groups) > max_classes or len(answers) / len(groups) < min_rows_per_class:
        return None
    rows = [ClassRecall(written[key], right, total) for key, (right, total) in groups.items()]
    return sorted(rows, key=lambda row: -row.total)  # stable: ties keep first-seen order


def summarise_predictions(
    predictions: Sequence[str],
    answers: Sequence[str],
    correct: Sequence[bool],
    *,
    mode: str = "first_word",
    options: MatchOptions | None = None,
) -> PredictionSummary:
    """All of the above for one evaluation; ``mode`` / ``options`` are the evaluation's own."""
    _check_lengths(predictions, answers, correct)
    return PredictionSummary(
        majority=majority_baseline(answers),
        spread=prediction_spread(predictions),
        recall=class_recall(answers, correct),
        collapse=collapse_warning(predictions, answers, correct, mode=mode, options=options),
    )


def summary_lines(summary: PredictionSummary) -> list[str]:
    """One to three short lines: baseline and spread; recall per answer; the collapse warning."""
    majority, spread = summary.majority, summary.spread
    lines = [
        f"majority baseline {majority.accuracy:.3f} ({_short(majority.answer)!r}); predictions: "
        f"{spread.distinct} distinct, most common {_short(spread.most_common)!r} {_percent(spread.share)}"
    ]
    if summary.recall is not None:
        lines.append(
            "recall per answer: "
            + ", ".join(
                f"{_short(r.answer)!r} {r.correct}/{r.total} ({r.recall:.2f})" for r in summary.recall
            )
        )
    if summary.collapse is not None:
        lines.append(f"warning: {summary.collapse}")
    return lines


def _most_common(texts: Sequence[str]) -> tuple[str, float]:
    """The most common text (grouped after normalisation, as first written) and its share."""
    counts = Counter(normalise(t) for t in texts)
    key, count = counts.most_common(1)[0]  # ties: the first seen
    return next(t for t in texts if normalise(t) == key), count / len(texts)


def _nonempty(texts: Sequence[str], what: str) -> Sequence[str]:
    if not texts:
        raise ValueError(f"no {what} to summarise: the evaluation produced none")
    return texts


def _check_lengths(predictions: Sequence[str], answers: Sequence[str], correct: Sequence[bool]) -> None:
    if not len(predictions) == len(answers) == len(correct):
        raise ValueError(
            f"{len(predictions)} predictions, {len(answers)} answers and {len(correct)} correct flags: "
            "they must pair up"
        )
    _nonempty(answers, "answers")


def _percent(fraction: float) -> str:
    """60%, 10.5%, 33.3%: three significant digits at most."""
    return f"{fraction * 100:.3g}%"


def _short(text: str, limit: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
