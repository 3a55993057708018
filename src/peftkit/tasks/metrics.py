"""Task metrics: classification, token classification (NER) and SQuAD-style extractive QA.

Pure functions over plain Python sequences, so ``peftkit eval`` and the training loop score tasks
without scikit-learn, seqeval or the ``evaluate`` package (none is a dependency). Each function
reproduces one reference implementation's numbers exactly, named in its docstring::

    classification      predictions ─┐
                        references ──┴─> per-class tp/fp/fn ──> precision, recall, F1 ──> macro mean
    token classif.      [[tags]]    ───> flatten ──> token accuracy, token macro-F1
                                    └──> BIO chunks (type, start, end) ──> entity P / R / F1 (micro)
    extractive QA       answer text ───> normalise ──> exact match, bag-of-tokens F1 (max over golds)
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------


def _check_same_length(predictions: Sequence[Any], references: Sequence[Any]) -> None:
    """Scores pair predictions with references one to one; refuse lists that cannot be paired."""
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions for {len(references)} references; "
            "pass exactly one prediction per reference"
        )
    if len(references) == 0:
        raise ValueError("no predictions to score: pass at least one prediction/reference pair")


def _sorted_labels(labels: Iterable[Hashable]) -> list[Hashable]:
    """Labels in sorted order (as scikit-learn's ``unique_labels``), or first-seen order if unsortable."""
    unique = list(dict.fromkeys(labels))
    try:
        return sorted(unique)  # type: ignore[type-var]
    except TypeError:  # mixed types such as 1 and "x": keep a stable, reproducible order
        return unique


def accuracy(predictions: Sequence[Hashable], references: Sequence[Hashable]) -> float:
    """Fraction (0-1) of predictions equal to their reference (scikit-learn's ``accuracy_score``)."""
    _check_same_length(predictions, references)
    return sum(p == r for p, r in zip(predictions, references)) / len(references)


def per_class_scores(
    predictions: Sequence[Hashable],
    references: Sequence[Hashable],
    labels: Sequence[Hashable] | None = None,
) -> dict[Hashable, dict[str, float]]:
    """Precision, recall, F1 (0-1) and support (count in ``references``) for each label.

    ``labels`` picks the classes and their order; by default every label seen in references or
    predictions, sorted. A ratio whose denominator is 0 (a class never predicted, or never present)
    counts as 0, as scikit-learn's ``precision_recall_fscore_support(zero_division=0)``. F1 is
    ``2 tp / (2 tp + fp + fn)``, the same number as ``2 P R / (P + R)`` without its 0/0 case.
    """
    _check_same_length(predictions, references)
    classes = (
        list(dict.fromkeys(labels)) if labels is not None else _sorted_labels([*references, *predictions])
    )
    true_pos: Counter[Hashable] = Counter()
    pred_count: Counter[Hashable] = Counter(predictions)
    ref_count: Counter[Hashable] = Counter(references)
    for pred, ref in zip(predictions, references):
        if pred == ref:
            true_pos[ref] += 1
    scores: dict[Hashable, dict[str, float]] = {}
    for label in classes:
        tp, n_pred, n_ref = true_pos[label], pred_count[label], ref_count[label]
        f1_denominator = n_pred + n_ref  # = 2 tp + fp + fn
        scores[label] = {
            "precision": tp / n_pred if n_pred else 0.0,
            "recall": tp / n_ref if n_ref else 0.0,
            "f1": 2 * tp / f1_denominator if f1_denominator else 0.0,
            "support": n_ref,
        }
    return scores


def macro_f1(
    predictions: Sequence[Hashable],
    references: Sequence[Hashable],
    labels: Sequence[Hashable] | None = None,
) -> float:
    """Unweighted mean of per-class F1 (0-1): scikit-learn's ``f1_score(average="macro", zero_division=0)``.

    The mean runs over ``labels`` when given (a listed class absent from both lists scores 0 and
    pulls the mean down, as in scikit-learn), else over every label seen in references or predictions.
    """
    scores = per_class_scores(predictions, references, labels)
    if not scores:
        raise ValueError("labels is empty: list at least one class to average F1 over")
    return sum(s["f1"] for s in scores.values()) / len(scores)


# ---------------------------------------------------------------------------------------------
# Token classification
# ---------------------------------------------------------------------------------------------

_BIO_TAG = re.compile(r"^(O|[BI]-.+)$")


def _looks_like_bio(tags: Iterable[str]) -> bool:
    """Whether every tag is ``O``, ``B-<type>`` or ``I-<type>`` (the IOB2 scheme seqeval reads)."""
    return all(isinstance(tag, str) and _BIO_TAG.match(tag) is not None for tag in tags)


def bio_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entities ``(type, start, end)`` (inclusive token indices) of one BIO-tagged sequence.

    seqeval's default (non-strict) chunking: ``B-X`` always starts an entity; ``I-X`` continues the
    entity before it when that entity has type X, else starts a new one (so ``O I-PER`` and
    ``B-LOC I-PER`` each hold a PER entity); ``O`` or a type change ends the current entity.
    """
    entities: list[tuple[str, int, int]] = []
    current_type: str | None = None  # type of the entity the previous token belongs to
    begin = 0
    for i, tag in enumerate([*tags, "O"]):  # the sentinel closes an entity running to the end
        prefix, kind = (tag, None) if tag == "O" else (tag[0], tag[2:])
        continues = prefix == "I" and kind == current_type
        if current_type is not None and not continues:
            entities.append((current_type, begin, i - 1))
        if kind is not None and not continues:
            begin = i
        current_type = kind
    return entities


def token_classification_scores(
    predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Scores for per-token tags, one tag list per sentence/example (all values 0-1).

    Always: ``token_accuracy`` and ``macro_f1`` over the tag classes (every tag seen, ``O`` included)
    counted token by token. When every tag looks like BIO/IOB2 (``B-X``, ``I-X``, ``O``) also the
    entity-level ``entity_precision``, ``entity_recall`` and ``entity_f1`` of seqeval's default mode:
    an entity is (type, start, end) within its sentence, it counts as correct only when the predicted
    one matches exactly, and the scores are micro-averaged over all entities. As in seqeval, a ratio
    with nothing to count (no predicted or no gold entity, e.g. all-``O`` data) is 0.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predicted tag sequences for {len(references)} reference sequences; "
            "pass one predicted sequence per reference sequence"
        )
    flat_pred: list[str] = []
    flat_ref: list[str] = []
    for index, (pred, ref) in enumerate(zip(predictions, references)):
        if isinstance(pred, str) or isinstance(ref, str):
            raise TypeError(f"sequence {index} is a string; pass each example's tags as a list of strings")
        if len(pred) != len(ref):
            raise ValueError(
                f"sequence {index} has {len(pred)} predicted tags but {len(ref)} reference tags; "
                "predict exactly one tag per reference token"
            )
        flat_pred.extend(pred)
        flat_ref.extend(ref)
    if not flat_ref:
        raise ValueError("no tokens to score: every sequence is empty")

    scores = {"token_accuracy": accuracy(flat_pred, flat_ref), "macro_f1": macro_f1(flat_pred, flat_ref)}
    if _looks_like_bio(flat_pred) and _looks_like_bio(flat_ref):
        predicted = {(i, *e) for i, seq in enumerate(predictions) for e in bio_entities(seq)}
        gold = {(i, *e) for i, seq in enumerate(references) for e in bio_entities(seq)}
        correct = len(predicted & gold)
        precision = correct / len(predicted) if predicted else 0.0
        recall = correct / len(gold) if gold else 0.0
        scores["entity_precision"] = precision
        scores["entity_recall"] = recall
        scores["entity_f1"] = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return scores


# ---------------------------------------------------------------------------------------------
# Extractive QA (SQuAD v1.1)
# ---------------------------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def squad_normalize(text: str) -> str:
    """The official SQuAD v1.1 ``normalize_answer``: lower-case, drop ASCII punctuation, drop the
    articles a/an/the (whole words), collapse whitespace -- in that order, so "The U.S.A." -> "usa".
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _as_gold_list(gold_answers: str | Sequence[str] | Mapping[str, Any]) -> list[str]:
    """A single gold string is one answer, not a list of characters; a SQuAD ``answers`` record
    (``{"text": [...], "answer_start": [...]}``) gives its texts; an empty list has no max.
    """
    if isinstance(gold_answers, Mapping):
        if "text" not in gold_answers:
            raise ValueError(f"gold answers {gold_answers!r} have no 'text' key; pass answer strings")
        gold_answers = gold_answers["text"]
    golds = [gold_answers] if isinstance(gold_answers, str) else list(gold_answers)
    if not golds:
        raise ValueError(
            "gold_answers is empty: SQuAD v1.1 scoring needs at least one gold answer per question "
            "(drop unanswerable questions before scoring)"
        )
    return golds


def _token_f1(prediction: str, gold: str) -> float:
    """Bag-of-tokens F1 of two answers after normalisation (0 when they share no token)."""
    pred_tokens = squad_normalize(prediction).split()
    gold_tokens = squad_normalize(gold).split()
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_exact_match(prediction: str, gold_answers: str | Sequence[str] | Mapping[str, Any]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    pred = squad_normalize(prediction)
    return float(any(pred == squad_normalize(gold) for gold in _as_gold_list(gold_answers)))


def squad_f1(prediction: str, gold_answers: str | Sequence[str] | Mapping[str, Any]) -> float:
    """Best token-level F1 (0-1) of the prediction against any gold answer (official v1.1 script)."""
    return max(_token_f1(prediction, gold) for gold in _as_gold_list(gold_answers))


def squad_scores(
    predictions: Sequence[str], gold_answer_lists: Sequence[str | Sequence[str] | Mapping[str, Any]]
) -> dict[str, float]:
    """``{"exact_match", "f1"}`` averaged over questions, in PERCENT (0-100) like the official script.

    ``gold_answer_lists[i]`` holds every accepted answer to question ``i`` (SQuAD's ``answers["text"]``,
    or the ``answers`` record itself); each question scores its best match among them.
    """
    _check_same_length(predictions, gold_answer_lists)
    exact = sum(squad_exact_match(p, g) for p, g in zip(predictions, gold_answer_lists))
    f1 = sum(squad_f1(p, g) for p, g in zip(predictions, gold_answer_lists))
    return {"exact_match": 100.0 * exact / len(predictions), "f1": 100.0 * f1 / len(predictions)}
