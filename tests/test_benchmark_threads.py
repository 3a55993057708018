"""benchmarks/threads_under_load.py runs end to end (tiny model, one step per configuration)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import load_benchmark


def test_threads_under_load_reports_every_load_and_thread_count(tiny_model_dir, tmp_path):
    bench = load_benchmark(Path(__file__).parents[1] / "benchmarks" / "threads_under_load.py")
    before = torch.get_num_threads()
    out = tmp_path / "threads.json"
    bench.main(
        ["--model", str(tiny_model_dir), "--busy", "1", "--steps", "1", "--seq", "8", "--json", str(out)]
    )
    assert torch.get_num_threads() == before  # the caller's threads are restored
    result = json.loads(out.read_text())
    counts = sorted({before, *range(1, before)})
    assert sorted((r["busy"], r["threads"]) for r in result["runs"]) == [
        (b, n) for b in (0, 1) for n in counts
    ]
    assert all(r["median_step_s"] > 0 for r in result["runs"])
    assert all(r["vs_default"] == 1.0 for r in result["runs"] if r["threads"] == before)
