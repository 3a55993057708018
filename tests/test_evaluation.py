"""Evaluation: token-weighted loss against a hand computation, batched generation, answer matching."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from peftkit.answer_match import MatchOptions
from peftkit.evaluation import (
    IGNORE_INDEX,
    GenerationSample,
    answer_accuracy,
    evaluate_generation,
    evaluate_loss,
    generate_answers,
    generate_completions,
)

pytestmark = pytest.mark.usefixtures("single_thread")

TEXTS = [
    ("Translate to French: hello world.", " bonjour le monde."),
    ("Sentiment?", " positive"),
    ("The quick brown fox jumps over the lazy dog. Label:", " negative sentiment tweet"),
    ("0123", " 456789 !?"),
    ("abc", " ABCDEFGHIJ"),
]


@dataclass
class Row:
    input_ids: list[int]
    labels: list[int]
    origin: str
    prompt_ids: list[int]
    answer: str | None


def make_rows(tokenizer) -> list[Row]:
    rows = []
    for n, (prompt, answer) in enumerate(TEXTS):
        prompt_ids = tokenizer(prompt)["input_ids"]
        answer_ids = tokenizer(answer)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(
            Row(
                input_ids=prompt_ids + answer_ids,
                labels=[IGNORE_INDEX] * len(prompt_ids) + answer_ids,  # loss on the answer only
                origin=f"test.jsonl:{n + 1}",
                prompt_ids=prompt_ids,
                answer=answer.strip(),
            )
        )
    return rows


def hand_loss(model, rows: list[Row]) -> tuple[float, int]:
    """Sum of per-token cross-entropies over every row, one unpadded row at a time."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in rows:
            logits = model(torch.tensor([row.input_ids])).logits[0]  # (seq, vocab)
            for t in range(len(row.input_ids) - 1):
                target = row.labels[t + 1]
                if target != IGNORE_INDEX:
                    total += F.cross_entropy(logits[t], torch.tensor(target)).item()
                    tokens += 1
    return total / tokens, tokens


def test_evaluate_loss_is_token_weighted_and_padding_free(tiny_llama, tiny_tokenizer):
    rows = make_rows(tiny_tokenizer)
    assert len({len(r.input_ids) for r in rows}) > 1, "rows must differ in length to exercise padding"
    expected, tokens = hand_loss(tiny_llama, rows)
    pad = tiny_tokenizer.pad_token_id
    one = evaluate_loss(tiny_llama, rows, batch_size=1, pad_token_id=pad)
    three = evaluate_loss(tiny_llama, rows, batch_size=3, pad_token_id=pad)
    everything = evaluate_loss(tiny_llama, rows, batch_size=len(rows), pad_token_id=pad)
    for result in (one, three, everything):
        assert result["tokens"] == tokens
        assert result["loss"] == pytest.approx(expected, abs=1e-5)
        assert result["perplexity"] == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-5)
    # The mean of per-batch means would weight the short batch's tokens more: make sure it differs,
    # so the equality above really tests token weighting.
    per_batch = [
        evaluate_loss(tiny_llama, rows[i : i + 3], batch_size=3, pad_token_id=pad)["loss"] for i in (0, 3)
    ]
    assert abs(sum(per_batch) / 2 - expected) > 1e-3


