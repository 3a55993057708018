"""`peftkit label-pairs` (peftkit.rlaif.label_pairs): offline RLAIF on the tiny random Llama.

rows         preference rows the preference reader takes and objective dpo trains on; chosen is the
             best scored answer, rejected the worst; ties, unscored prompts, empty and identical
             answers are counted and give no row
resume       --limit then --resume, and an interrupted run (a half-written last line) then --resume,
             write the same file as a straight run
refusals     an existing file without --overwrite, resuming with other settings, a bad reward
             function: clear errors before the model loads
cli          `python -m peftkit label-pairs` once, in a subprocess
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

import peftkit.models
from peftkit.cli.main import main
from peftkit.configuration import ConfigError
from peftkit.data import DataConfig, read_file
from peftkit.data.preference import read_preference
from peftkit.errors import PeftkitError
from peftkit.objectives.online import PromptExample
from peftkit.rlaif.label_pairs import (
    EXTRA_KEYS,
    LabelReport,
    label_pairs,
    load_label_job,
    pair_row,
    state_path,
)
from peftkit.rlaif.sampling import SampledAnswer

pytestmark = pytest.mark.usefixtures("single_thread")

# Each prompt row says how the reward function scores its answers (column "mode").
REWARDS_PY = """
import os

CALLS = [0]


def text(completion):
    return completion if isinstance(completion, str) else completion[-1]["content"]


def by_mode(prompts, completions, mode, **kwargs):
    CALLS[0] += 1
    stop = os.environ.get("LP_STOP_AT_CALL")
    if stop and CALLS[0] == int(stop):
        raise KeyboardInterrupt  # as a Ctrl-C (or a kill) in the middle of a run
    scores, seen = [], {}
    for prompt, completion, how in zip(prompts, completions, mode):
        key = str(prompt)
        seen[key] = seen.get(key, 0) + 1
        if how == "len":
            scores.append(float(len(text(completion))))
        elif how == "tie":
            scores.append(1.0)
        elif how == "none":
            scores.append(None)
        elif how == "one":  # only the first answer of the prompt is scored
            scores.append(1.0 if seen[key] == 1 else None)
    return scores
