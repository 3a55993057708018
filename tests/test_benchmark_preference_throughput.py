"""benchmarks/preference_throughput.py --tiny: TRL DPOTrainer and peftkit DPO on a tiny random Llama,
each in its own subprocess, in turns; every field present and sane (never speed)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from conftest import load_benchmark

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_one_round(script: str, options: str, tmp_path: Path, bar: set[str], heading: str) -> dict:
    """benchmarks/``script`` with ``options`` and --rounds 1, in its own process; its results, once
    the parts every side-by-side benchmark has are checked: one round (TRL moving first), both
    frameworks summarised, the checks of the ``bar`` (and whether it is met), and the table (its
    ``heading``) with the load average printed."""
    out = tmp_path / "out.json"
    argv = [*options.split(), "--rounds", "1", "--out", str(out)]
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert len(results["rounds"]) == 1 and results["rounds"][0]["first"] == "trl"
    assert set(results["summary"]["frameworks"]) == {"trl", "peftkit"}
    assert set(results["summary"]["bar"]) == {*bar, "met"}
    assert heading in done.stdout and "load average" in done.stdout
    return results


def test_tiny_benchmark_runs_both_frameworks_on_the_same_batches(tmp_path):
    options = "--tiny --steps 3 --batch-size 4 --heldout 12"
    bar = {"tokens_per_s_at_least_2x", "peak_rss_at_most_0.7x", "accuracy_equal_or_better"}
    heading = "| tokens/s (chosen + rejected, non-pad) |"
    results = run_one_round("preference_throughput.py", options, tmp_path, bar, heading)
    for r in results["rounds"]:
        trl, pk = r["trl"], r["peftkit"]
        # the very same batches: same hashes, so the same tokens per step
        assert trl["batches_digest"] == pk["batches_digest"]
        assert trl["tokens_per_step"] == pk["tokens_per_step"] and len(pk["tokens_per_step"]) == 3
        assert trl["bf16"] == pk["bf16"] == (results["settings"]["precision"] == "bf16")
        for run in (trl, pk):
            assert run["steps"] == 3 and run["timed_steps"] == 2 and len(run["step_times_s"]) == 2
            assert run["tokens_timed"] == sum(run["tokens_per_step"][1:]) > 0
            assert math.isclose(run["tokens_per_s"], run["tokens_timed"] / run["timed_s"])
            assert 50 < run["peak_rss_mb"] < 64_000 and run["train_peak_rss_mb"] <= run["peak_rss_mb"]
            assert len(run["losses"]) == 3 and all(math.isfinite(x) for x in run["losses"])
            assert abs(run["losses"][0] - math.log(2)) < 1e-3  # policy = reference at step 1
        assert math.isclose(r["ratio_tokens_per_s"], pk["tokens_per_s"] / trl["tokens_per_s"])
    score = results["score"]
    assert score["heldout_pairs"] == 12
    for name in ("trl", "peftkit"):
        assert 0 <= score[name]["preference_accuracy"] <= 1 and math.isfinite(score[name]["mean_margin"])
    # two LoRA runs with the same settings on the same batches learn about the same margins
    assert (
        abs(score["trl"]["mean_margin"] - score["peftkit"]["mean_margin"])
        < 0.5 * abs(score["peftkit"]["mean_margin"]) + 1e-3
    )


def test_pairs_are_disjoint_and_rejected_is_wrong():
    measures = load_benchmark(BENCHMARKS / "preference_measures.py")
    train, heldout = measures.toy_pairs(10, 5)
    assert len(train) == 10 and len(heldout) == 5
    for row in train + heldout:
        assert row["chosen"] != row["rejected"] and {row["chosen"], row["rejected"]} <= set(measures.LABELS)
        assert row["prompt"][0] == {"role": "system", "content": measures.SYSTEM_PROMPT}
    assert not {r["prompt"][1]["content"] for r in train} & {r["prompt"][1]["content"] for r in heldout}


def test_preference_scores():
    import torch

    measures = load_benchmark(BENCHMARKS / "preference_measures.py")
    reference = torch.tensor([[-2.0, -3.0], [-1.0, -1.0]])
    policy = torch.tensor([[-1.0, -3.5], [-1.5, -0.5]])  # pair 0 margin +1.5, pair 1 -1.0 (x beta)
    scores = measures.preference_scores(policy, reference, beta=0.1)
    assert scores["preference_accuracy"] == 0.5
    assert math.isclose(scores["mean_margin"], 0.1 * (1.5 - 1.0) / 2, rel_tol=1e-6)
    assert scores["chosen_more_likely"] == 0.5
