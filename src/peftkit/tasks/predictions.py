"""Per-example predictions and their summary, for every task whose evaluation compares a predicted
text or label with an expected one (causal LM by generation, classification, seq2seq).

Each task's ``evaluate`` returns ``predictions`` (all records: written to ``predictions_*.jsonl``
by training and ``peftkit eval``, never into the results JSON) and ``summary`` / ``summary_lines``
(majority baseline, spread, collapse warning; see :mod:`peftkit.prediction_summary`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from peftkit.prediction_summary import summarise_predictions, summary_lines


def record(origin: str, prompt: Any, expected: Any, predicted: Any, correct: bool) -> dict[str, Any]:
    """One line of predictions*.jsonl."""
    return {
        "origin": origin,
        "prompt": prompt,
        "expected": expected,
        "predicted": predicted,
        "correct": correct,
    }


def input_text(tokenizer: Any, example: Any) -> str:
    """A non-LM example's input as text (its row keeps only token ids)."""
    return tokenizer.decode(example.input_ids, skip_special_tokens=True).strip()


def summarised(
    records: Sequence[dict[str, Any]], *, mode: str = "exact", options: Any = None, recall: bool = True
) -> dict[str, Any]:
    """``{"summary", "summary_lines"}`` of ``records``; ``recall=False`` where the task prints its
    own per-class scores."""
    summary = summarise_predictions(
        [str(r["predicted"]) for r in records],
        [str(r["expected"]) for r in records],
        [r["correct"] for r in records],
        mode=mode,
        options=options,
    )
    if not recall:
        summary = dataclasses.replace(summary, recall=None)
    return {"summary": summary_dict(summary), "summary_lines": summary_lines(summary)}


def summary_dict(summary: Any) -> dict[str, Any]:
    """A :class:`~peftkit.prediction_summary.PredictionSummary` as the results JSON keeps it."""
    return {
        "majority_answer": summary.majority.answer,
        "majority_baseline": summary.majority.accuracy,
        "distinct_predictions": summary.spread.distinct,
        "most_common_prediction": summary.spread.most_common,
        "most_common_share": summary.spread.share,
        "recall": None
        if summary.recall is None
        else {r.answer: {"correct": r.correct, "total": r.total, "recall": r.recall} for r in summary.recall},
        "collapse_warning": summary.collapse,
    }