"""

MODES = ["len", "len", "tie", "len", "none", "len", "one", "len", "len"]


def prompt_rows() -> list[dict]:
    rows = [{"prompt": f"word {i} is", "mode": mode} for i, mode in enumerate(MODES)]
    rows[3]["prompt"] = [{"role": "user", "content": "the quick fox"}]  # messages stay messages
    return rows


@pytest.fixture
def setup(tmp_path, tiny_model_dir):
    (tmp_path / "lp_rewards.py").write_text(REWARDS_PY)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in prompt_rows()))
    job = {
        "base_model": str(tiny_model_dir),
        "objective": "dpo",  # the config of a later dpo run: label-pairs reads it as online_dpo
        "preference": {"beta": 0.2},
        "data": {"train": str(data), "max_seq_len": 64},  # format auto: prompt rows
        "reward": {"functions": ["lp_rewards:by_mode"]},
        "sampling": {"num_generations": 3, "max_completion_length": 6, "batch_size": 6},
        "training": {"seed": 3, "precision": "fp32", "device": "cpu", "num_threads": 1},
        "output_dir": str(tmp_path / "run"),
    }
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job))
    return config


def run(config, out, overrides=(), **options) -> LabelReport:
    options.setdefault("progress", False)
    options.setdefault("say", lambda message: None)
    return label_pairs(load_label_job(config, list(overrides)), out, **options)


def rows_of(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_pairs_are_valid_preference_rows_that_train_with_dpo(setup, tmp_path, tiny_model_dir):
    out = tmp_path / "pairs.jsonl"
    report = run(setup, out)
    rows = rows_of(out)
    assert report.finished and report.prompts_done == len(MODES)
    assert (report.ties, report.unscored) == (1, 2)  # "tie"; "none" and "one"
    assert report.pairs == len(rows) == len(MODES) - 3 - report.empty - report.identical
    assert report.answers == 3 * len(MODES)
    by_origin = {f"{Path(setup).parent / 'prompts.jsonl'}:{i + 1}": r for i, r in enumerate(prompt_rows())}
    for row in rows:
        assert list(row) == ["prompt", "chosen", "rejected", *EXTRA_KEYS]
        source = by_origin[row["origin"]]
        assert source["mode"] == "len" and row["prompt"] == source["prompt"]
        assert len(row["scores"]) == 3
        assert row["score_chosen"] == max(row["scores"]) == len(row["chosen"])
        # score 0 = an empty answer (the length is the score), which is never rejected
        assert row["score_rejected"] == min(s for s in row["scores"] if s) == len(row["rejected"])
        assert row["score_chosen"] > row["score_rejected"] and row["chosen"] != row["rejected"]
    assert isinstance(rows_of(out)[2]["prompt"], list)  # the messages prompt (row 4 of the data)
    margins = [r["score_chosen"] - r["score_rejected"] for r in rows]
    assert report.mean_margin == pytest.approx(sum(margins) / len(margins))
    assert "prompts without a pair: 3 (1 ties, 2 unscored, 0 empty, 0 identical)" in report.summary()

    pairs = read_preference(read_file(out), "preference", DataConfig())
    assert len(pairs) == len(rows)

    from peftkit.train.config import build_job_config
    from peftkit.train.loop import run_training

    raw = {
        "base_model": str(tiny_model_dir),
        "objective": "dpo",
        "method": "lora",
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
        "data": {"train": str(out)},
        "training": {"max_steps": 2, "batch_size": 2, "precision": "fp32", "num_threads": 1},
        "evaluation": {"accuracy_after": False},
        "output_dir": str(tmp_path / "dpo"),
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_training(build_job_config(raw), progress=False)
    steps = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2]
    assert (tmp_path / "dpo" / "adapter" / "adapter_model.safetensors").is_file()
    # What the data loader says of the extra keys, if anything: that it ignores them, and no more.
    assert not [str(w.message) for w in caught if "pairs.jsonl" in str(w.message)]

    # The adapter just trained answers instead of the base model (and is part of the settings).
    adapter = tmp_path / "dpo" / "adapter"
    tuned = tmp_path / "tuned.jsonl"
    assert run(setup, tuned, adapter=str(adapter), limit=2).prompts_done == 2
    with pytest.raises(PeftkitError, match=r"other settings \(adapter_files: \"[0-9a-f]{20}.*then, null now"):
        run(setup, tuned, resume=True)


def _prompt(text_prompt=True) -> PromptExample:
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    return PromptExample([1, 2], prompt, text_prompt, {}, "p.jsonl:1")


def _answers(*texts) -> list[SampledAnswer]:
    return [SampledAnswer([5] * max(1, len(t)), t, True) for t in texts]


@pytest.mark.parametrize(
    "texts,scores,reason",
    [
        (("a", "b", "c"), [0.5, 0.5, 0.5], "ties"),
        (("a", "b", "c"), [None, 0.5, None], "unscored"),
        (("a", "b", "c"), [None, None, None], "unscored"),
        (("a", "", "c"), [None, 0.9, 0.1], "empty"),  # an empty answer is never chosen or rejected
        (("four", "four", "five"), [1.0, 0.0, None], "identical"),
    ],
)
def test_prompts_without_a_pair_are_counted(texts, scores, reason):
    report = LabelReport("x")
    assert pair_row(_prompt(), _answers(*texts), scores, report) is None
    assert getattr(report, reason) == 1 and report.dropped == 1 and report.pairs == 0


def test_pair_row_skips_empty_answers_and_keeps_the_prompt_as_the_data_gave_it():
    report = LabelReport("x")
    row = pair_row(_prompt(), _answers("4", "", "5", "four"), [0.2, 5.0, -1.0, None], report)
    assert row["chosen"] == "4" and row["rejected"] == "5"
    assert (row["score_chosen"], row["score_rejected"]) == (0.2, -1.0)
    assert row["scores"] == [0.2, 5.0, -1.0, None] and row["prompt"] == "2+2?"
    assert (report.pairs, report.empty_answers, report.margin_sum) == (1, 1, pytest.approx(1.2))
    messages = pair_row(_prompt(False), _answers("4", "5"), [1.0, 0.0], report, "be brief")["prompt"]
    assert messages == [{"role": "user", "content": "2+2?"}]  # data.system_prompt is not written in
    kept = pair_row(_prompt(False), _answers("4", "5"), [1.0, 0.0], report, None)["prompt"]
    assert kept[0] == {"role": "system", "content": "be brief"}  # the row's own system message stays


def test_limit_then_resume_and_an_interrupted_run_write_what_a_straight_run_writes(
    setup, tmp_path, monkeypatch
):
    # 3 prompts per batch (batch_size 6 / 2 answers). Each answer has its own seed (the prompt's
    # place in the data, the answer's number): other batches sample the same answers.
    options = {"num_generations": 2}
    straight = tmp_path / "straight.jsonl"
    whole = run(setup, straight, **options)
    expected = straight.read_bytes()
    assert whole.pairs >= 3 and whole.prompts_done == len(MODES)

    limited = tmp_path / "limited.jsonl"
    first = run(setup, limited, limit=4, **options)  # stops inside the second batch
    assert first.prompts_done == 4 and not first.finished
    assert "5 prompts left: run again with --resume" in first.summary()
    assert json.loads(state_path(limited).read_text())["prompts_done"] == 4
    resumed = run(setup, limited, ["sampling.batch_size=4"], resume=True, **options)
    assert limited.read_bytes() == expected
    assert resumed.resumed_at == 4 and resumed.counts() == whole.counts()

    # Interrupted in the third judge call (after two batches were written), then killed mid-write.
    cut = tmp_path / "cut.jsonl"
    monkeypatch.setenv("LP_STOP_AT_CALL", "3")
    with pytest.raises(KeyboardInterrupt):
        run(setup, cut, **options)
    monkeypatch.delenv("LP_STOP_AT_CALL")
    state = json.loads(state_path(cut).read_text())
    assert state["prompts_done"] == 6 and state["bytes"] == cut.stat().st_size
    with open(cut, "a") as handle:
        handle.write('{"prompt": "word 6 is", "chosen": "half a li')
    notes = []
    again = run(setup, cut, resume=True, say=notes.append, **options)
    assert cut.read_bytes() == expected and again.counts() == whole.counts()
    assert any("dropped" in n and "after the last recorded prompt" in n for n in notes)

    # Finished: resuming again has nothing to do and changes nothing.
    assert run(setup, cut, resume=True, **options).prompts_done == len(MODES)
    assert cut.read_bytes() == expected


def _no_model_loads(monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(peftkit.models, "load_model_and_tokenizer", no_loading)


def test_existing_output_and_other_settings_are_refused_before_the_model_loads(setup, tmp_path, monkeypatch):
    out = tmp_path / "pairs.jsonl"
    run(setup, out, limit=3)
    before = out.read_bytes()
    _no_model_loads(monkeypatch)
    with pytest.raises(PeftkitError, match=r"already exists.*--resume to continue it, --overwrite"):
        run(setup, out)
    with pytest.raises(PeftkitError, match=r"other settings \(sampling.num_generations: 3 then, 2 now\)"):
        run(setup, out, resume=True, num_generations=2)
    with pytest.raises(PeftkitError, match=r"other settings \(sampling.temperature: 1.0 then, 0.7 now\)"):
        run(setup, out, ["sampling.temperature=0.7"], resume=True)
    with pytest.raises(PeftkitError, match=r"other settings \(seed: 3 then, 4 now\)"):
        run(setup, out, ["training.seed=4"], resume=True)
    with pytest.raises(ConfigError, match="give one of them"):
        run(setup, out, resume=True, overwrite=True)
    assert out.read_bytes() == before
    other = tmp_path / "other.jsonl"
    other.write_text('{"prompt": "x", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(PeftkitError, match=r"no state file other.jsonl.state.json"):
        run(setup, other, resume=True)


def test_bad_reward_function_and_bad_configs_are_clear_errors(setup, tmp_path, monkeypatch, capsys):
    _no_model_loads(monkeypatch)
    out = tmp_path / "pairs.jsonl"
    with pytest.raises(PeftkitError, match=r"lp_rewards:by_mod.*has no 'by_mod'; did you mean by_mode"):
        run(setup, out, ["reward.functions=[lp_rewards:by_mod]"])
    with pytest.raises(PeftkitError, match=r"cannot find module 'no_such_module'"):
        run(setup, out, ["reward.functions=[no_such_module:f]"])
    with pytest.raises(ConfigError, match=r"section 'reward' names no judge"):
        load_label_job(setup, ["reward.functions=[]"])
    with pytest.raises(ConfigError, match=r"'data.format' is preference, but label-pairs samples answers"):
        load_label_job(setup, ["data.format=preference"])
    with pytest.raises(ConfigError, match=r"--num-generations \(sampling.num_generations\) must be >= 2"):
        run(setup, out, num_generations=1)
    with pytest.raises(ConfigError, match=r"--limit must be at least 1, got 0"):
        run(setup, out, limit=0)
    assert not out.exists()
    code = main(["label-pairs", str(setup), "--out", str(out), "--set", "reward.functions=[lp_rewards:nope]"])
    assert code == 2 and "has no 'nope'" in capsys.readouterr().err


def test_cli_in_a_subprocess(setup, tmp_path):
    out = tmp_path / "cli.jsonl"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    command = [sys.executable, "-m", "peftkit", "label-pairs", str(setup), "--out", str(out)]
    done = subprocess.run(
        [*command, "--limit", "4", "--no-progress", "--threads", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "label-pairs: 4 of 9 prompts labelled" in done.stderr
    assert "prompts without a pair" in done.stderr and "--resume" in done.stderr
    assert done.stdout == ""
    assert len(rows_of(out)) == json.loads(state_path(out).read_text())["counts"]["pairs"]
