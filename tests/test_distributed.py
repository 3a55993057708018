"""Data-parallel training (train/distributed.py, train/fsdp.py): 2 processes with gloo equal 1.

Each case trains the same global batch once in one process and once in two, under DDP and FSDP;
the adapters must agree to 1e-5 (fp32). The first test starts the two through `peftkit train
--nproc 2` (torchrun); the rest fork them from the test process, which is 8x faster to start.
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


def _train_two_processes(raw: dict, tmp_path, *, resume: bool = False) -> subprocess.CompletedProcess:
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "peftkit", "train", str(config), "--nproc", "2", "--no-progress"]
    return subprocess.run(command + ["--resume"] * resume, capture_output=True, text=True, timeout=300)


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize(
    "per_rank_batch,test_size,accum",
    [
        (2, 4, 2),  # 10 examples, global micro-batch 4, two micro-batches per step
        (5, 3, 1),  # 11 examples, global micro-batch 10: each epoch ends with one example, rank 1 idles
    ],
)
def test_two_processes_end_with_the_single_process_adapter(
    tiny_model_dir, tmp_path, per_rank_batch, test_size, accum, strategy
):
    """The same adapter, step losses, token counts, gradient norms and validation losses (at step
    2, between training steps, and at the end) as one process with the same global batch."""
    single_out, multi_out = tmp_path / "single", tmp_path / "multi"

    def job(out, batch_size):
        raw = _raw_job(tiny_model_dir, tmp_path, out, batch_size=batch_size, test_size=test_size, accum=accum)
        raw["data"]["val_size"] = 2
        raw["training"]["eval_every"] = 2
        return raw

    run_training(build_job_config(job(single_out, 2 * per_rank_batch)), progress=False)
    multi = job(multi_out, per_rank_batch)
    multi["distributed"] = strategy
    done = _train_two_processes(multi, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"with {strategy.upper()}" in done.stderr

    a = load_file(single_out / "adapter" / "adapter_model.safetensors")
    b = load_file(multi_out / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-5, key
    assert any(float(t.abs().max()) > 0 for k, t in a.items() if "lora_B" in k)  # it really trained
    # One metrics line per step (rank 0 only), with the global loss and token count.
    single_m, multi_m = _metrics(single_out), _metrics(multi_out)
    single_val, multi_val = [r for r in single_m if "val_loss" in r], [r for r in multi_m if "val_loss" in r]
    assert [r["step"] for r in multi_val] == [r["step"] for r in single_val] == [2, 4]
    for x, y in zip(single_val, multi_val):
        assert abs(x["val_loss"] - y["val_loss"]) <= 1e-5 * max(1.0, x["val_loss"])
    single_m, multi_m = [r for r in single_m if "loss" in r], [r for r in multi_m if "loss" in r]
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


def test_only_rank_0_draws_evaluation_progress_bars(monkeypatch):
    """Under FSDP every rank evaluates; one progress bar is enough (tqdm's own choice on rank 0)."""
    import io

    from peftkit.evaluation import _progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())  # where tqdm would draw a bar
    monkeypatch.setenv("RANK", "0")
    with _progress(3, "eval", None) as bar:
        assert not bar.disable
    monkeypatch.setenv("RANK", "1")
    with _progress(3, "eval", None) as bar:
        assert bar.disable


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


