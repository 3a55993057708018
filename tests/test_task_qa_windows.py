"""Extractive QA over long contexts: sliding windows in training and evaluation, and seq2seq's
generation budget.

What ``run_qa.py`` does is the reference: one feature per window of the context
(``return_overflowing_tokens``, ``stride=doc_stride``), each labelled with the answer's tokens when
the answer lies entirely inside the window, else [CLS] (0, 0); evaluation answers each example
with the best span over all of its windows and scores examples, not windows.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from peftkit.configuration import ConfigError
from peftkit.data import DataConfig, build_datasets, count_rows
from peftkit.errors import DataError
from peftkit.tasks import get_task
from test_tasks import _save_model, encode, make_bert_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

QUESTION = "where does jim live ?"  # 5 tokens; + [CLS] [SEP] [SEP]
MAX_LEN, STRIDE = 20, 4  # 20 - 5 - 3 = 12 context tokens per window, the next one starts 8 later


def long_row(before: int, after: int, answer: str = "paris") -> dict:
    """A context of ``before`` filler sentences, the answer sentence, ``after`` filler sentences."""
    head = "the plot was good . " * before + "jim henson lives in "
    context = head + answer + " ." + " the film was bad ." * after
    return {
        "question": QUESTION,
        "context": context,
        "answers": {"text": [answer], "answer_start": [len(head)]},
    }


@pytest.fixture(scope="module")
def bert_tok():
    return make_bert_tokenizer()


def context_chars(example):
    """Characters of the context this window covers: [first context token start, last one's end)."""
    spans = [o for o, s in zip(example.extra["offsets"], example.extra["sequence_ids"]) if s == 1]
    return spans[0][0], spans[-1][1]


def context_tokens(example):
    return [t for t, s in zip(example.input_ids, example.extra["sequence_ids"]) if s == 1]


# -- training features ---------------------------------------------------------------------------------


def test_long_context_is_split_into_labelled_windows(bert_tok):
    row = long_row(before=4, after=3)  # 20 + 7 + 16 = 43 context tokens: windows at 0, 8, 16, 24, 32
    _, examples = encode([row], "QUESTION_ANS", bert_tok, max_seq_len=MAX_LEN, doc_stride=STRIDE)
    n_context = len(bert_tok(row["context"], add_special_tokens=False)["input_ids"])
    room = MAX_LEN - 5 - 3
    assert len(examples) == 1 + -(-(n_context - room) // (room - STRIDE)) == 5
    assert [e.window for e in examples] == list(range(5))
    assert {e.origin for e in examples} == {"data.train[0]"}
    assert all(len(e.input_ids) <= MAX_LEN for e in examples)
    for a, b in zip(examples, examples[1:]):  # consecutive windows share doc_stride context tokens
        assert context_tokens(b)[:STRIDE] == context_tokens(a)[-STRIDE:]
    start = row["answers"]["answer_start"][0]
    labelled = []
    for e in examples:
        first, last = context_chars(e)
        inside = first <= start and start + len("paris") <= last
        if inside:
            s, t = e.target
            assert bert_tok.decode(e.input_ids[s : t + 1]) == "paris" and e.extra["sequence_ids"][s] == 1
            labelled.append(e.window)
        else:
            assert e.target == [0, 0]
    assert labelled == [2, 3]  # the answer (context token 24) is in the 3rd and 4th windows only


def test_max_train_examples_and_splits_count_rows_not_windows(bert_tok):
    rows = [long_row(before=i % 4, after=2) for i in range(10)]
    cfg = DataConfig(train=rows, max_seq_len=MAX_LEN, doc_stride=STRIDE, test_size=3, max_train_examples=4)
    task = get_task("QUESTION_ANS")
    data = build_datasets(cfg, bert_tok, seed=0, task=task)
    assert count_rows(data.train) == 4 and count_rows(data.test) == 3
    assert len(data.train) > 4 and len(data.test) > 3  # several windows per row
    for split in (data.train, data.test):  # every kept row keeps all of its windows
        groups: dict[str, list[int]] = {}
        for e in split:
            groups.setdefault(e.origin, []).append(e.window)
        for origin, windows in groups.items():
            n = len(bert_tok(rows[int(origin[11:-1])]["context"], add_special_tokens=False)["input_ids"])
            assert windows == list(range(1 + max(0, -(-(n - 12) // 8))))
    assert not {e.origin for e in data.train} & {e.origin for e in data.test}  # no row straddles
    smaller = build_datasets(
        DataConfig(train=rows, max_seq_len=MAX_LEN, doc_stride=STRIDE, test_size=3, max_train_examples=2),
        bert_tok,
        seed=0,
        task=get_task("QUESTION_ANS"),
    )
    assert {e.origin for e in smaller.train} <= {e.origin for e in data.train}  # a prefix, as for rows
    summary = data.summary()
    assert "examples: train 4, validation 0, test 3" in summary
    assert (
        f"windows (long contexts split into overlapping windows, see data.doc_stride): train {len(data.train)}, test {len(data.test)}"
        in summary
    )


def test_short_contexts_stay_one_window(bert_tok):
    _, examples = encode([long_row(0, 0)] * 3, "QUESTION_ANS", bert_tok)  # max_seq_len 1024
    assert [e.window for e in examples] == [0, 0, 0]


# -- doc_stride validation -----------------------------------------------------------------------------


def test_doc_stride_validation_says_what_to_change(bert_tok):
    assert DataConfig(doc_stride=0, max_seq_len=8, format="qa").validate() == []
    assert "'doc_stride' must be >= 0" in DataConfig(doc_stride=-1).validate()[0]
    (problem,) = DataConfig(format="qa", max_seq_len=64, doc_stride=64).validate()
    assert "must be smaller than 'max_seq_len' (64)" in problem and "lower data.doc_stride" in problem
    assert DataConfig(max_seq_len=64).validate() == []  # other formats ignore the QA-only default
    # format auto: the QA encoder checks it once the task is known
    with pytest.raises(ConfigError, match=r"'doc_stride' \(128\) must be smaller than 'max_seq_len' \(20\)"):
        encode([long_row(1, 1)], "QUESTION_ANS", bert_tok, max_seq_len=MAX_LEN)
    # the question leaves 12 context tokens per window: a stride of 12 cannot advance
    with pytest.raises(
        DataError,
        match=r"data\.train\[0\]: the question takes 5 tokens \(\+3 special\) .*"
        r"leaving 12 context tokens per window.*lower data.doc_stride below 12",
    ):
        encode([long_row(1, 1)], "QUESTION_ANS", bert_tok, max_seq_len=MAX_LEN, doc_stride=12)
    long_question = dict(long_row(1, 1), question="where does jim live " * 5 + "?")
    _, kept = encode(
        [long_question, long_row(1, 1)],
        "QUESTION_ANS",
        bert_tok,
        max_seq_len=MAX_LEN,
        doc_stride=4,
        skip_bad_rows=True,
    )
    assert {e.origin for e in kept} == {"data.train[1]"}


def test_doc_stride_yaml_key_and_help():
    from peftkit.configuration import field_help
    from peftkit.train.config import build_job_config

    assert build_job_config({"data": {"doc_stride": 32}}).data.doc_stride == 32
    assert build_job_config({}).data.doc_stride == 128  # run_qa.py's default
    with pytest.raises(ConfigError, match="did you mean 'doc_stride'"):
        build_job_config({"data": {"doc_strid": 32}})
    assert "overlapping windows" in field_help(DataConfig, "doc_stride")


# -- evaluation over windows ---------------------------------------------------------------------------


class PeakModel(torch.nn.Module):
    """A QA "model" whose start and end logits are ``scores[token id]`` (0 elsewhere): its answer
    is known in advance, whatever window the token falls in."""

    def __init__(self, scores: dict[int, float]):
        super().__init__()
        self.scores = scores
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        logits = torch.zeros(input_ids.shape)
        for token, score in self.scores.items():
            logits[input_ids == token] = score
        return SimpleNamespace(start_logits=logits, end_logits=logits.clone())


def test_evaluation_takes_the_best_span_over_an_examples_windows(bert_tok):
    rows = [long_row(before=5, after=0), long_row(before=0, after=0, answer="jim")]
    task, examples = encode(rows, "QUESTION_ANS", bert_tok, max_seq_len=MAX_LEN, doc_stride=STRIDE)
    groups = [[e.window for e in examples if e.origin == f"data.train[{i}]"] for i in range(2)]
    assert len(groups[0]) >= 3 and groups[1] == [0]
    paris, good, jim = bert_tok.convert_tokens_to_ids(["paris", "good", "jim"])
    # "paris" appears only in the last window of row 0; "good" (a lower peak) in its first windows
    assert [paris in e.input_ids for e in examples[: len(groups[0])]] == [False] * (len(groups[0]) - 1) + [
        True
    ]
    model = PeakModel({paris: 5.0, good: 2.0, jim: 1.0})
    cfg = SimpleNamespace(batch_size=2, show_samples=5)  # windows of one row straddle batches
    metrics = task.evaluate(model, bert_tok, examples, eval_cfg=cfg, autocast_dtype=None)
    # row 1 has no "paris": its best span is "jim", the 2nd best peak, which is its answer
    assert [s["prediction"] for s in metrics["samples"]] == ["paris", "jim"]
    assert metrics["exact_match"] == 100.0 and metrics["f1"] == 100.0
    assert metrics["n"] == 2 and metrics["windows"] == len(examples)
    assert "2 examples in" in task.metric_lines(metrics)[0]
    # scoring the first window alone (no sliding window) would have answered "good"
    first_only = task.evaluate(
        model, bert_tok, [examples[0], examples[-1]], eval_cfg=cfg, autocast_dtype=None
    )
    assert first_only["samples"][0]["prediction"] == "good" and first_only["exact_match"] == 50.0


# -- peftkit train / eval end to end ------------------------------------------------------------------


def test_train_and_eval_on_long_contexts(tmp_path, bert_tok, tiny_tokenizer, capsys):
    from peftkit.cli.main import main

    model_dir = tmp_path / "model"
    _save_model("bert-qa", model_dir, bert_tok, tiny_tokenizer)
    rows = [long_row(before=i % 3, after=(i + 1) % 3, answer=["paris", "jim"][i % 2]) for i in range(16)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    config = tmp_path / "job.yaml"
    job = {
        "base_model": str(model_dir),
        "task": "question_ans",
        "method": "lora",
        "lora": {"r": 4, "target_modules": ["query", "value"]},
        "data": {"train": str(data), "test_size": 4, "max_seq_len": MAX_LEN, "doc_stride": STRIDE},
        "training": {"max_steps": 10, "batch_size": 4, "learning_rate": 1e-2, "precision": "fp32", "seed": 3},
        "evaluation": {"batch_size": 3},
        "output_dir": str(out),
    }
    config.write_text(json.dumps(job))
    assert main(["train", str(config)]) == 0
    captured = capsys.readouterr()
    assert "windows (long contexts split" in captured.err and "on 4 held-out examples" in captured.err
    losses = [
        json.loads(line)["loss"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    after = json.loads((out / "eval_results.json").read_text())["after"]
    assert {"exact_match", "f1"} <= set(after) and after["n"] == 4 and after["windows"] > 4

    assert main(["eval", str(config), "--json", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["n"] == 4 and evaluated["windows"] == after["windows"]
    assert evaluated["exact_match"] == pytest.approx(after["exact_match"]) and evaluated[
        "f1"
    ] == pytest.approx(after["f1"])
    assert "on 4 test examples" in capsys.readouterr().out


# -- seq2seq: generate as long as the references ------------------------------------------------------


class EchoSeq2Seq(torch.nn.Module):
    """Generates, for each source, a fixed token sequence (then eos), cut at ``max_new_tokens``
    like ``generate`` does; ``forward`` gives flat logits for the validation loss."""

    def __init__(self, outputs: dict[tuple[int, ...], list[int]], vocab: int, start: int):
        super().__init__()
        self.outputs, self.vocab, self.start = outputs, vocab, start
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.budgets: list[int] = []

    def forward(self, input_ids, attention_mask=None, labels=None):
        return SimpleNamespace(logits=torch.zeros(*labels.shape, self.vocab))

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample):
        self.budgets.append(max_new_tokens)
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            key = tuple(i for i, m in zip(ids, mask) if m)
            rows.append([self.start, *self.outputs[key][:max_new_tokens]])
        width = max(len(r) for r in rows)
        return torch.tensor([r + [self.start] * (width - len(r)) for r in rows])


def test_seq2seq_exact_match_generates_past_max_new_tokens(tiny_tokenizer):
    from peftkit.tasks.seq2seq import GENERATION_MARGIN, generation_budget

    long_target = "the plot was good and the film was great and the movie was fine"
    rows = [
        {"source": "word good is", "target": long_target},
        {"source": "word bad is", "target": "negative"},
    ]
    task, examples = encode(rows, "SEQ_2_SEQ_LM", tiny_tokenizer)
    assert len(examples[0].target) > 8 + 1  # longer than the default budget, eos included
    outputs = {tuple(e.input_ids): e.target for e in examples}  # the model answers right (+ eos)
    model = EchoSeq2Seq(outputs, len(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    cfg = SimpleNamespace(batch_size=2, show_samples=2, max_new_tokens=8)
    metrics = task.evaluate(model, tiny_tokenizer, examples, eval_cfg=cfg, autocast_dtype=None)
    assert [s["prediction"] for s in metrics["samples"]] == [long_target, "negative"]
    assert metrics["exact_match"] == 1.0
    assert model.budgets == [len(examples[0].target) + GENERATION_MARGIN]
    assert generation_budget(examples[1:], 8) == 8  # short targets keep max_new_tokens
    # the old fixed budget of 8 tokens cut the long target short: a right model scored 0 on it
    model.outputs = {k: v[:8] for k, v in outputs.items()}
    assert (
        task.evaluate(model, tiny_tokenizer, examples, eval_cfg=cfg, autocast_dtype=None)["exact_match"]
        == 0.5
    )
