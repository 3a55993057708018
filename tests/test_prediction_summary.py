"""Summaries that say what an accuracy means: majority baseline, spread, collapse, recall."""

from __future__ import annotations

import pytest

from peftkit.answer_match import match_flags
from peftkit.prediction_summary import (
    ClassRecall,
    MajorityBaseline,
    PredictionSpread,
    class_recall,
    collapse_warning,
    majority_baseline,
    prediction_spread,
    summarise_predictions,
    summary_lines,
)


def _collapsed_case() -> tuple[list[str], list[str], list[bool]]:
    """The reported run: the model answers "10" to all 200 questions; 21 of them (10.5%) expect it."""
    answers = ["10"] * 21 + [str(100 + i) for i in range(179)]
    predictions = ["10"] * len(answers)
    return predictions, answers, match_flags(predictions, answers)


def _healthy_case() -> tuple[list[str], list[str], list[bool]]:
    answers = ["negative"] * 6 + ["positive"] * 4
    predictions = ["Negative"] * 4 + ["positive"] * 2 + ["positive"] * 3 + ["negative"]
    return predictions, answers, match_flags(predictions, answers)


def test_collapse_to_one_answer_is_reported_with_the_numbers():
    predictions, answers, correct = _collapsed_case()
    assert sum(correct) / len(correct) == pytest.approx(0.105)
    warning = collapse_warning(predictions, answers, correct)
    assert warning == (
        "the model answered '10' for 100% of inputs, but '10' is the expected answer for only 10.5%: "
        "accuracy 0.105, and always answering '10' scores 0.105; it likely collapsed to one answer"
    )


def test_healthy_predictions_get_no_warning():
    assert collapse_warning(*_healthy_case()) is None


def test_a_dominant_prediction_that_is_also_the_dominant_answer_is_no_collapse():
    answers = ["no"] * 70 + ["yes"] * 30
    predictions = ["no"] * 75 + ["yes"] * 25
    assert collapse_warning(predictions, answers, match_flags(predictions, answers)) is None


def test_collapse_thresholds():
    answers = ["a"] * 3 + ["b"] * 7  # "a" expected for 30%
    predictions = ["a"] * 6 + ["b"] * 4  # "a" predicted for 60%: 30% is not below half of 60%
    correct = match_flags(predictions, answers)
    assert collapse_warning(predictions, answers, correct) is None
    assert collapse_warning(predictions, answers, correct, ratio=0.6) is not None
    assert collapse_warning(predictions, answers, correct, min_share=0.6, ratio=0.6) is None


def test_collapse_scores_the_top_prediction_with_the_evaluations_mode():
    answers = ["7"] * 8 + ["3"] * 2
    predictions = ["7."] * 10  # as text '7.' is never an answer; as a number it is 80% of them
    assert collapse_warning(predictions, answers, match_flags(predictions, answers, "exact"), mode="exact")
    assert (
        collapse_warning(predictions, answers, match_flags(predictions, answers, "number"), mode="number")
        is None
    )


def test_majority_baseline_and_spread():
    predictions, answers, _ = _healthy_case()
    assert majority_baseline(answers) == MajorityBaseline("negative", 0.6)
    assert prediction_spread(predictions) == PredictionSpread(2, "Negative", 0.5)  # case-folded groups
    assert prediction_spread(["a", "b", "c", "b"]) == PredictionSpread(3, "b", 0.5)


def test_class_recall_for_label_like_answers():
    predictions, answers, correct = _healthy_case()
    recall = class_recall(answers, correct)
    assert recall == [ClassRecall("negative", 4, 6), ClassRecall("positive", 3, 4)]
    assert recall[1].recall == 0.75


def test_no_class_recall_for_free_form_answers():
    _, answers, correct = _collapsed_case()
    assert class_recall(answers, correct) is None  # 180 distinct answers
    assert class_recall(["a", "b", "c", "a"], [True] * 4) is None  # answers barely repeat
    many = [str(i % 21) for i in range(210)]  # 21 labels, each 10 times: more than 20
    assert class_recall(many, [True] * 210) is None
    assert class_recall(many, [True] * 210, max_classes=21) is not None


def test_summary_lines_healthy():
    summary = summarise_predictions(*_healthy_case())
    assert summary.collapse is None
    assert summary_lines(summary) == [
        "majority baseline 0.600 ('negative'); predictions: 2 distinct, most common 'Negative' 50%",
        "recall per answer: 'negative' 4/6 (0.67), 'positive' 3/4 (0.75)",
    ]


def test_summary_lines_collapsed():
    lines = summary_lines(summarise_predictions(*_collapsed_case()))
    assert lines[0] == "majority baseline 0.105 ('10'); predictions: 1 distinct, most common '10' 100%"
    assert len(lines) == 2 and lines[1].startswith("warning: the model answered '10' for 100% of inputs")


def test_inputs_must_pair_up_and_not_be_empty():
    with pytest.raises(ValueError, match="pair up"):
        summarise_predictions(["a"], ["a", "b"], [True])
    with pytest.raises(ValueError, match="no answers"):
        summarise_predictions([], [], [])
