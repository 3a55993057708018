"""Judges of sampled answers (peftkit.judges): reward functions, reward models and classifiers, the
LLM judge's verdict parsing and pairwise win rates, and the weighted sum that skips missing scores.

Tiny random models throughout; a tiny reward model and a tiny classifier are trained for two steps
(their scores only have to match what the models compute directly). One slow test asks the
embedded SmolLM2 for real verdicts."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from peftkit.configuration import ConfigError
from peftkit.errors import PeftkitError
from peftkit.judges import GroupScores, Judge, Judges, build_judges, load_reward_function
from peftkit.judges import llm_judge as llm_module
from peftkit.judges.base import precision_name
from peftkit.judges.functions import FunctionJudge
from peftkit.judges.llm_judge import LLMJudge, parse_pairwise, parse_score, render
from peftkit.rlaif.config import LLMJudgeConfig, RewardConfig, RewardModelSpec

pytestmark = pytest.mark.usefixtures("single_thread")

# -- verdict parsing ------------------------------------------------------------------------------

SCORES = [
    ("7", 7.0),
    ("7/10", 7.0),
    ("Score: 7.5", 7.5),
    ("**8**", 8.0),
    ("Grade: 3 out of 10. The answer is vague.", 3.0),
    ("7,5", 7.5),
    ("10", 10.0),
    ("0", 0.0),
    (".5", 0.5),
    ("８", 8.0),  # full-width digit
    ("Note : ９/10", 9.0),
    ("١٠", 10.0),  # Arabic-Indic digits
    ("11", None),  # above max_score
    ("-1", None),  # below 0
    ("", None),
    ("   ", None),
    ("great answer!", None),
    ("🙂👍", None),
    ("½", None),
]


@pytest.mark.parametrize(("reply", "grade"), SCORES)
def test_score_verdicts(reply, grade):
    assert parse_score(reply, 10.0) == grade


def test_score_verdicts_respect_max_score():
    assert parse_score("5", 5.0) == 5.0
    assert parse_score("7", 5.0) is None
    assert parse_score(None, 10.0) is None  # type: ignore[arg-type]


PAIRWISE = [
    ("1", 0),
    ("2", 1),
    ("Answer 1", 0),
    ("Answer 2 is better.", 1),
    ("**2**", 1),
    ("A", 0),
    ("B", 1),
    ("Answer B.", 1),
    ("the first", 0),
    ("The second one.", 1),
    ("First.", 0),
    ("Answer 2 (score 10)", 1),
    ("１", 0),  # full-width digit
    ("A better answer is 2", 1),  # numbers decide before letters
    ("1 or 2", None),  # both
    ("Answer 1 is better than answer 2", None),
    ("A is better than B", None),
    ("the first and the second are equal", None),
    ("", None),
    ("both are fine", None),
    ("3", None),
    ("12", None),
    ("1.5", None),
    ("a nice reply", None),  # a lower-case article is not answer A
    ("Ｂ", None),
    ("???", None),
]


@pytest.mark.parametrize(("reply", "pick"), PAIRWISE)
def test_pairwise_verdicts(reply, pick):
    assert parse_pairwise(reply) == pick


def test_render_fills_fields_once_and_keeps_other_braces():
    template = 'Q: {prompt} A: {completion} as JSON {"score": n} (0-{max_score}) {unknown}'
    text = render(template, prompt="2+2?", completion="{prompt} {second}", max_score="10")
    assert text == 'Q: 2+2? A: {prompt} {second} as JSON {"score": n} (0-10) {unknown}'


# -- function judges ------------------------------------------------------------------------------

PROMPTS = ["p0", "p1"]
GROUPS = [["a", "bb"], ["ccc"]]


def test_function_gets_rows_per_answer_and_columns_repeated():
    calls = []

    def length(prompts, completions, answer, **kwargs):
        calls.append((prompts, completions, answer, kwargs))
        return [len(c) for c in completions]

    judge = FunctionJudge(length)
    assert judge.name == "length"
    out = judge.score_groups(PROMPTS, GROUPS, {"answer": ["x", "y"], "level": [1, 2]})
    assert out == [[1.0, 2.0], [3.0]]
    assert calls == [(["p0", "p0", "p1"], ["a", "bb", "ccc"], ["x", "x", "y"], {"level": [1, 1, 2]})]


@pytest.mark.parametrize(
    ("returned", "expected"),
    [
        ([1.0, None, float("nan")], [[1.0, None], [None]]),
        ((1, True, 0.5), [[1.0, 1.0], [0.5]]),
        (np.array([0.5, np.nan, 2.0]), [[0.5, None], [2.0]]),
        (torch.tensor([0.25, 0.5, 1.0]), [[0.25, 0.5], [1.0]]),
        ([np.float32(1.5), torch.tensor(2.0), None], [[1.5, 2.0], [None]]),
    ],
)
def test_function_returns_numbers_or_skips(returned, expected):
    assert (
        FunctionJudge(lambda prompts, completions: returned, "f").score_groups(PROMPTS, GROUPS, {})
        == expected
    )


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        ([1.0, 2.0], r"returned 2 value\(s\) \(\[1.0, 2.0\]\): expected a list of 3 numbers or None"),
        ([1.0, 2.0, 3.0, 4.0], "returned 4 value"),
        (None, "returned None: expected a list of 3"),
        (5.0, "returned 5.0: expected"),
        ("abc", "returned 'abc': expected"),
        ({"a": 1}, "returned {'a': 1}: expected"),
        ([1.0, "x", 2.0], r"returned 'x' \(str\) for answer 1: expected"),
        ([1.0, [2.0], 2.0], r"returned \[2.0\] \(list\) for answer 1"),
        ([1.0, float("inf"), 2.0], "returned inf for answer 1: rewards must be finite"),
    ],
)
def test_function_returning_the_wrong_thing_is_named(returned, message):
    def my_reward(prompts, completions, **kwargs):
        return returned

    with pytest.raises(PeftkitError, match="reward function my_reward " + message):
        FunctionJudge(my_reward).score_groups(PROMPTS, GROUPS, {})


def test_an_exception_in_the_function_names_it_and_keeps_the_cause():
    def broken(prompts, completions, **kwargs):
        return {}["missing"]

    with pytest.raises(PeftkitError, match=r"reward function broken raised KeyError: 'missing'") as caught:
        FunctionJudge(broken).score_groups(PROMPTS, GROUPS, {"answer": [1, 2]})
    assert isinstance(caught.value.__cause__, KeyError)
    assert "columns: answer" in str(caught.value)


REWARDS_PY = """
from __future__ import annotations

