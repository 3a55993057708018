"""Scoring with a reward model (peftkit.scoring, `peftkit score`): a tiny reward model trained on an
easy toy set ranks chosen above rejected, rows render exactly as training rendered its pairs, and
an adapter that is not a reward model is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftkit.cli.main import main
from peftkit.errors import DataError, PeftkitError
from peftkit.scoring import check_reward_model, load_reward_model, score_texts

SYSTEM = "Judge the word."
PAIRS = [("good", "positive", "negative"), ("bad", "negative", "positive"), ("fox", "neutral", "positive")]
ROWS = [{"prompt": f"word {w} is", "chosen": c, "rejected": r} for w, c, r in PAIRS] * 8


@pytest.fixture(scope="module")
def reward_adapter(tmp_path_factory, tiny_model_dir):
    """A tiny LoRA reward model trained to prefer each word's right label (fp32, 16 steps)."""
    from peftkit.train.config import build_job_config
    from peftkit.train.loop import run_training

    root = tmp_path_factory.mktemp("reward")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    job = build_job_config(
        {
            "base_model": str(tiny_model_dir),
            "objective": "reward",
            "method": "lora",
            "lora": {"r": 4, "target_modules": "all-linear"},
            "data": {"train": str(data), "test_size": 6, "system_prompt": SYSTEM, "max_seq_len": 64},
            "training": {
                "max_steps": 16,
                "batch_size": 4,
                "learning_rate": 1e-2,
                "precision": "fp32",
                "seed": 3,
            },
            "output_dir": str(root / "run"),
        }
    )
    results = run_training(job, progress=False)
    assert results["after"]["pairwise_accuracy"] == 1.0, results["after"]
    return root / "run" / "adapter"


@pytest.fixture(scope="module")
def scorer(reward_adapter):
    return load_reward_model(reward_adapter, device="cpu", precision="fp32")


def test_chosen_scores_higher_than_rejected(scorer):
    prompts = [f"word {w} is" for w, _, _ in PAIRS]
    chosen = scorer.score(prompts=prompts, completions=[c for _, c, _ in PAIRS])
    rejected = scorer.score(prompts=prompts, completions=[r for _, _, r in PAIRS])
    assert all(c > r for c, r in zip(chosen, rejected)), (chosen, rejected)
    # messages are the same rows as strings; batching does not change a score
    messages = scorer.score(
        prompts=[[{"role": "user", "content": p}] for p in prompts],
        completions=[{"role": "assistant", "content": c} for _, c, _ in PAIRS],
        batch_size=1,
    )
    assert messages == pytest.approx(chosen, abs=1e-5)


def test_rows_render_and_score_as_training_did(scorer, reward_adapter, tiny_tokenizer):
    """The recorded rendering (system prompt, template, max_seq_len) gives the training encoder's
    token rows, and the scores are the ones the reward task computes on the training batches."""
    from peftkit.data import DataConfig, build_datasets

    saved = json.loads((reward_adapter / "peftkit_task.json").read_text())
    assert saved["objective"] == "reward" and saved["rendering"]["system_prompt"] == SYSTEM
    assert saved["rendering"]["max_seq_len"] == 64 and saved["rendering"]["use_chat_template"] is True
    cfg = DataConfig(train=ROWS[:3], system_prompt=SYSTEM, max_seq_len=64)
    examples = sorted(build_datasets(cfg, tiny_tokenizer, task=scorer.task).train, key=lambda e: e.origin)
    assert [e.origin for e in examples] == [f"data.train[{i}]" for i in range(3)]
    prompts = [r["prompt"] for r in ROWS[:3]]
    for side in ("chosen", "rejected"):
        rows = scorer.encode(prompts=prompts, completions=[r[side] for r in ROWS[:3]])
        assert [r.prompt_ids + r.completion_ids for r in rows] == [
            e.prompt_ids + getattr(e, f"{side}_ids") for e in examples
        ]
    text = tiny_tokenizer.decode(rows[0].prompt_ids)
    assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nword good is")
    with torch.no_grad():
        chosen, rejected = scorer.task.scores(
            scorer.model, scorer.task.collate(examples, tiny_tokenizer.pad_token_id)
        )
    assert scorer.score(prompts=prompts, completions=[r["chosen"] for r in ROWS[:3]]) == pytest.approx(
        chosen.tolist(), abs=1e-5
    )
    assert scorer.score(prompts=prompts, completions=[r["rejected"] for r in ROWS[:3]]) == pytest.approx(
        rejected.tolist(), abs=1e-5
    )