def _worker(rank: int, port: int, raw: dict, resume: bool, log: str) -> None:
    """One rank of a 2-process job, as torchrun would start it (its environment, one thread). Its
    stdout and stderr go to ``log``, which ``_train`` copies into the test's captured stderr (a
    fork server's children inherit the server's streams, not the test's)."""
    import faulthandler
    import os
    import signal

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    faulthandler.register(signal.SIGUSR1)  # _train asks a rank that hangs where it is
    monkeypatch_destroy_to_check_no_ddp_is_alive()
    os.environ.update(
        WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    run_training(build_job_config(raw), resume=resume, progress=False)


def monkeypatch_destroy_to_check_no_ddp_is_alive() -> None:
    """Fail a rank whose DDP wrapper outlives its process group: the wrapper's C++ reducer would
    then destroy the group under the GIL, which can hang the process at exit (train/loop.py,
    leave_process_group)."""
    import weakref

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    alive = weakref.WeakSet()
    init, destroy = DistributedDataParallel.__init__, dist.destroy_process_group

    def tracked_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        alive.add(self)

    def checked_destroy(*args, **kwargs):
        assert not alive, "a DistributedDataParallel module is alive when the process group is destroyed"
        destroy(*args, **kwargs)

    DistributedDataParallel.__init__ = tracked_init
    dist.destroy_process_group = checked_destroy


def _rank_processes():
    """Processes forked from a fork server that imported torch, transformers and peftkit once and
    has run nothing: about 1 s per 2-rank job instead of torchrun's 8 s of start-up (which the CLI
    tests above pay). Not forked from pytest itself: after thousands of tests its threads (OpenMP,
    gloo, tqdm's monitor) and heap are in states a child cannot safely inherit (a rank once died
    of "malloc(): unaligned fastbin chunk detected" inside an FSDP all-gather)."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers", "peftkit.train.loop", __name__])
    return context


def _train(raw: dict, tmp_path, nproc: int, *, resume: bool = False) -> None:
    """Train ``raw`` in 1 process, or in 2 started by ``_rank_processes``."""
    import os
    import signal
    import socket
    import time

    if nproc == 1:
        run_training(build_job_config(raw), resume=resume, progress=False)
        return
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = _rank_processes()
    logs = [tmp_path / f"rank{rank}.log" for rank in range(2)]
    ranks = [
        context.Process(target=_worker, args=(rank, port, raw, resume, str(logs[rank]))) for rank in range(2)
    ]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=300)
    codes = [process.exitcode for process in ranks]
    for process in ranks:
        if process.is_alive():
            os.kill(process.pid, signal.SIGUSR1)  # its stack, into the captured stderr
            time.sleep(1)
            process.kill()
    for log in logs:
        sys.stderr.write(log.read_text(errors="replace"))
        log.unlink()
    assert codes == [0, 0], f"ranks exited with {codes} (their tracebacks are in the captured stderr)"


def _assert_same_adapter(a_dir, b_dir, atol: float) -> None:
    a = load_file(a_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(b_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        assert (a[key] - b[key]).abs().max() <= atol, key


@pytest.mark.parametrize("method", ["lora", "full"])  # full: FSDP's root group (embeddings) trains too
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("saved_by,resumed_by", [(2, 1), (1, 2)])
def test_checkpoint_resumes_under_another_number_of_processes(
    tiny_model_dir, tmp_path, strategy, saved_by, resumed_by, method
):
    """A checkpoint written by 2 processes resumes in 1, and one written by 1 resumes in 2, with the
    same global batch (batch_size x processes), and ends exactly where the straight run ended."""
    import shutil

    def job(out, nproc):
        raw = _raw_job(tiny_model_dir, tmp_path, out, batch_size=4 // nproc, test_size=4, accum=2, steps=5)
        if method == "full":
            raw.pop("lora")
            raw.update(method="full", full={})
            raw["training"]["learning_rate"] = 1e-3
        raw["data"]["val_size"] = 2
        raw["training"].update(save_every=2, eval_every=2)  # a checkpoint right after validation
        raw["distributed"] = strategy
        return raw

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(job(straight, saved_by), tmp_path, saved_by)
    shutil.copytree(straight / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    _train(job(resumed, resumed_by), tmp_path, resumed_by, resume=True)
    _assert_same_adapter(straight, resumed, atol=1e-5)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_interrupted_two_process_run_resumes_exactly_with_dropout(tiny_model_dir, tmp_path, strategy):
    """With dropout each rank draws its own masks: the checkpoint keeps every rank's RNG state, so
    a resumed 2-process run equals the uninterrupted one (restoring rank 0's state everywhere
    would change rank 1's masks after the resume)."""
    import shutil

    def job(out):
        raw = _raw_job(tiny_model_dir, tmp_path, out, batch_size=2, test_size=4, accum=1, steps=5)
        raw["lora"]["lora_dropout"] = 0.5
        raw["training"]["save_every"] = 2
        raw["distributed"] = strategy
        return raw

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(job(straight), tmp_path, 2)
    shutil.copytree(straight / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    _train(job(resumed), tmp_path, 2, resume=True)
    _assert_same_adapter(straight, resumed, atol=1e-6)


def test_fsdp_refuses_what_it_cannot_shard(tiny_model_dir, tmp_path):
    """distributed: fsdp with a quantized base or a method without supports_fsdp is a config error
    that says what to change; a bad value names the valid ones."""
    from peftkit.train.config import ConfigError

    raw = _raw_job(tiny_model_dir, tmp_path, tmp_path / "out", batch_size=2, test_size=4, accum=1)
    with pytest.raises(ConfigError, match="'quantization' is set: FSDP cannot shard.*distributed: ddp"):
        build_job_config({**raw, "distributed": "fsdp", "quantization": {"bits": 8}})
    adalora = {k: v for k, v in raw.items() if k != "lora"} | {"method": "adalora", "distributed": "fsdp"}
    with pytest.raises(
        ConfigError, match="method 'adalora' is not supported with sharded.*use one of .*lora"
    ):
        build_job_config(adalora)
    with pytest.raises(ConfigError, match="distributed"):
        build_job_config({**raw, "distributed": "zero3"})
    bad_timeout = {**raw, "training": {**raw["training"], "collective_timeout_minutes": 0}}
    with pytest.raises(ConfigError, match="collective_timeout_minutes' must be > 0"):
        build_job_config(bad_timeout)
    assert build_job_config({**raw, "distributed": "fsdp"}).distributed == "fsdp"


def test_auto_strategy_shards_full_fine_tuning_only():
    """distributed: auto picks FSDP when at least half the parameters train, DDP for adapters
    and for quantized bases; one process needs neither."""
    import peftkit
    from conftest import make_tiny_llama
    from peftkit.methods import get_method
    from peftkit.train.distributed import choose_strategy

    two = World(2, 0)
    full = peftkit.get_peft_model(make_tiny_llama(), get_method("full").config_cls())
    lora = peftkit.get_peft_model(make_tiny_llama(), peftkit.LoraConfig(r=4, target_modules="all-linear"))
    assert choose_strategy("auto", two, full, quantized=False) == "fsdp"
    assert choose_strategy("auto", two, lora, quantized=False) == "ddp"
    assert choose_strategy("auto", two, full, quantized=True) == "ddp"
    assert choose_strategy("fsdp", two, lora, quantized=False) == "fsdp"
    assert choose_strategy("fsdp", World(), lora, quantized=False) == "none"


SOFT = {"num_virtual_tokens": 3}
METHOD_CASES = [  # every registered method (AdapterDrop and DoRA as variants), and QLoRA
    ("lora", {"r": 4, "target_modules": "all-linear", "use_dora": True}),
    ("loha", {"r": 4, "alpha": 8, "target_modules": "all-linear"}),
    ("lokr", {"r": 4, "alpha": 8, "target_modules": "all-linear", "init_weights": "lycoris"}),
    ("ia3", {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
    ("oft", {"oft_block_size": 8, "target_modules": "all-linear"}),
    ("boft", {"boft_block_size": 4, "boft_n_butterfly_factor": 2, "target_modules": "all-linear"}),
    ("bottleneck", {"bottleneck_size": 4, "drop_lowest_layers": 1}),  # AdapterDrop: unused layer-0 adapters
    ("bitfit", {"add_missing_biases": True}),
    ("partial", {"train_top_n_layers": 1, "also_train": ["head"]}),
    ("full", {}),
    ("adalora", {"init_r": 6, "target_r": 2, "tinit": 1, "tfinal": 1, "total_step": 4}),
    ("adapter_fusion", {}),  # fuses two saved bottleneck adapters, made in the test
    ("adaption_prompt", {"adapter_len": 3, "adapter_layers": 1}),
    ("prompt_tuning", SOFT),
    ("prefix_tuning", SOFT),
    ("p_tuning", {**SOFT, "encoder_hidden_size": 8}),
    ("p_tuning_v2", SOFT),
    ("mam", {**SOFT, "encoder_hidden_size": 8, "bottleneck_size": 4}),
    ("unipelt", {**SOFT, "encoder_hidden_size": 8, "bottleneck_size": 4}),
    ("qlora-int8", {"r": 4, "target_modules": "all-linear"}),  # bitsandbytes on the CPU
    ("qlora-nf4", {"r": 4, "target_modules": "all-linear"}),
]


def _method_job(model_dir, tmp_path, out, method: str, section: dict, batch_size: int) -> dict:
    raw = _raw_job(model_dir, tmp_path, out, batch_size=batch_size, test_size=4, accum=1)
    del raw["lora"]
    if method.startswith("qlora"):
        raw.update(method="lora", lora=section, quantization={"bits": 8 if method == "qlora-int8" else 4})
    else:
        raw.update(method=method, **{method: section})
    return raw


def _fusion_sources(model_dir, root) -> list[str]:
    from transformers import AutoModelForCausalLM

    import peftkit
    from peftkit.methods import get_method

    torch.manual_seed(5)
    sources = []
    for name in ("a", "b"):
        config = get_method("bottleneck").config_cls(bottleneck_size=4, init="random")
        peftkit.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).save_pretrained(
            root / name
        )
        sources.append(str(root / name))
    return sources


@pytest.mark.parametrize("method,section", METHOD_CASES, ids=[m for m, _ in METHOD_CASES])
def test_every_method_under_two_processes_equals_one(tiny_model_dir, tmp_path, method, section):
    """Every method under DDP, and under FSDP where it declares supports_fsdp: 2 processes end with
    the single-process adapter (fp32, 1e-5) and gradient norms. Methods with their own hooks
    (AdaLoRA's regularisation and rank allocation, soft prompts' forward, AdapterDrop's unused
    layers) included."""
    from peftkit.methods import get_method

    if method == "qlora-nf4":  # NF4 blocks of 64 need layers at least 64 wide
        tiny_model_dir = save_tiny_model_dir(tmp_path / "wide-model", hidden_size=64, intermediate_size=128)
    if method == "adapter_fusion":
        section = {"adapters": _fusion_sources(tiny_model_dir, tmp_path / "sources")}
    single = tmp_path / "single"
    run_training(
        build_job_config(_method_job(tiny_model_dir, tmp_path, single, method, section, 4)), progress=False
    )
    registered = get_method("lora" if method.startswith("qlora") else method).model_cls
    strategies = ["ddp"] + (["fsdp"] if registered.supports_fsdp and not method.startswith("qlora") else [])
    for strategy in strategies:
        out = tmp_path / strategy
        raw = _method_job(tiny_model_dir, tmp_path, out, method, section, 2)
        raw["distributed"] = strategy
        _train(raw, tmp_path, 2)
        a = load_file(single / "adapter" / "adapter_model.safetensors")
        b = load_file(out / "adapter" / "adapter_model.safetensors")
        assert a.keys() == b.keys() and a
        for key in a:  # (AdaLoRA may cut a layer's rank to 0: empty tensors)
            if key.endswith("fusion_key.bias"):
                # Adds the same score to every fused adapter, which the softmax cancels: its gradient is
                # zero but for rounding, which Adam scales up to full steps. Nothing to compare.
                continue
            torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0, msg=f"{strategy}: {key}")
        for x, y in zip(_metrics(single), _metrics(out)):
            assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-5 * max(1.0, x["grad_norm"]), strategy


def test_fsdp_full_fine_tuning_in_bf16_with_tied_embeddings(tmp_path, capfd):
    """The default strategy for full fine-tuning under torchrun is FSDP. With bf16 autocast, an
    output layer tied to the embeddings (as SmolLM2's), validation and generation-based
    evaluation, the saved model is whole: it loads in one process, and its weights are close to a
    single-process run's."""
    from peftkit import AutoPeftModelForCausalLM

    model_dir = save_tiny_model_dir(tmp_path / "tied", tie_word_embeddings=True)
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"run{nproc}"
        raw = _raw_job(model_dir, tmp_path, out, batch_size=4 // nproc, test_size=4, accum=1)
        del raw["lora"]
        raw.update(method="full", full={})
        raw["training"].update(precision="bf16", learning_rate=1e-3)
        raw["evaluation"] = {"accuracy_after": True, "max_new_tokens": 3, "general": "builtin"}
        raw["data"]["val_size"] = 2
        _train(raw, tmp_path, nproc)
        runs[nproc] = out
    assert "Training in 2 processes with FSDP" in capfd.readouterr().err  # auto: full fine-tuning is sharded
    weights = {n: load_file(out / "adapter" / "adapter_model.safetensors") for n, out in runs.items()}
    assert weights[1].keys() == weights[2].keys()
    for key, value in weights[1].items():
        assert weights[2][key].shape == value.shape, key
        torch.testing.assert_close(weights[2][key], value, atol=2e-2, rtol=2e-2, msg=key)
    results = json.loads((runs[2] / "eval_results.json").read_text())
    assert "after" in results and "validation" in results
    # forgetting is measured on every rank inside the sharded model, like validation
    single = json.loads((runs[1] / "eval_results.json").read_text())["general"]
    for when in ("before", "after"):
        assert results["general"][when]["tokens"] == single[when]["tokens"] > 0
        assert results["general"][when]["loss"] == pytest.approx(single[when]["loss"], rel=2e-2)
    loaded = AutoPeftModelForCausalLM.from_pretrained(runs[2] / "adapter")  # one process, whole weights
    for name, param in loaded.named_parameters():
        if name.endswith("lm_head.weight") or name.endswith("embed_tokens.weight"):
            assert param.abs().sum() > 0, name


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