from dataclasses import dataclass

from helper_words import GOOD  # a file beside this one

THRESHOLD = 0.5


@dataclass
class Counter:
    hits: int = 0


def exact(prompts, completions, answer, **kwargs):
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]


def contains_good(prompts, completions, **kwargs):
    return [1.0 if GOOD in c else None for c in completions]


shout = lambda prompts, completions, **kwargs: [float(c.isupper()) for c in completions]
"""


@pytest.fixture
def rewards_dir(tmp_path):
    (tmp_path / "my_rewards_t.py").write_text(REWARDS_PY)
    (tmp_path / "helper_words.py").write_text("GOOD = 'good'\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "extra.py").write_text(
        "def one(prompts, completions, **kw):\n    return [1.0] * len(completions)\n"
    )
    (tmp_path / "broken_mod.py").write_text("raise RuntimeError('boom at import')\n")
    return tmp_path


def test_function_loaded_from_the_config_directory(rewards_dir):
    exact = load_reward_function("my_rewards_t:exact", base_dir=rewards_dir)
    assert exact(prompts=["q", "q"], completions=["4", "5"], answer=["4", "4"]) == [1.0, 0.0]
    assert load_reward_function("sub/extra.py:one", base_dir=rewards_dir)([], ["a", "b"]) == [1.0, 1.0]
    path = str(rewards_dir / "sub" / "extra.py")
    assert load_reward_function(f"{path}:one")([], ["a"]) == [1.0]
    assert load_reward_function("math:sqrt")(4) == 2.0  # an importable module


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", r"write module:function"),
        ("my_rewards_t:", r"write module:function"),
        ("my-rewards:f", r"neither a module name nor a .py file"),
        (
            "no_such_module_xyz:f",
            r"cannot find module 'no_such_module_xyz': there is no file .*no_such_module_xyz.py",
        ),
        (
            "my_rewards_t:exakt",
            r"has no 'exakt'; did you mean exact\? its functions: Counter, contains_good, exact",
        ),
        (
            "my_rewards_t:nothing_like_it",
            r"has no 'nothing_like_it'; its functions: Counter, contains_good, exact",
        ),
        ("my_rewards_t:THRESHOLD", r"THRESHOLD in module .* is a float \(0.5\), not a function"),
        ("sub/none.py:f", r"there is no file .*sub/none.py"),
        ("broken_mod:f", r"running .*broken_mod.py failed: RuntimeError: boom at import"),
        ("json:nothing", r"module json .* has no 'nothing'; its functions: .*dumps.*loads"),
    ],
)
def test_bad_function_specs_say_what_is_wrong(rewards_dir, spec, message):
    with pytest.raises(PeftkitError, match=message):
        load_reward_function(spec, base_dir=rewards_dir)


def test_build_judges_from_functions_with_weights(rewards_dir):
    cfg = RewardConfig(
        functions=["my_rewards_t:exact", "my_rewards_t:contains_good", "my_rewards_t:shout"],
        weights=[1.0, 2.0, 0.5],
    )
    judges = build_judges(cfg, base_dir=rewards_dir)
    assert judges.names == ["exact", "contains_good", "shout"]  # a lambda is named after its attribute
    groups = [["4", "good 4", "NO"], ["paris"]]
    scores = judges.score_groups(["2+2?", "capital?"], groups, {"answer": ["4", "paris"]})
    assert scores.per_judge["exact"] == [[1.0, 0.0, 0.0], [1.0]]
    assert scores.per_judge["contains_good"] == [[None, 1.0, None], [None]]
    assert scores.per_judge["shout"] == [[0.0, 0.0, 1.0], [0.0]]
    assert scores.total == [[1.0, 2.0, 0.5], [1.0]]
    assert scores.unparseable == {"exact": 0, "contains_good": 0, "shout": 0}


def test_empty_groups_call_no_function():
    def never(prompts, completions, **kwargs):
        raise AssertionError("called")

    assert FunctionJudge(never).score_groups(["p", "q"], [[], []], {"answer": [1, 2]}) == [[], []]


def test_judges_compute_in_the_trainers_precision():
    assert [precision_name(x) for x in (None, torch.bfloat16, "auto", "fp32")] == [
        "fp32",
        "bf16",
        "auto",
        "fp32",
    ]
    with pytest.raises(PeftkitError, match="fp32 or bf16 autocast; got autocast dtype torch.float16"):
        precision_name(torch.float16)
    with pytest.raises(PeftkitError, match="one of auto, bf16, fp32, got 'fp16'"):
        precision_name("fp16")


def test_empty_or_invalid_reward_config_is_refused():
    with pytest.raises(PeftkitError, match=r"names no judge.*reward.functions.*reward.models.*reward.judge"):
        build_judges(RewardConfig())
    with pytest.raises(ConfigError, match=r"'reward.weights' has 2 weight\(s\) for 1 judge"):
        build_judges(RewardConfig(functions=["math:sqrt"], weights=[1.0, 2.0]))
    with pytest.raises(ConfigError, match=r"max_score' must be > 0"):
        build_judges(RewardConfig(judge=LLMJudgeConfig(max_score=0)))


# -- the weighted sum ------------------------------------------------------------------------------


class Fixed(Judge):
    def __init__(self, name, scores, unparseable_per_call=0):
        self.name, self.scores, self.unparseable, self.step = name, scores, 3, unparseable_per_call

    def score_groups(self, prompts, groups, columns):
        self.unparseable += self.step
        return self.scores


def test_weighted_sum_skips_judges_without_a_score():
    a = Fixed("a", [[1.0, None, 2.0], [3.0]])
    b = Fixed("a", [[None, None, 4.0], [float("nan")]], unparseable_per_call=2)
    c = Fixed("c", [[-1.0, None, None], [0.0]])
    judges = Judges([a, b, c], weights=[2.0, 0.5, 1.0])
    assert judges.names == ["a", "a_2", "c"]
    out = judges.score_groups(["p", "q"], [["x", "y", "z"], ["w"]], {"col": [1, 2]})
    assert isinstance(out, GroupScores)
    # answer 0: 2*1 + (b skipped) + 1*(-1) = 1; answer 1: nobody scored; answer 2: 2*2 + 0.5*4 = 6
    # answer 3: 2*3 + (NaN skipped) + 1*0 = 6
    assert out.total == [[1.0, None, 6.0], [6.0]]
    assert out.per_judge["a_2"] == [[None, None, 4.0], [None]]
    assert out.unparseable == {"a": 0, "a_2": 2, "c": 0}
    assert Judges([a, b]).score_groups(["p", "q"], [["x", "y", "z"], ["w"]], {}).total == [
        [1.0, None, 6.0],
        [3.0],
    ]


def test_judges_check_shapes_weights_and_names():
    with pytest.raises(PeftkitError, match=r"2 weight\(s\) for 1 judge"):
        Judges([Fixed("a", [[1.0]])], [1.0, 2.0])
    with pytest.raises(PeftkitError, match="at least one judge"):
        Judges([])
    with pytest.raises(PeftkitError, match="'clf/pos' cannot name a metric"):
        Judges([Fixed("clf/pos", [[1.0]])])
    judges = Judges([Fixed("a", [[1.0, 2.0]])])
    with pytest.raises(PeftkitError, match=r"judge a returned scores of shape \[2\], expected \[3\]"):
        judges.score_groups(["p"], [["x", "y", "z"]], {})
    with pytest.raises(PeftkitError, match="2 prompts but 1 groups"):
        judges.score_groups(["p", "q"], [["x"]], {})
    with pytest.raises(PeftkitError, match=r"column 'answer' has 1 value\(s\) for 2 prompts"):
        judges.score_groups(["p", "q"], [["x"], ["y"]], {"answer": ["4"]})


# -- reward models and classifiers --------------------------------------------------------------


def _train(model_dir, out, rows, **job):
    from peftkit.train.config import build_job_config
    from peftkit.train.loop import run_training

    data = out.parent / f"{out.name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "base_model": str(model_dir),
        "method": "lora",
        "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": str(data), "max_seq_len": 64},
        "training": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "precision": "fp32", "seed": 3},
        "evaluation": {"accuracy_after": False},
        "output_dir": str(out),
        **job,
    }
    run_training(build_job_config(config), progress=False)
    return out / "adapter"


@pytest.fixture(scope="module")
def reward_adapter(tmp_path_factory, tiny_model_dir):
    rows = [
        {"prompt": f"word {w} is", "chosen": c, "rejected": r}
        for w, c, r in [("good", "positive", "negative")]
    ] * 8
    return _train(tiny_model_dir, tmp_path_factory.mktemp("rm") / "tweet-reward", rows, objective="reward")


@pytest.fixture(scope="module")
def classifier_adapter(tmp_path_factory, tiny_model_dir):
    rows = [{"text": f"the {w} movie", "label": lab} for w, lab in [("good", "pos"), ("bad", "neg")]] * 4
    return _train(tiny_model_dir, tmp_path_factory.mktemp("clf") / "tweet-clf", rows, task="seq_cls")


ANSWERS_PROMPTS = [
    "word good is",
    [{"role": "system", "content": "Judge."}, {"role": "user", "content": "word bad is"}],
]
ANSWERS = [["positive", "negative", "   "], [[{"role": "assistant", "content": "negative"}]]]


def test_reward_adapter_scores_as_the_reward_scorer(reward_adapter):
    from peftkit.scoring import load_reward_model

    judges = build_judges(RewardConfig(models=[str(reward_adapter)], batch_size=2), device="cpu")
    assert judges.names == ["tweet-reward"]
    out = judges.score_groups(ANSWERS_PROMPTS, ANSWERS, {})
    scorer = load_reward_model(reward_adapter, device="cpu", precision="fp32")
    expected = scorer.score(
        prompts=[ANSWERS_PROMPTS[0], ANSWERS_PROMPTS[0], ANSWERS_PROMPTS[1]],
        completions=["positive", "negative", ANSWERS[1][0]],
    )
    got = out.total
    assert got[0][2] is None  # an answer with no text: nothing to score
    assert [got[0][0], got[0][1], got[1][0]] == pytest.approx(expected, abs=1e-5)
    assert got[0][0] != pytest.approx(got[0][1])


def test_classifier_adapter_gives_the_label_probability(classifier_adapter):
    judges = build_judges(
        RewardConfig(models=[RewardModelSpec(path=str(classifier_adapter), label="pos")], batch_size=2),
        device="cpu",
    )
    assert judges.names == ["tweet-clf:pos"]
    judge = judges.judges[0]
    texts = ["the good movie", "bad", "the bad movie was the plot"]
    out = judges.score_groups(
        ["ignored prompt", "p"], [texts[:2], [[{"role": "assistant", "content": texts[2]}]]], {}
    )
    expected = []
    with torch.no_grad():  # one text at a time, no padding: the model's own logits
        for text in texts:
            ids = judge.tokenizer(text, return_tensors="pt")
            expected.append(judge.model(**ids).logits.float().softmax(-1)[0, 1].item())
    assert [*out.total[0], *out.total[1]] == pytest.approx(expected, abs=1e-5)
    assert len({round(p, 6) for p in expected}) == 3
    neg = build_judges(RewardConfig(models=[{"path": str(classifier_adapter), "label": "neg"}]), device="cpu")
    assert neg.score_groups(["p"], [texts[:2]], {}).total[0] == pytest.approx(
        [1 - p for p in expected[:2]], abs=1e-5
    )


def _plain_classifier(path, tokenizer, labels):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_plain_transformers_classifier_and_one_output_model(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForSequenceClassification

    clf = _plain_classifier(tmp_path / "sentiment", tiny_tokenizer, ["NEGATIVE", "NEUTRAL", "POSITIVE"])
    judges = build_judges(
        RewardConfig(models=[{"path": str(clf), "label": "POSITIVE", "name": "pos"}]), device="cpu"
    )
    assert judges.names == ["pos"]
    texts = ["the quick fox", "lazy dog!", "positive"]
    got = judges.score_groups(["q"], [texts], {}).total[0]
    oracle = AutoModelForSequenceClassification.from_pretrained(clf).eval()
    with torch.no_grad():
        expected = [
            oracle(**tiny_tokenizer(t, return_tensors="pt")).logits.softmax(-1)[0, 2].item() for t in texts
        ]
    assert got == pytest.approx(expected, abs=1e-5)

    one = _plain_classifier(tmp_path / "rm", tiny_tokenizer, ["score"])
    judges = build_judges(RewardConfig(models=[str(one)]), device="cpu")
    assert judges.names == ["rm"]
    got = judges.score_groups(["2+2?"], [["4", "five"]], {}).total[0]
    oracle = AutoModelForSequenceClassification.from_pretrained(one).eval()
    with torch.no_grad():  # the pair (prompt, answer), as cross-encoder reward models read it
        expected = [
            oracle(**tiny_tokenizer("2+2?", a, return_tensors="pt")).logits[0, 0].item()
            for a in ["4", "five"]
        ]
    assert got == pytest.approx(expected, abs=1e-5)
    with pytest.raises(
        PeftkitError, match=r"rm is a reward model with one output .* no labels; remove label: 'x'"
    ):
        build_judges(RewardConfig(models=[{"path": str(one), "label": "x"}]), device="cpu")


def _fake_adapter(path, meta, task_type="SEQ_CLS"):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": task_type}))
    if meta is not None:
        (path / "peftkit_task.json").write_text(json.dumps(meta))
    return str(path)


def test_model_judge_errors_name_the_fix(tmp_path, tiny_model_dir):
    clf = _fake_adapter(
        tmp_path / "clf" / "adapter", {"task_type": "SEQ_CLS", "labels": ["negative", "positive"]}
    )
    rm = _fake_adapter(tmp_path / "rm", {"task_type": "SEQ_CLS", "objective": "reward"})
    lm = _fake_adapter(tmp_path / "lm", {"task_type": "CAUSAL_LM"}, "CAUSAL_LM")
    nolabels = _fake_adapter(tmp_path / "peft-clf", None)
    cases = [
        (
            clf,
            None,
            r"is a classifier with labels negative, positive: say whose probability.*label: positive",
        ),
        (
            clf,
            "postive",
            r"label 'postive' is not one of .*did you mean 'positive'\? its labels: negative, positive",
        ),
        (
            clf,
            "zzz",
            r"label 'zzz' is not one of the labels of .*clf/adapter; its labels: negative, positive",
        ),
        (rm, "positive", r"is a reward model \(trained with objective: reward\) with one output .*no labels"),
        (lm, None, r"adapter for task CAUSAL_LM .*use reward.judge instead"),
        (nolabels, "a", r"SEQ_CLS adapter without label names"),
        (str(tmp_path / "missing"), None, r"the model directory .*missing does not exist \(looked for"),
        (str(tmp_path / "clf"), None, r"neither adapter_config.json .* did you mean .*clf/adapter\?"),
        (
            str(tiny_model_dir),
            "x",
            r"not a sequence-classification model \(its architectures: LlamaForCausalLM\)",
        ),
    ]
    for path, label, message in cases:
        with pytest.raises(PeftkitError, match=message):
            build_judges(RewardConfig(models=[RewardModelSpec(path=path, label=label)]), device="cpu")
    # a path relative to the config's directory
    with pytest.raises(PeftkitError, match="is a classifier with labels"):
        build_judges(RewardConfig(models=["clf/adapter"]), base_dir=tmp_path, device="cpu")


# -- the LLM judge -------------------------------------------------------------------------------


def test_llm_judge_adapter_must_be_a_causal_lm(tmp_path):
    clf = _fake_adapter(tmp_path / "clf", {"task_type": "SEQ_CLS", "labels": ["a", "b"]})
    with pytest.raises(
        PeftkitError, match=r"judge.adapter: .*clf was trained for task SEQ_CLS .*reward.models"
    ):
        build_judges(RewardConfig(judge=LLMJudgeConfig(adapter=clf)), device="cpu")
    with pytest.raises(PeftkitError, match=r"the adapter directory .*nowhere does not exist"):
        build_judges(RewardConfig(judge=LLMJudgeConfig(adapter=str(tmp_path / "nowhere"))), device="cpu")


def test_random_tiny_judge_counts_unreadable_verdicts(tiny_model_dir):
    cfg = RewardConfig(
        judge=LLMJudgeConfig(model=str(tiny_model_dir), max_new_tokens=4, name="llm"), batch_size=4
    )
    judges = build_judges(cfg, device="cpu")
    judge = judges.judges[0]
    prompts = ["word good is", [{"role": "user", "content": "word bad is"}]]
    groups = [["positive", "negative", "neutral"], [[{"role": "assistant", "content": "negative"}]]]
    out = judges.score_groups(prompts, groups, {})
    flat = [s for row in out.total for s in row]
    assert all(s is None or 0 <= s <= 1 for s in flat)
    assert out.unparseable["llm"] == sum(s is None for s in flat) == judge.unparseable > 0
    judge.cfg.mode, judge.template = "pairwise", llm_module.PAIRWISE_TEMPLATE
    out = judges.score_groups(prompts, groups, {})
    assert out.total[1] == [None]  # a single answer has nothing to be compared with
    assert 0 < out.unparseable["llm"] <= 6


def _fake_generate(replies_for, calls):
    """Stands in for generate_completions: decodes each judge prompt, answers ``replies_for(text)``."""

    def fake(model, tokenizer, prompts, *, max_new_tokens, batch_size, **kwargs):
        texts = [tokenizer.decode(p) for p in prompts]
        calls.extend(texts)
        return [replies_for(t) for t in texts]

    return fake


QUALITY = {"bad": 0, "ok": 1, "good": 2}


def _shown(text):
    first, second = re.search(r"Answer 1: (.*?)\n\nAnswer 2: (.*?)\n\n", text, re.S).groups()
    return first, second


def test_pairwise_win_rates_judge_both_orders(monkeypatch, tiny_tokenizer):
    calls = []

    def prefer_better(text):
        first, second = _shown(text)
        if first == "bad" and second == "ok":
            return "hmm"  # unreadable: this comparison does not count
        return "Answer 1" if QUALITY[first] > QUALITY[second] else "2"

    monkeypatch.setattr(llm_module, "generate_completions", _fake_generate(prefer_better, calls))
    judge = LLMJudge(None, tiny_tokenizer, LLMJudgeConfig(mode="pairwise"))
    out = Judges([judge]).score_groups(
        ["q0", "q1", "q2"], [["bad", "good", "ok"], ["good"], ["ok", "ok"]], {}
    )
    # bad: lost to good twice, lost to ok once (bad-first vs ok unread) -> 0/3
    # good: won all 4; ok: beat bad once (ok-first), won 0 of 2 against good -> 1/3
    # ok vs ok: "2" both times, each wins once of 2 -> 0.5
    assert out.total == [[0.0, 1.0, pytest.approx(1 / 3)], [None], [0.5, 0.5]]
    assert out.unparseable == {"judge": 1}
    shown = sorted(_shown(t) for t in calls)
    pairs = [(a, b) for a in ("bad", "good", "ok") for b in ("bad", "good", "ok") if a != b]
    assert shown == sorted(pairs + [("ok", "ok"), ("ok", "ok")])  # every pair in both orders, once
    assert all(t.startswith("<|im_start|>user\n") and "Question: q" in t for t in calls)  # chat template


def test_pairwise_position_bias_cancels(monkeypatch, tiny_tokenizer):
    monkeypatch.setattr(llm_module, "generate_completions", _fake_generate(lambda t: "1", []))
    judge = LLMJudge(None, tiny_tokenizer, LLMJudgeConfig(mode="pairwise"))
    assert judge.score_groups(["q"], [["bad", "good", "ok"]], {}) == [[0.5, 0.5, 0.5]]
    monkeypatch.setattr(llm_module, "generate_completions", _fake_generate(lambda t: "no idea", []))
    assert judge.score_groups(["q"], [["bad", "good"]], {}) == [[None, None]]
    assert judge.unparseable == 2


def test_score_mode_grades_messages_as_text(monkeypatch, tiny_tokenizer):
    calls = []
    replies = {"four": "Score: 7", "4": "**8**/10", "five": "garbage", "cinq": "15"}

    def grade(text):
        return replies[re.search(r"Answer: (.*?)\n\n", text, re.S).group(1)]

    monkeypatch.setattr(llm_module, "generate_completions", _fake_generate(grade, calls))
    cfg = LLMJudgeConfig(max_score=10)
    judge = LLMJudge(None, tiny_tokenizer, cfg)
    prompt = [{"role": "system", "content": "SYSTEM"}, {"role": "user", "content": "2+2?"}]
    groups = [[[{"role": "assistant", "content": a}] for a in ("four", "4", "five")], ["cinq"]]
    out = Judges([judge]).score_groups([prompt, "2+3?"], groups, {})
    assert out.total == [[0.7, 0.8, None], [None]]
    assert out.unparseable == {"judge": 2}
    assert "Question: 2+2?\n\nAnswer: four\n\n" in calls[0] and "SYSTEM" not in calls[0]
    assert "from 0 (wrong or useless) to 10 (correct and helpful)" in calls[0]


def test_custom_template_and_plain_text_tokenizer(monkeypatch, tiny_tokenizer):
    calls = []
    monkeypatch.setattr(llm_module, "generate_completions", _fake_generate(lambda t: "3", calls))
    monkeypatch.setattr(tiny_tokenizer, "chat_template", None)
    cfg = LLMJudgeConfig(template='Rate {completion} for {prompt} as {"grade": 0..{max_score}}', max_score=5)
    assert LLMJudge(None, tiny_tokenizer, cfg).score_groups(["q"], [["a {prompt}"]], {}) == [[0.6]]
    assert calls == ['Rate a {prompt} for q as {"grade": 0..5}']


@pytest.mark.slow
def test_embedded_smollm2_judge_end_to_end():
    """The real default judge loads from its alias, reads the chat template and writes verdicts that
    parse at least sometimes (SmolLM2-135M is a weak judge: most of its grades are noise)."""
    cfg = RewardConfig(judge=LLMJudgeConfig(model="smollm2-135m-instruct"), batch_size=8)
    judges = build_judges(cfg, device="cpu")
    groups = [
        ["The capital of France is Paris.", "I like turtles.", "Paris.", "London is the capital of France."]
    ]
    out = judges.score_groups(["What is the capital of France?"], groups, {})
    assert all(s is None or 0 <= s <= 1 for s in out.total[0])
    assert out.unparseable["judge"] == sum(s is None for s in out.total[0]) < 4
