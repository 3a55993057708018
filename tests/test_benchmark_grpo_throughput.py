"""benchmarks/grpo_throughput.py --tiny: TRL GRPOTrainer and peftkit GRPO on a tiny random Llama,
each in its own subprocess, in turns; every field present and sane (never speed)."""

from __future__ import annotations

import math

from conftest import load_benchmark
from test_benchmark_preference_throughput import BENCHMARKS, run_one_round


def test_tiny_benchmark_runs_both_frameworks_on_the_same_prompts(tmp_path):
    options = "--tiny --steps 3 --batch-size 2 --max-completion-length 8"
    bar = {"step_time_at_least_2x", "step_time_per_completion_token_at_least_2x"}
    results = run_one_round("grpo_throughput.py", options, tmp_path, bar, "| framework | s/step |")
    r = results["rounds"][0]
    trl, pk = r["trl"], r["peftkit"]
    assert trl["prompts_digest"] == pk["prompts_digest"]  # the same prompt tokens, step by step
    assert trl["bf16"] == pk["bf16"] == (results["settings"]["precision"] == "bf16")
    assert not trl["gradient_checkpointing"] and not pk["gradient_checkpointing"]
    for run in (trl, pk):
        assert run["steps"] == 3 and run["timed_steps"] == 2 and len(run["step_times_s"]) == 2
        assert len(run["per_step"]) == 3
        for step in run["per_step"]:
            assert step["completions"] == 2 * 4  # prompts x answers
            assert 0 < step["completion_tokens"] <= 2 * 4 * 8
            assert step["trained_tokens"] > step["completion_tokens"]
            assert 0 < step["generate_s"] and step.get("reference_s", 0) == 0  # beta 0: no reference pass
        assert run["completions_timed"] == 16
        assert run["completion_tokens_timed"] == sum(s["completion_tokens"] for s in run["per_step"][1:])
        assert math.isclose(run["completion_tokens_per_s"], run["completion_tokens_timed"] / run["timed_s"])
        assert 0 < run["generation_share"] < 1 and run["train_s_per_step"] > 0
        assert 0 < run["mean_completion_length"] <= 8
        assert 50 < run["peak_rss_mb"] < 64_000
        assert len(run["losses"]) == 3 and all(math.isfinite(x) for x in run["losses"])
        assert len(run["rewards"]) == 3 and all(0 <= x <= 1.1 for x in run["rewards"])
    assert math.isclose(r["ratios"]["step_time_speedup"], trl["step_time_s"] / pk["step_time_s"])


def test_arithmetic_rows_and_reward():
    measures = load_benchmark(BENCHMARKS / "grpo_measures.py")
    rows = measures.arithmetic_rows(30, seed=1)
    assert rows == measures.arithmetic_rows(30, seed=1) and rows != measures.arithmetic_rows(30, seed=2)
    for row in rows:
        question = row["prompt"][0]["content"]
        a, op, b = question.removeprefix("What is ").split("?")[0].split()
        assert row["prompt"][0]["role"] == "user" and str(eval(f"{a} {op} {b}")) == row["answer"]
    completions = ["85", [{"role": "assistant", "content": "It is 85."}], "84", "eighty-five", ""]
    scores = measures.arithmetic_reward(["p"] * 5, completions, answer=["85"] * 5, completion_ids=None)
    assert scores == [1.1, 1.1, 0.1, 0.0, 0.0]
    assert measures.arithmetic_reward(["p"], ["-3 is it"], answer=["-3"]) == [1.1]
