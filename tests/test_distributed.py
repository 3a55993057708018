"""Data-parallel training (train/distributed.py): 2 processes with gloo equal 1 process.

Each case trains the same global batch once in one process and once under `peftkit train
--nproc 2` (torchrun, gloo on this CPU); the adapters must agree to 1e-5 (fp32).
"""

from __future__ import annotations

import json
import subprocess
import sys
from argparse import Namespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import TINY_ROWS, save_tiny_model_dir
from peftkit.cli.train import torchrun_command
from peftkit.train.config import build_job_config
from peftkit.train.distributed import World
from peftkit.train.loop import run_training


def _raw_job(model_dir, tmp_path, out, *, batch_size, test_size, accum, steps=4) -> dict:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS))
    return {
        "base_model": str(model_dir),
        "method": "lora",
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
        "data": {"train": str(data), "test_size": test_size},
        "training": {
            "max_steps": steps,
            "batch_size": batch_size,
            "gradient_accumulation_steps": accum,
            "learning_rate": 1e-2,
            "precision": "fp32",
            "seed": 7,
            "log_every": 1,
        },
        "evaluation": {"accuracy_after": False},
        "output_dir": str(out),
    }


def _train_two_processes(raw: dict, tmp_path) -> subprocess.CompletedProcess:
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "peftkit", "train", str(config), "--nproc", "2", "--no-progress"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize(
    "per_rank_batch,test_size,accum",
    [
        (2, 4, 2),  # 12 examples, global micro-batch 4, two micro-batches per step
        (5, 5, 1),  # 11 examples, global micro-batch 10: each epoch ends with one example, rank 1 idles
    ],
)
def test_two_processes_end_with_the_single_process_adapter(
    tiny_model_dir, tmp_path, per_rank_batch, test_size, accum
):
    single_out, multi_out = tmp_path / "single", tmp_path / "multi"
    single = _raw_job(
        tiny_model_dir, tmp_path, single_out, batch_size=2 * per_rank_batch, test_size=test_size, accum=accum
    )
    run_training(build_job_config(single), progress=False)
    multi = _raw_job(
        tiny_model_dir, tmp_path, multi_out, batch_size=per_rank_batch, test_size=test_size, accum=accum
    )
    done = _train_two_processes(multi, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]

    a = load_file(single_out / "adapter" / "adapter_model.safetensors")
    b = load_file(multi_out / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-5, key
    assert any(float(t.abs().max()) > 0 for k, t in a.items() if "lora_B" in k)  # it really trained
    # One metrics line per step (rank 0 only), with the global loss and token count.
    single_m, multi_m = _metrics(single_out), _metrics(multi_out)
    assert [r["step"] for r in multi_m] == [r["step"] for r in single_m] == [1, 2, 3, 4]
    for x, y in zip(single_m, multi_m):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * max(1.0, abs(x["loss"]))
        assert x["tokens_seen"] == y["tokens_seen"]
        # Adam's update hardly depends on the gradient's scale: the gradient norm itself must match.
        assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-5 * max(1.0, x["grad_norm"])
    # Only rank 0 printed the results.
    assert done.stdout.count("=== peftkit train: results ===") == 1


def test_shard_splits_a_global_batch_and_pads_an_idle_rank():
    examples = list("abcde")
    assert World(2, 0).shard(examples) == (["a", "c", "e"], True)
    assert World(2, 1).shard(examples) == (["b", "d"], True)
    assert World(3, 2).shard(["a", "b"]) == (["a"], False)  # no example left: a zero-weight stand-in
    assert World().shard(examples) == (examples, True)


def test_nproc_builds_the_torchrun_command():
    args = Namespace(
        config="job.yaml",
        overrides=["training.max_steps=3"],
        resume=True,
        overwrite=False,
        no_progress=True,
        nproc=4,
    )
    command = torchrun_command(args)
    assert command[:5] == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=4",
    ]
    assert command[5:] == [
        "-m",
        "peftkit",
        "train",
        "job.yaml",
        "--set",
        "training.max_steps=3",
        "--resume",
        "--no-progress",
    ]


