"""benchmarks/train_throughput.py on a tiny random Llama: every field present and sane (never speed).

The fast test runs the configurations in-process; the slow one runs the real subprocess path.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import load_benchmark

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "train_throughput.py"
ROWS = [
    {"prompt": f"word {w} number {i} is", "completion": c}
    for i in range(12)
    for w, c in [("good", "positive"), ("bad", "negative")]
]
RUN_FIELDS = [
    "name",
    "bf16",
    "optimizer",
    "attention",
    "peak_rss_mb",
    "final_train_loss",
    "batches_digest",
    "timed_steps",
    "timed_s",
    "step_time_s",
    "step_times_s",
    "tokens_timed",
    "tokens_per_s",
    "trainable_params",
    "param_counts",
    "model_flops_timed",
    "model_flops_timed_dense_head",
    "wall_s",
    "heldout_loss",
    "model_flops_per_s",
    "mfu_pct",
    "mfu_dense_head_pct",
]


def load_script():
    return load_benchmark(SCRIPT)


def bench_argv(tmp_path: Path, model_dir: Path, steps: int = 3) -> list[str]:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return [
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--set",
        "data.test_size=8",
        "--set",
        "data.val_size=null",
        "--set",
        "data.max_train_examples=null",
        "--steps",
        str(steps),
        "--batch-size",
        "4",
        "--heldout",
        "6",
        "--threads",
        "1",
        "--matmul-size",
        "128",
        "--json",
        str(tmp_path / "out.json"),
    ]


def check_results(results: dict, steps: int) -> None:
    peak = results["peak"]
    assert peak["fp32_gflops"] > 0 and peak["bf16_gflops"] > 0 and peak["matmul_size"] == 128
    assert peak[f"{peak['ceiling']}_gflops"] == max(peak["fp32_gflops"], peak["bf16_gflops"])
    assert 0 < peak["fp32_matmul_size"] <= 128 and 0 < peak["bf16_matmul_size"] <= 128
    a, a_same, b = results["a"], results["a_same"], results["b"]
    for run in (a, a_same, b):
        assert set(RUN_FIELDS) <= set(run), set(RUN_FIELDS) - set(run)
        assert run["timed_steps"] == steps - 2
        assert len(run["step_times_s"]) == steps - 1
        assert run["timed_s"] > 0 and run["step_time_s"] > 0 and run["tokens_per_s"] > 0
        assert math.isclose(run["tokens_per_s"], run["tokens_timed"] / run["timed_s"])
        assert 50 < run["peak_rss_mb"] < 64_000
        assert 0 < run["mfu_pct"] <= run["mfu_dense_head_pct"] < 100
        assert math.isfinite(run["heldout_loss"]) and math.isfinite(run["final_train_loss"])
        # LoRA r=16 on every linear layer of the tiny Llama (2 layers, hidden 32, mlp 64, kv 16):
        # per layer q,o: 16*(32+32); k,v: 16*(32+16); gate,up: 16*(32+64); down: 16*(64+32).
        assert run["trainable_params"] == 2 * 16 * (2 * 64 + 2 * 48 + 3 * 96)
        assert run["param_counts"] == b["param_counts"]
    # a_same trained on the very same token sequences as b, so the model FLOPs of the timed steps
    # are equal and only the time differs; a drew its own shuffled batches.
    assert a_same["batches_digest"] == b["batches_digest"] != a["batches_digest"]
    assert a_same["tokens_timed"] == b["tokens_timed"]
    assert a_same["model_flops_timed"] == b["model_flops_timed"]
    score = results["score"]
    assert score["heldout_examples"] == 6
    # Three steps at the job's lr 1e-3 lower the held-out loss, and on the same batches the two
    # libraries agree.
    for run in (a, a_same, b):
        assert run["heldout_loss"] < score["heldout_loss_base"]
    assert abs(a_same["heldout_loss"] - b["heldout_loss"]) < 0.05 * a_same["heldout_loss"]
    for name, run in (("a", a), ("a_same", a_same)):
        ratios = results[f"ratios_b_over_{name}"]
        assert math.isclose(ratios["tokens_per_s"], b["tokens_per_s"] / run["tokens_per_s"])
    assert results["settings"]["steps"] == steps


def test_model_flops_formula():
    """6 x trained + 4 x frozen body per token, head on labelled tokens, 12 L d s^2 attention."""
    tt = load_benchmark(SCRIPT.parent / "train_measures.py")
    ex = SimpleNamespace(input_ids=[1, 2, 3, 4, 5], labels=[-100, -100, -100, 7, 8])  # s=5, 2 labelled
    counts = {"frozen_body": 1000, "head": 300, "n_layers": 2, "d_attn": 8}
    expected = 6 * 10 * 5 + 4 * 1000 * 5 + 4 * 300 * 2 + 12 * 2 * 8 * 25
    assert tt.model_flops([[ex]], counts, trained=10, dense_head=False) == expected
    dense = expected + 4 * 300 * 3
    assert tt.model_flops([[ex, ex]], counts, trained=10, dense_head=True) == 2 * dense


def test_benchmark_inprocess(tmp_path, tiny_model_dir, capsys):
    import torch

    tt = load_script()
    threads = torch.get_num_threads()
    try:
        tt.main([*bench_argv(tmp_path, tiny_model_dir), "--inprocess"])
    finally:
        torch.set_num_threads(threads)  # --threads 1 must not leak into later tests
    results = json.loads((tmp_path / "out.json").read_text())
    check_results(results, steps=3)
    table = capsys.readouterr().out
    assert "tokens/s (non-pad)" in table and "b/a_same" in table and "MFU" in table


@pytest.mark.slow
def test_benchmark_subprocesses(tmp_path, tiny_model_dir):
    """The real path: one subprocess per configuration, so each peak RSS is its own."""
    argv = bench_argv(tmp_path, tiny_model_dir, steps=4)
    done = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out.json").read_text())
    check_results(results, steps=4)
    assert "b/a" in done.stdout