def test_evaluate_loss_under_a_soft_prompt_skips_the_virtual_positions(tiny_tokenizer):
    """Prompt tuning prepends virtual tokens to the logits; the loss is on the real tokens (as the
    model's own loss with labels computes it). `peftkit eval` and validation crashed here before."""
    from conftest import make_tiny_llama
    from peftkit import PromptTuningConfig, get_peft_model

    model = get_peft_model(make_tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    rows = make_rows(tiny_tokenizer)
    result = evaluate_loss(model, rows, batch_size=2, pad_token_id=tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        own = [
            model(input_ids=torch.tensor([r.input_ids]), labels=torch.tensor([r.labels])).loss for r in rows
        ]
    counts = [sum(label != IGNORE_INDEX for label in r.labels[1:]) for r in rows]
    expected = sum(loss.item() * n for loss, n in zip(own, counts)) / sum(counts)
    assert result["tokens"] == sum(counts) and result["loss"] == pytest.approx(expected, abs=1e-5)


def test_evaluate_loss_restores_training_mode(tiny_llama, tiny_tokenizer):
    tiny_llama.train()
    evaluate_loss(tiny_llama, make_rows(tiny_tokenizer), batch_size=2, pad_token_id=0)
    assert tiny_llama.training
    assert all(p.grad is None for p in tiny_llama.parameters())


def test_evaluate_loss_with_bf16_autocast_is_close(tiny_llama, tiny_tokenizer):
    rows = make_rows(tiny_tokenizer)
    full = evaluate_loss(tiny_llama, rows, batch_size=2, pad_token_id=0)
    mixed = evaluate_loss(tiny_llama, rows, batch_size=2, pad_token_id=0, autocast_dtype=torch.bfloat16)
    assert mixed["loss"] == pytest.approx(full["loss"], rel=0.02)


def test_evaluate_loss_reports_bad_rows(tiny_llama, tiny_tokenizer):
    rows = make_rows(tiny_tokenizer)
    rows[1].labels = rows[1].labels[:-1]
    with pytest.raises(ValueError, match=r"test.jsonl:2.*must align"):
        evaluate_loss(tiny_llama, rows, batch_size=2, pad_token_id=0)
    masked = [
        Row(r.input_ids, [IGNORE_INDEX] * len(r.input_ids), r.origin, r.prompt_ids, None) for r in rows[:1]
    ]
    with pytest.raises(ValueError, match="no label token|has a label token"):
        evaluate_loss(tiny_llama, masked, batch_size=2, pad_token_id=0)
    with pytest.raises(ValueError, match="no examples"):
        evaluate_loss(tiny_llama, [], batch_size=2, pad_token_id=0)


def one_at_a_time(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> str:
    """Reference: plain unpadded greedy generation of a single prompt."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=2,
        )
    new = out[0, len(prompt_ids) :].tolist()
    if 2 in new:
        new = new[: new.index(2)]
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def test_left_padded_batches_match_one_at_a_time(tiny_llama, tiny_tokenizer):
    rows = make_rows(tiny_tokenizer)
    expected = [one_at_a_time(tiny_llama, tiny_tokenizer, r.prompt_ids, 12) for r in rows]
    assert len(set(expected)) > 1
    for batch_size in (1, 2, len(rows)):
        got = generate_answers(tiny_llama, tiny_tokenizer, rows, max_new_tokens=12, batch_size=batch_size)
        assert got == expected, f"batch_size={batch_size}"


def test_generation_stops_at_eos(tiny_llama, tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    # Make eos the greedy choice everywhere: every answer must come back empty, eos not decoded.
    tiny_llama.lm_head.register_forward_hook(
        lambda module, args, out: out.index_fill(-1, torch.tensor([eos]), 1e4)
    )
    rows = make_rows(tiny_tokenizer)
    assert generate_answers(tiny_llama, tiny_tokenizer, rows, max_new_tokens=5, batch_size=2) == [""] * len(
        rows
    )


def test_generate_completions_rejects_empty_prompt(tiny_llama, tiny_tokenizer):
    with pytest.raises(ValueError, match="empty prompt"):
        generate_completions(tiny_llama, tiny_tokenizer, [[5, 6], []], max_new_tokens=2)


@pytest.mark.parametrize(
    "prediction, answer, match, expected",
    [
        ("Positive.", "positive", "first_word", True),
        ("positive sentiment overall", "Positive", "first_word", True),
        ("**Negative**", "negative", "first_word", True),
        ("Paris, France", "Paris", "first_word", True),
        ("The answer is positive", "positive", "first_word", False),
        ("don't know", "don't", "first_word", True),
        ("", "positive", "first_word", False),
        ("  Paris   is nice ", "paris IS nice", "exact", True),
        ("Paris, France", "Paris", "exact", False),
        ("I think it is Paris.", "paris", "contains", True),
        ("London", "paris", "contains", False),
        ("5", "-5", "first_word", False),  # the reported bugs, through answer_accuracy
        ("1,234", "1234", "first_word", True),
        ("15", "5", "contains", False),
    ],
)
def test_answer_matching(prediction, answer, match, expected):
    assert answer_accuracy([prediction], [answer], match=match) == float(expected)


def test_answer_accuracy_averages_and_validates():
    assert answer_accuracy(["yes", "no", "yes.", "maybe"], ["Yes", "yes", "yes", "maybe"]) == 0.75
    with pytest.raises(ValueError, match="pair up"):
        answer_accuracy(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="first_word, exact, contains, first_line, number, regex, choice"):
        answer_accuracy(["a"], ["a"], match="fuzzy")
    with pytest.raises(ValueError, match="at least one"):
        answer_accuracy([], [])


def test_evaluate_generation_scores_and_keeps_samples(tiny_llama, tiny_tokenizer):
    rows = make_rows(tiny_tokenizer)
    predictions = generate_answers(tiny_llama, tiny_tokenizer, rows, max_new_tokens=6, batch_size=5)
    rows[0].answer = predictions[0]  # these two will match exactly
    rows[1].answer = predictions[1]
    rows[4].answer = None  # skipped: nothing to compare with
    result = evaluate_generation(
        tiny_llama, tiny_tokenizer, rows, max_new_tokens=6, batch_size=2, match="exact"
    )
    assert result["n"] == 4
    assert result["accuracy"] == pytest.approx(2 / 4)
    first = result["samples"][0]
    assert isinstance(first, GenerationSample) and first.prediction == predictions[0]
    assert first.prompt == tiny_tokenizer.decode(rows[0].prompt_ids)
    prompt, prediction, answer, correct = result["samples"][1]  # unpacks as a plain 4-tuple
    assert (prediction, answer, correct) == (predictions[1], predictions[1], True)
    assert [sample.correct for sample in result["samples"]].count(True) == 2  # one flag per sample


def test_evaluate_generation_passes_match_options(tiny_llama, tiny_tokenizer):
    rows = make_rows(tiny_tokenizer)
    predictions = generate_answers(tiny_llama, tiny_tokenizer, rows, max_new_tokens=4, batch_size=5)
    for row, prediction in zip(rows, predictions):
        row.answer = prediction.swapcase()
    cased = MatchOptions(case_sensitive=True)
    result = evaluate_generation(tiny_llama, tiny_tokenizer, rows, max_new_tokens=4, match="exact")
    assert result["accuracy"] == 1.0
    result = evaluate_generation(
        tiny_llama, tiny_tokenizer, rows, max_new_tokens=4, match="exact", match_options=cased
    )
    differs = [p != p.swapcase() for p in predictions]  # predictions with letters change case
    assert [s.correct for s in result["samples"]] == [not d for d in differs] and any(differs)
    with pytest.raises(ValueError, match="pattern is required"):
        evaluate_generation(tiny_llama, tiny_tokenizer, rows, max_new_tokens=4, match="regex")


def test_evaluate_generation_needs_answers(tiny_llama, tiny_tokenizer):
    rows = make_rows(tiny_tokenizer)
    for row in rows:
        row.answer = None
    with pytest.raises(ValueError, match="expected answer"):
        evaluate_generation(tiny_llama, tiny_tokenizer, rows, max_new_tokens=2)


def test_causal_lm_held_out_rows_without_answers_get_loss_not_accuracy(tiny_llama, tiny_tokenizer):
    """The text format has no expected answers: ``peftkit train`` measures loss and perplexity on
    its test split, with a note, instead of failing after training."""
    from peftkit.tasks.causal_lm import CausalLMTask
    from peftkit.train.config import EvaluationConfig

    rows = make_rows(tiny_tokenizer)
    for row in rows:
        row.answer = None
    task = CausalLMTask()
    out = task.evaluate(tiny_llama, tiny_tokenizer, rows, eval_cfg=EvaluationConfig(), autocast_dtype=None)
    expected = evaluate_loss(tiny_llama, rows, batch_size=2, pad_token_id=tiny_tokenizer.pad_token_id)
    assert out["loss"] == pytest.approx(expected["loss"]) and out["tokens"] == expected["tokens"]
    assert out["n"] == len(rows) and out["samples"] == [] and "accuracy" not in out
    note = "accuracy by generation skipped: the held-out rows have no expected answers"
    assert task.metric_lines(out)[0].startswith("loss ") and task.metric_lines(out)[-1].startswith(note)
    report = task.report_lines({"before": out, "after": out})
    assert report[0].startswith("held-out loss before: ") and report[1].startswith("held-out loss after:  ")
    assert len(report) == 3 and report[2].startswith(
        note
    )  # the note once, no empty "sample predictions" header


class Wrapper(torch.nn.Module):
    """An adapter-style wrapper with explicit delegation of forward and generate."""

    def __init__(self, model):
        super().__init__()
        self.base_model = model

    def forward(self, **kwargs):
        return self.base_model(**kwargs)

    def generate(self, **kwargs):
        return self.base_model.generate(**kwargs)


def test_wrappers_with_the_same_api_work(tiny_llama, tiny_tokenizer):
    rows = make_rows(tiny_tokenizer)
    wrapped = Wrapper(tiny_llama)
    assert evaluate_loss(wrapped, rows, batch_size=2, pad_token_id=0) == evaluate_loss(
        tiny_llama, rows, batch_size=2, pad_token_id=0
    )
    assert generate_answers(wrapped, tiny_tokenizer, rows, max_new_tokens=4) == generate_answers(
        tiny_llama, tiny_tokenizer, rows, max_new_tokens=4
    )
