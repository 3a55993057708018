"""benchmarks/generate_throughput.py on a tiny random Llama: every field present and sane (never speed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import load_benchmark

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "generate_throughput.py"
RUN_FIELDS = {
    "name",
    "tokens",
    "tokens_timed",
    "timed_s",
    "rep_times_s",
    "tokens_per_s",
    "best_tokens_per_s",
    "ratio_to_base",
    "best_ratio_to_base",
    "median_paired_ratio_to_base",
}


def load_script():
    return load_benchmark(SCRIPT)


@pytest.mark.parametrize("batch_size", [2, 1])
def test_benchmark_every_configuration(tmp_path, tiny_model_dir, capsys, batch_size):
    import torch

    gt = load_script()
    threads = torch.get_num_threads()
    out = tmp_path / "out.json"
    argv = ["--model", str(tiny_model_dir), "--prompts", "2", "--batch-size", str(batch_size)]
    argv += ["--max-new-tokens", "6", "--reps", "2", "--threads", "1", "--json", str(out)]
    argv += ["--configs", "lora,merged,inplace"]
    try:
        returned = gt.main(argv)
    finally:
        torch.set_num_threads(threads)  # --threads 1 must not leak into later tests
    results = json.loads(out.read_text())
    assert results["configs"] == json.loads(json.dumps(returned["configs"]))
    configs = results["configs"]
    assert list(configs) == ["base", "lora", "merged", "inplace"]
    for name, run in configs.items():
        assert RUN_FIELDS <= set(run), RUN_FIELDS - set(run)
        assert len(run["rep_times_s"]) == 2 and all(t > 0 for t in run["rep_times_s"])
        assert 0 <= run["tokens"] <= 2 * 6
        assert math.isclose(run["timed_s"], sum(run["rep_times_s"]))
        assert run["tokens_timed"] == 2 * run["tokens"]  # greedy: every rep the same tokens
        assert math.isclose(run["tokens_per_s"], run["tokens_timed"] / run["timed_s"])
        assert math.isclose(run["ratio_to_base"], run["tokens_per_s"] / configs["base"]["tokens_per_s"])
        # fp32, tiny model: merging is exact enough that greedy decoding picks the same tokens.
        if name in ("merged", "inplace"):
            assert run["same_tokens_as_lora"] == 1.0
    # ... and the check is not vacuous: the random adapter changes the base model's tokens.
    assert configs["base"]["same_tokens_as_lora"] < 1.0
    assert "same_tokens_as_lora" not in configs["lora"]
    assert configs["base"]["ratio_to_base"] == 1.0 == configs["base"]["median_paired_ratio_to_base"]
    for run in configs.values():  # the median of two paired ratios lies between them
        paired = [
            (run["tokens"] / t) / (configs["base"]["tokens"] / tb)
            for t, tb in zip(run["rep_times_s"], configs["base"]["rep_times_s"])
        ]
        assert min(paired) - 1e-9 <= run["median_paired_ratio_to_base"] <= max(paired) + 1e-9
    s = results["settings"]
    assert s["prompts"] == 2 and s["batch_size"] == batch_size and s["threads"] == 1 and s["reps"] == 2
    assert s["dtype"] == "fp32" and len(s["prompt_tokens"]) == 2
    table = capsys.readouterr().out
    assert "tokens/s" in table and "x base" in table and "same as lora" in table


def test_recorded_tokens_match_generate_completions(tiny_model_dir):
    """The counted tokens are exactly the text generate_completions returns (order undone, eos cut)."""
    import torch

    from peftkit.evaluation import generate_completions
    from peftkit.models import load_model_and_tokenizer

    gt = load_script()
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    prompts = gt.tweet_prompts(tok, 3)
    assert len({len(p) for p in prompts}) > 1  # lengths differ: the sort really reorders
    args = gt.parse_args(["--model", str(tiny_model_dir), "--batch-size", "2", "--max-new-tokens", "8"])
    torch.manual_seed(0)
    _, tokens = gt.run_once(model, tok, prompts, args)
    texts = generate_completions(model, tok, prompts, max_new_tokens=8, batch_size=2, progress=False)
    assert [tok.decode(t, skip_special_tokens=True).strip() for t in tokens] == texts
    assert "generate" not in vars(model)  # the recorder put the class's method back


def test_bad_configs_rejected():
    gt = load_script()
    with pytest.raises(SystemExit):
        gt.parse_args(["--configs", "base,nope"])
    assert gt.parse_args(["--configs", "merged"]).config_list == ["base", "merged"]


def test_profile_counts_lora_matmuls(tmp_path, tiny_model_dir):
    """--profile: LoRA's own matmuls are told apart by the rank (r=4: no tiny-Llama weight is 4 wide)."""
    import torch

    gt = load_script()
    threads = torch.get_num_threads()
    argv = ["--model", str(tiny_model_dir), "--prompts", "2", "--batch-size", "2", "--max-new-tokens", "3"]
    argv += ["--reps", "1", "--configs", "lora", "--r", "4", "--alpha", "8", "--profile", "3"]
    try:
        results = gt.main([*argv, "--threads", "1", "--json", str(tmp_path / "out.json")])
    finally:
        torch.set_num_threads(threads)
    p = results["profile_lora"]
    # Every forward runs A and B of 7 linear layers in each of the 2 layers: 28 LoRA matmuls.
    assert p["lora_mm_calls"] > 0 and p["lora_mm_calls"] % 28 == 0
    assert p["lora_mm_calls"] < p["mm_calls"] and 0 < p["lora_mm_us"] < p["mm_us"] <= p["self_cpu_us_total"]
    assert "aten::" in p["table"]