def test_world_reads_torchrun_environment(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert World.from_environment() == World(1, 0, 0) and not World().distributed
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    world = World.from_environment()
    assert world == World(4, 3, 1) and world.distributed and not world.is_main
    assert torch.device("cpu") == World().start(torch.device("cpu"))  # one process: nothing to join


def test_checkpoint_of_two_processes_resumes_in_one(tiny_model_dir, tmp_path):
    """A checkpoint written under torchrun resumes in a single process with the same global batch
    (batch_size x processes) and ends exactly where the 2-process run ended."""
    import shutil

    straight = tmp_path / "straight"
    raw = _raw_job(tiny_model_dir, tmp_path, straight, batch_size=2, test_size=4, accum=2, steps=5)
    raw["training"]["save_every"] = 2
    done = _train_two_processes(raw, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    single = _raw_job(tiny_model_dir, tmp_path, resumed, batch_size=4, test_size=4, accum=2, steps=5)
    single["training"]["save_every"] = 2
    run_training(build_job_config(single), resume=True, progress=False)
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-5, key


@pytest.mark.slow
@pytest.mark.parametrize(
    "method,section",
    [
        ("ia3", {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
        ("adalora", {"init_r": 6, "target_r": 2, "tinit": 1, "tfinal": 1, "total_step": 4}),
        ("prompt_tuning", {"num_virtual_tokens": 3}),
        ("full", {}),
        ("qlora", {"r": 4, "target_modules": "all-linear"}),
        ("qlora-4bit", {"r": 4, "target_modules": "all-linear"}),
    ],
)
def test_other_methods_under_two_processes(tiny_model_dir, tmp_path, method, section):
    """Methods with their own hooks (AdaLoRA's regularisation and rank allocation, soft prompts'
    forward, full fine-tuning's many parameters) give the single-process result too."""
    single_out, multi_out = tmp_path / "single", tmp_path / "multi"
    if method == "qlora-4bit":  # NF4 blocks of 64 need layers at least 64 wide
        tiny_model_dir = save_tiny_model_dir(tmp_path / "wide-model", hidden_size=64, intermediate_size=128)
    runs = {}
    for out, batch, nproc in [(single_out, 4, 1), (multi_out, 2, 2)]:
        raw = _raw_job(tiny_model_dir, tmp_path, out, batch_size=batch, test_size=4, accum=1)
        del raw["lora"]
        if method == "qlora-4bit":
            raw.update(method="lora", lora=section, quantization={"bits": 4})
        elif (
            method == "qlora"
        ):  # LoRA on an int8 base (bitsandbytes on the CPU; the tiny model is too narrow for 4-bit blocks)
            raw.update(method="lora", lora=section, quantization={"bits": 8})
        else:
            raw.update(method=method, **{method: section})
        if nproc == 1:
            run_training(build_job_config(raw), progress=False)
        else:
            done = _train_two_processes(raw, tmp_path)
            assert done.returncode == 0, done.stderr[-4000:]
        runs[nproc] = load_file(out / "adapter" / "adapter_model.safetensors")
    assert runs[1].keys() == runs[2].keys() and runs[1]
    for key in runs[1]:  # (AdaLoRA may cut a layer's rank to 0: empty tensors)
        torch.testing.assert_close(runs[2][key], runs[1][key], atol=1e-5, rtol=0, msg=key)
    for x, y in zip(_metrics(single_out), _metrics(multi_out)):
        assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-5 * max(1.0, x["grad_norm"])


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_brings_the_job_down(tiny_model_dir, tmp_path, how):
    """Rank 1 raises (or is SIGKILLed) at its third step: the job ends with an error within
    seconds, rank 0 says it lost the other process instead of waiting in the all-reduce, and
    nothing claims to be a finished adapter."""
    import time
    from pathlib import Path

    out = tmp_path / "run"
    raw = _raw_job(tiny_model_dir, tmp_path, out, batch_size=2, test_size=4, accum=1, steps=6)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    script = Path(__file__).with_name("_failing_rank.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    started = time.monotonic()
    done = subprocess.run(
        [*command, str(script), how, str(config)], capture_output=True, text=True, timeout=240
    )
    assert done.returncode != 0
    assert time.monotonic() - started < 120
    assert "rank 1" in done.stderr or "local_rank: 1" in done.stderr, done.stderr[-3000:]
    if how == "raise":  # torchrun's failure summary carries rank 1's error (its error file)
        assert "injected failure on rank 1" in done.stderr.split("Root Cause")[-1]
    assert not (out / "adapter").exists()
