"""benchmarks/serve_throughput.py on a tiny random Llama: every part runs and every field is present and
sane (never speed): a real `peftkit serve` process with 4 adapters, 1 and 2 clients, the reference
pass, generate vs the Engine in process, and the decode-step profile."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import load_benchmark

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "serve_throughput.py"
CLIENTS = SCRIPT.parent / "serve_clients.py"  # its server side: the request list, percentiles
LEVEL_FIELDS = {
    "clients",
    "requests",
    "reps",
    "tokens_per_s",
    "ttft_s",
    "token_latency_s",
    "request_s",
    "peak_running",
    "finish",
    "same_as_alone",
    "same_checked",
}
PROFILE_FIELDS = {
    "batch",
    "adapters",
    "ms_per_step",
    "forward_ms_per_step",
    "wrapper_ms_per_step",
    "loop_ms_per_step",
    "profiled_ms_per_step",
    "weights_mm_pct",
    "lora_mm_pct",
    "mm_pct",
    "attention_pct",
    "other_ops_pct",
    "outside_ops_pct",
    "top_ops_ms_per_window",
}


def test_benchmark_every_part(tmp_path, tiny_model_dir, capsys):
    import torch

    st = load_benchmark(SCRIPT)
    out = tmp_path / "out.json"
    argv = ["--model", str(tiny_model_dir), "--clients", "1,2", "--requests-per-client", "1"]
    argv += ["--max-tokens", "4", "--threads", "1", "--single-prompts", "1", "--profile-steps", "2"]
    # r=4: no tiny-Llama weight is 4 wide (k/v_proj are 16), so the profile tells LoRA's matmuls apart.
    argv += ["--profile-batches", "1,2", "--r", "4", "--json", str(out)]
    threads = torch.get_num_threads()
    returned = st.main(argv)
    assert torch.get_num_threads() == threads  # the in-process loader's --threads is undone
    results = json.loads(out.read_text())
    assert results["levels"] == json.loads(json.dumps(returned["levels"]))
    assert results["server"]["exit_code"] == 0  # SIGTERM: a graceful shutdown

    levels = results["levels"]
    assert list(levels) == ["1", "2"]
    for n, level in levels.items():
        assert LEVEL_FIELDS <= set(level), LEVEL_FIELDS - set(level)
        assert level["clients"] == int(n) and level["requests"] == int(n)
        (rep,) = level["reps"]
        assert 0 < rep["tokens"] <= int(n) * 4
        assert math.isclose(rep["tokens_per_s"], rep["tokens"] / rep["wall_s"])
        assert level["tokens_per_s"] == rep["tokens_per_s"]
        assert 1 <= rep["health_peak_running"] <= 2
        for key in ("ttft_s", "request_s"):
            p = level[key]
            assert 0 < p["p50"] <= p["p90"] <= p["p99"]
        # fp32: a row's answer does not depend on what else is in the batch.
        assert level["same_as_alone"] == 1.0 and level["same_checked"] == int(n)
    assert [r["k"] for r in results["requests"]["2"]] == [0, 1]
    # Request 1 was asked only by 2 clients: the reference pass answered it alone.
    assert results["reference"]["requests"] == 1
    assert set(results["answers"]) == {"0|base", "1|a1"}
    bar = results["bar"]
    assert bar["clients"] == 2 and bar["bar"] == 4.0
    assert math.isclose(bar["ratio"], levels["2"]["tokens_per_s"] / levels["1"]["tokens_per_s"])
    assert "2 clients / 1 client aggregate tokens/s" in bar["text"]

    single = results["single_stream"]
    for path in ("generate", "engine"):
        for config in ("base", "lora"):
            entry = single[path][config]
            assert entry["tokens"] > 0 and entry["tokens_per_s"] > 0
    for config in ("base", "lora"):
        assert single["engine"][config]["same_tokens_as_generate"] == 1.0  # greedy, fp32, batch 1
        assert single["engine"][config]["median_paired_ratio_to_generate"] > 0
    assert single["server"]["one_client"]["tokens_per_s"] == levels["1"]["tokens_per_s"]

    profile = results["profile"]
    assert list(profile) == [
        "engine_b1_a1",
        "engine_b1_base",
        "engine_b2_mixed",
        "generate_b1_a1",
        "generate_b1_base",
    ]
    for name, p in profile.items():
        assert PROFILE_FIELDS <= set(p), PROFILE_FIELDS - set(p)
        assert p["ms_per_step"] > 0 and p["forward_ms_per_step"] > 0 and p["profiled_ms_per_step"] > 0
        assert p["weights_mm_pct"] > 0 and p["attention_pct"] > 0  # the attention label was seen
        assert "base" in name or p["lora_mm_pct"] > 0  # a1's A and B, told apart by the rank
        shares = ("weights_mm_pct", "lora_mm_pct", "attention_pct", "other_ops_pct", "outside_ops_pct")
        assert all(0 <= p[k] <= 100 for k in shares)
    assert profile["engine_b1_base"]["lora_mm_pct"] == 0 == profile["generate_b1_base"]["lora_mm_pct"]
    assert profile["engine_b2_mixed"]["adapters"] == ["__base__", "a1"]
    assert profile["generate_b1_a1"]["wrapper_ms_per_step"] == 0  # generate bypasses PeftModel.forward

    s = results["settings"]
    assert s["clients"] == [1, 2] and s["threads"] == 1 and s["dtype"] == "fp32" and s["max_tokens"] == 4
    assert {"cpu_model", "avx512_bf16", "cpus"} <= set(results["machine"])
    table = capsys.readouterr().out
    assert "aggregate tok/s" in table and "Single stream" in table and "Where a decode step goes" in table


def test_request_numbers_fix_prompt_and_model():
    clients = load_benchmark(CLIENTS)
    assert clients.request_pair(0) == (0, "base") and clients.request_pair(6) == (6, "a1")
    # 16 prompts, 5 models: the 32 requests of 16 clients x 2 are 32 different (prompt, model) pairs.
    assert len({clients.request_pair(k) for k in range(32)}) == 32


def test_percentiles_interpolate():
    clients = load_benchmark(CLIENTS)
    assert clients.percentiles([]) == {"p50": None, "p90": None, "p99": None}
    assert clients.percentiles([3.0, 1.0, 2.0]) == {
        "p50": 2.0,
        "p90": pytest.approx(2.8),
        "p99": pytest.approx(2.98),
    }


def test_bad_arguments_rejected():
    st = load_benchmark(SCRIPT)
    for argv in (["--clients", "0,4"], ["--clients", "a"], ["--max-tokens", "0"], ["--single-prompts", "17"]):
        with pytest.raises(SystemExit):
            st.parse_args(argv)
    assert st.parse_args(["--clients", "16,1,4,4"]).levels == [1, 4, 16]