def test_texts_are_scored_as_given(scorer, tiny_tokenizer):
    row = scorer.encode(prompts=["word good is"], completions=["positive"])[0]
    rendered = tiny_tokenizer.decode(row.prompt_ids + row.completion_ids)
    assert rendered.endswith("<|im_start|>assistant\npositive<|im_end|>")
    assert scorer.score([rendered]) == pytest.approx(
        scorer.score(prompts=["word good is"], completions=["positive"]), abs=1e-5
    )
    assert scorer.score([rendered, "word good is positive"])[1] != pytest.approx(scorer.score([rendered])[0])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"texts": ["a"], "prompts": ["b"], "completions": ["c"]}, ValueError, "either texts, or prompts"),
        ({}, ValueError, "either texts, or prompts"),
        ({"prompts": ["a", "b"], "completions": ["c"]}, ValueError, "2 prompts but 1 completions"),
        ({"texts": "one string"}, TypeError, "a list of strings"),
        ({"texts": ["ok", "  "]}, DataError, "text 1: the text to score must be a non-empty string"),
        ({"prompts": ["hi"], "completions": [""]}, DataError, "row 0: .*empty assistant answer"),
    ],
)
def test_bad_inputs_say_what_is_wrong(scorer, kwargs, error, message):
    with pytest.raises(error, match=message):
        scorer.score(**kwargs)


def _fake_adapter(path: Path, meta: dict | None) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM"}))
    if meta is not None:
        (path / "peftkit_task.json").write_text(json.dumps(meta))
    return path


def test_an_adapter_that_is_not_a_reward_model_is_refused(tmp_path, capsys):
    dpo = _fake_adapter(tmp_path / "dpo", {"task_type": "CAUSAL_LM", "objective": "dpo", "preference": {}})
    with pytest.raises(
        PeftkitError, match=r"not a reward model: .*task CAUSAL_LM with objective dpo.*objective: reward"
    ):
        check_reward_model(dpo)
    peft = _fake_adapter(tmp_path / "peft", None)
    with pytest.raises(PeftkitError, match="objective sft.*no peftkit_task.json"):
        score_texts(peft, ["hello"])
    with pytest.raises(PeftkitError, match="has no adapter_config.json"):
        check_reward_model(tmp_path)
    assert main(["score", "--adapter", str(dpo), "--text", "hello"]) == 2
    assert "is not a reward model" in capsys.readouterr().err


def test_cli_options_are_checked_before_loading(reward_adapter, capsys):
    assert main(["score", "--text", "a"]) == 2
    assert "--adapter DIR is required" in capsys.readouterr().err
    assert main(["score", "--adapter", str(reward_adapter), "--text", "a", "--data", "x.jsonl"]) == 2
    assert "exactly one of --text, --prompt (with --completion) or --data" in capsys.readouterr().err
    assert main(["score", "--adapter", str(reward_adapter), "--prompt", "a"]) == 2
    assert "--prompt and --completion go together" in capsys.readouterr().err


def test_cli_scores_data_rows(reward_adapter, tmp_path, capsys):
    rows = [
        {"prompt": "word good is", "completion": "positive"},
        {"prompt": "word good is", "completion": "negative"},
        {"text": "plain text"},
    ]
    data = tmp_path / "answers.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scores.json"
    argv = [
        "score",
        "--adapter",
        str(reward_adapter),
        "--data",
        str(data),
        "--json",
        str(out),
        "--precision",
        "fp32",
    ]
    assert main([*argv, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and "'word good is' -> 'positive'" in printed[0] and "'plain text'" in printed[2]
    saved = json.loads(out.read_text())
    scores = [r["score"] for r in saved["scores"]]
    assert scores[0] > scores[1] and saved["scores"][0]["origin"] == f"{data}:1"
    assert saved["precision"] == "fp32"
    pair = tmp_path / "pairs.jsonl"
    pair.write_text(json.dumps(ROWS[0]) + "\n")
    assert main(["score", "--adapter", str(reward_adapter), "--data", str(pair), "--device", "cpu"]) == 2
    assert f"{pair}:1: a preference pair" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": "word good is", "completion": " "}) + "\n")
    assert main(["score", "--adapter", str(reward_adapter), "--data", str(empty), "--device", "cpu"]) == 2
    assert f"{empty}:1: " in capsys.readouterr().err


def test_cli_in_a_subprocess(reward_adapter, tmp_path):
    out = tmp_path / "scores.json"
    command = [sys.executable, "-m", "peftkit", "score", "--adapter", str(reward_adapter), "--device", "cpu"]
    command += ["--precision", "fp32", "--prompt", "word bad is", "--completion", "negative"]
    command += ["--completion", "positive", "--json", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and lines[0].endswith("'word bad is' -> 'negative'")
    negative, positive = (r["score"] for r in json.loads(out.read_text())["scores"])
    assert negative > positive
