"""Preference objectives in the one training loop, on the tiny Llama (fp32, no dropout).

accumulation   batch 8 x 1 == batch 2 x 4: per-step losses, metrics, gradient norms, adapter
resume         stop_after_step (and a SIGKILLed process) + resume == the straight run, bit for bit,
               with the reference computed alongside (auto) or stored with the run (precompute)
processes      2 DDP ranks == 1 process (forked as in tests/test_distributed.py)
methods        every method trains under dpo; where its new adapter is a no-op at init the first
               loss is ln 2, and for every method the reference is the base model
refusals       what cannot work is a config error that says why
reward         a reward model trains, saves, and loads back with the same scores
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import save_tiny_model_dir
from peftkit.train.config import ConfigError, build_job_config
from peftkit.train.loop import run_training

pytestmark = pytest.mark.usefixtures("single_thread")

LN2 = math.log(2)
WORDS = [
    ("good", "positive", "negative"),
    ("bad", "negative", "positive"),
    ("fox", "neutral", "positive"),
    ("great", "positive", "neutral"),
    ("awful", "negative", "neutral"),
    ("okay", "neutral", "negative"),
    ("nice", "positive", "negative"),
    ("poor", "negative", "positive"),
]
PAIRS = [{"prompt": f"word {w} is", "chosen": c, "rejected": r} for w, c, r in WORDS] * 2  # 16 pairs
TIMING = ("tokens_per_s", "step_time_s")  # the only metrics that may differ between equal runs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Data files: ``pairs`` (16 pairs), ``four`` (4 distinct pairs), ``test`` (4 other pairs)."""
    root = tmp_path_factory.mktemp("pairs")
    files = {"pairs": PAIRS, "four": PAIRS[:4], "test": PAIRS[4:8]}
    for name, rows in files.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {name: root / f"{name}.jsonl" for name in files}


def raw_job(model_dir, train, out, *, objective="dpo", method="lora", section=None, **training) -> dict:
    settings = {
        "max_steps": 4,
        "batch_size": 8,
        "learning_rate": 1e-2,
        "precision": "fp32",
        "seed": 7,
        "group_by_length": False,  # batch 8 and batch 2 x 4 cut the same seeded order the same way
        "num_threads": 1,
    }
    settings.update(training)
    if section is None:
        section = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
    return {
        "base_model": str(model_dir),
        "objective": objective,
        "method": method,
        method: section,
        "data": {"train": str(train)},
        "training": settings,
        "evaluation": {"accuracy_after": False},
        "output_dir": str(out),
    }


def train(raw: dict, **options) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Run ``raw``; its per-step metrics lines and the saved adapter's tensors."""
    run_training(build_job_config(raw), progress=False, **options)
    return steps(raw["output_dir"]), adapter(raw["output_dir"])


def steps(out) -> list[dict]:
    """The per-step lines of metrics.jsonl (validation lines have val_loss, not loss)."""
    lines = Path(out, "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, filter(str.strip, lines)) if "loss" in record]


def adapter(out) -> dict[str, torch.Tensor]:
    return load_file(Path(out, "adapter", "adapter_model.safetensors"))


def assert_same_steps(a: list[dict], b: list[dict], tol: float) -> None:
    """Same steps, token counts and (within ``tol``, relative above 1) every logged value."""
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        assert x["tokens_seen"] == y["tokens_seen"]
        for key in x.keys() - {"step", "epoch", "tokens_seen", *TIMING}:
            assert abs(x[key] - y[key]) <= tol * max(1.0, abs(x[key])), (x["step"], key, x[key], y[key])


def assert_close_adapters(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        assert (a[key] - b[key]).abs().max() <= atol, key


# -- 1. accumulation ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "objective,atol",
    [
        ("dpo", 1e-5),
        ("orpo", 1e-5),
        # Reward: one LoRA A entry with a near-zero gradient moves 2.6e-5 apart, fp32 rounding that
        # Adam's normalisation scales up to a full step; the losses still agree to 1e-6.
        ("reward", 1e-4),
    ],
)
def test_accumulation_equals_one_large_batch(tiny_model_dir, data, tmp_path, objective, atol):
    """8 pairs in one micro-batch, or in 4 of 2: the loss is normalised by the pairs of the whole
    optimizer step, so losses, objective metrics, gradient norms and the adapter agree (2 epochs)."""
    big, big_adapter = train(raw_job(tiny_model_dir, data["pairs"], tmp_path / "big", objective=objective))
    small_raw = raw_job(tiny_model_dir, data["pairs"], tmp_path / "small", objective=objective)
    small_raw["training"].update(batch_size=2, gradient_accumulation_steps=4)
    small, small_adapter = train(small_raw)
    assert_same_steps(big, small, tol=1e-5)
    assert "grad_norm" in big[0] and ("rewards/margins" in big[0] or "margin" in big[0])
    assert_close_adapters(big_adapter, small_adapter, atol=atol)
    assert any(float(t.abs().max()) > 0 for k, t in big_adapter.items() if "lora_B" in k)  # it trained
    assert big[-1]["loss"] < big[0]["loss"]


# -- 2. exact resume ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def start_adapter(tiny_model_dir, tmp_path_factory):
    """A saved LoRA adapter that is not a no-op (B random), to start DPO from (init_adapter)."""
    from transformers import AutoModelForCausalLM

    import peftkit

    torch.manual_seed(3)
    config = peftkit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = peftkit.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
    path = tmp_path_factory.mktemp("start") / "adapter"
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("reference", ["auto", "precompute", "init_adapter"])
def test_interrupted_dpo_resumes_bit_identically(
    tiny_model_dir, data, tmp_path, reference, capsys, start_adapter
):
    """Interrupted after step 3 (last checkpoint at 2), resumed: the adapter tensors are equal and
    every metrics line but the timings is the straight run's. precompute reads the stored
    reference log-probs back instead of recomputing them; with init_adapter the reference stays the
    starting adapter (not the checkpoint's weights the resumed run loads)."""

    def job(out):
        raw = raw_job(tiny_model_dir, data["pairs"], out, batch_size=4, max_steps=6, save_every=2)
        if reference == "init_adapter":
            raw.update(init_adapter=str(start_adapter), lora={})
        else:
            raw["preference"] = {"reference": reference}
        raw["data"]["val_size"] = 2
        raw["training"]["eval_every"] = 3
        return raw

    straight, straight_adapter = train(job(tmp_path / "straight"))
    assert abs(straight[0]["loss"] - LN2) <= 1e-6  # the reference is the model training starts from
    if reference == "init_adapter":
        assert "reference model: the starting adapter, frozen" in capsys.readouterr().err
    interrupted = job(tmp_path / "resumed")
    assert run_training(build_job_config(interrupted), progress=False, stop_after_step=3) == {
        "interrupted_at": 3
    }
    capsys.readouterr()
    resumed, resumed_adapter = train(interrupted, resume=True)
    assert "Resumed from" in (log := capsys.readouterr().err)
    if reference == "precompute":
        assert (
            "log-probs read from" in log and (tmp_path / "resumed" / "reference_logps.safetensors").is_file()
        )
    assert straight_adapter.keys() == resumed_adapter.keys()
    for key in straight_adapter:
        assert torch.equal(straight_adapter[key], resumed_adapter[key]), key
    drop = set(TIMING)
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == [
        {k: v for k, v in r.items() if k not in drop} for r in straight
    ]
    results = [json.loads((tmp_path / d / "eval_results.json").read_text()) for d in ("straight", "resumed")]
    assert (
        results[0]["validation"] == results[1]["validation"]
        and "val_rewards/margins" in results[0]["validation"]
    )


@pytest.mark.slow
def test_killed_dpo_process_resumes_to_the_same_adapter(tiny_model_dir, data, tmp_path):
    """A real SIGKILL of `peftkit train` (objective dpo, precomputed reference) after its first
    checkpoint, then `--resume`: the adapter equals an uninterrupted run's, bit for bit."""
    raw = raw_job(
        tiny_model_dir, data["pairs"], tmp_path / "killed", batch_size=4, max_steps=60, save_every=5
    )
    raw["preference"] = {"reference": "precompute"}
    from peftkit.train.checkpoint import list_checkpoints

    config = tmp_path / "killed.yaml"
    config.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "peftkit", "train", str(config), "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list_checkpoints(tmp_path / "killed") and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "adapter").exists(), "the run finished before it could be killed"
    assert (tmp_path / "killed" / "reference_logps.safetensors").is_file()
    done = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "log-probs read from" in done.stderr
    _, straight = train({**raw, "output_dir": str(tmp_path / "straight")})
    killed = adapter(tmp_path / "killed")
    for key in straight:
        assert torch.equal(straight[key], killed[key]), key


# -- 3. two processes --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "objective,reference,atol",
    [("dpo", "auto", 1e-5), ("dpo", "precompute", 1e-5), ("reward", None, 1e-4)],  # 1e-4: see above
)
def test_two_processes_equal_one(tiny_model_dir, data, tmp_path, objective, reference, atol):
    """2 DDP ranks of 2 pairs x 2 micro-batches each == 1 process of 4 x 2: losses, objective
    metrics (summed over ranks), gradient norms and the adapter (1e-5, reward 1e-4)."""
    from test_distributed import _train

    def job(out, batch_size):
        raw = raw_job(tiny_model_dir, data["pairs"], out, objective=objective, batch_size=batch_size)
        raw["training"].update(gradient_accumulation_steps=2, log_every=1)
        raw["distributed"] = "ddp"
        if reference:
            raw["preference"] = {"reference": reference}
        return raw

    _train(job(tmp_path / "one", 4), tmp_path, 1)
    _train(job(tmp_path / "two", 2), tmp_path, 2)
    one, two = steps(tmp_path / "one"), steps(tmp_path / "two")
    assert len(one) == 4
    assert_same_steps(one, two, tol=1e-5)
    assert_close_adapters(adapter(tmp_path / "one"), adapter(tmp_path / "two"), atol=atol)


def test_a_metric_a_micro_batch_lacks_is_averaged_over_those_that_have_it():
    """KTO's rewards/chosen of a step whose second micro-batch has no desirable row is the first
    micro-batch's, not diluted by the second's weight."""
    from peftkit.objectives import objective_task
    from peftkit.train.distributed import World

    task = objective_task("kto")
    task.keep_metrics({"kl": 0.5, "rewards/chosen": 1.0}, 2)
    task.keep_metrics({"kl": 1.0, "rewards/rejected": -3.0}, 4)
    got = task.step_metrics(World(), torch.device("cpu"))
    assert got == pytest.approx(
        {"kl": (0.5 * 2 + 1.0 * 4) / 6, "rewards/chosen": 1.0, "rewards/rejected": -3.0}
    )
    assert task.step_metrics(World(), torch.device("cpu")) == {}  # reset after each step


def test_kto_under_two_processes_logs_both_sides(tiny_model_dir, tmp_path):
    """KTO logs a side's metrics only where the micro-batch has rows of that side, so one rank's share
    can lack names another has. Step metrics used to all-reduce each rank's own sorted names: lists of
    different lengths broke the collective (gloo: "Received data size doesn't match expected size"),
    equal lengths would have summed different metrics. Every step now logs both sides, from all ranks."""
    from test_distributed import _train

    rows = [
        {"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
        for p in PAIRS[:8]
        for side in ("chosen", "rejected")
    ]
    kto = tmp_path / "kto.jsonl"
    kto.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = raw_job(tiny_model_dir, kto, tmp_path / "two", objective="kto", batch_size=2)  # 2 rows per rank
    raw["distributed"] = "ddp"
    _train(raw, tmp_path, 2)
    logged = steps(tmp_path / "two")
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    for r in logged:
        assert all(
            math.isfinite(r[f"{kind}/{side}"])
            for kind in ("rewards", "logps")
            for side in ("chosen", "rejected")
        )
        assert math.isfinite(r["kl"]) and math.isfinite(r["loss"])


# -- 4. every method under dpo -----------------------------------------------------------------------
# Methods whose new adapter changes the model at init: virtual tokens (or a prefix) of random values,
# and adapter_fusion, which fuses two randomly initialised bottleneck adapters. peftkit's reference
# for a new adapter is the model with the adapter disabled, i.e. the base without virtual tokens,
# not the model at init: their first loss is not ln 2 and their first rewards are not 0 (the
# policy already differs from the reference). Every other method starts as a no-op (LoRA's B,
# IA3's ones, OFT's identity rotation, zero bottleneck up-projections, zero gates, ...).
NOT_A_NO_OP_AT_INIT = {
    "adapter_fusion",
    "prompt_tuning",
    "prefix_tuning",
    "p_tuning",
    "p_tuning_v2",
    "mam",
    "unipelt",
}


def method_cases():
    from test_distributed import METHOD_CASES  # every registered method's minimal section, and QLoRA

    return METHOD_CASES


@pytest.fixture(scope="module")
def base_logps(tiny_model_dir, data):
    """Mean summed log-prob of the 4 pairs' chosen and rejected completions under the plain base
    model, computed here from full logits (not with peftkit's objectives/sequence.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.data.preference_encode import encode_pair

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    sums = {"chosen": 0.0, "rejected": 0.0}
    for row in PAIRS[:4]:
        turns = [[{"role": "assistant", "content": row[side]}] for side in ("chosen", "rejected")]
        pair = encode_pair(tokenizer, [{"role": "user", "content": row["prompt"]}], *turns, max_seq_len=None)
        for side, completion in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
            ids = torch.tensor([pair.prompt_ids + completion])
            with torch.no_grad():
                logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            targets = ids[0, 1:]
            picked = logps.gather(-1, targets[:, None])[:, 0][-len(completion) :]
            sums[side] += float(picked.sum())
    return {side: total / 4 for side, total in sums.items()}


@pytest.mark.parametrize("method,section", method_cases(), ids=[m for m, _ in method_cases()])
def test_every_method_trains_under_dpo(tiny_model_dir, data, tmp_path, base_logps, method, section):
    """Two steps of dpo on 4 pairs (one batch): finite losses that move; the reference implied by
    the logged metrics (policy log-probs - rewards / beta) is the base model for every method; the
    first loss is ln 2 with zero rewards where the new adapter is a no-op at init."""
    from test_distributed import _fusion_sources, _method_job

    if method.startswith("qlora"):
        pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")
    if method == "qlora-nf4":  # NF4 blocks of 64 need layers at least 64 wide
        tiny_model_dir = save_tiny_model_dir(tmp_path / "wide-model", hidden_size=64, intermediate_size=128)
    if method == "adapter_fusion":
        section = {"adapters": _fusion_sources(tiny_model_dir, tmp_path / "sources")}
    raw = _method_job(tiny_model_dir, tmp_path, tmp_path / "run", method, section, batch_size=4)
    raw.update(objective="dpo", data={"train": str(data["four"])})
    raw["training"].update(max_steps=2)
    first, second = train(raw)[0]
    assert math.isfinite(first["loss"]) and math.isfinite(second["loss"])
    assert abs(second["loss"] - first["loss"]) > 1e-6  # the first step changed the policy
    beta = 0.1
    if not method.startswith("qlora"):  # a quantized base scores otherwise than the fp32 one
        for side in ("chosen", "rejected"):
            reference = first[f"logps/{side}"] - first[f"rewards/{side}"] / beta
            assert abs(reference - base_logps[side]) <= 1e-4, (side, reference, base_logps[side])
    if method in NOT_A_NO_OP_AT_INIT:
        assert abs(first["rewards/chosen"]) + abs(first["rewards/rejected"]) > 1e-4
        assert abs(first["loss"] - LN2) > 1e-4
    else:
        assert abs(first["loss"] - LN2) <= 1e-6, first["loss"]
        assert abs(first["rewards/chosen"]) <= 1e-6 and abs(first["rewards/rejected"]) <= 1e-6


def test_8bit_reference_is_computed_as_the_training_policy(tiny_model_dir, data, tmp_path):
    """bitsandbytes' 8-bit layers on the CPU compute otherwise in eval mode (int8 activations) than in
    training mode (dequantized weights), ~1e-3 apart. The reference pass (eval mode, to turn dropout
    off) and the precomputed log-probs keep those layers in the policy's mode: LoRA's first loss is
    ln 2 over an 8-bit base with either reference, as over an fp32 one."""
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")
    for reference in ("auto", "precompute"):
        raw = raw_job(tiny_model_dir, data["four"], tmp_path / reference, batch_size=4, max_steps=1)
        raw.update(quantization={"bits": 8}, preference={"reference": reference})
        (first,) = train(raw)[0]
        assert abs(first["loss"] - LN2) <= 1e-6, (reference, first["loss"])
        assert abs(first["rewards/chosen"]) <= 1e-6 and abs(first["rewards/rejected"]) <= 1e-6


# -- 5. refusals -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change,message",
    [
        ({"training": {"packing": True}}, r"'training.packing' is true but objective dpo needs each"),
        ({"distributed": "fsdp"}, r"'distributed' is fsdp but objective dpo is not supported with sharded"),
        ({"objective": "orpo", "distributed": "fsdp"}, r"objective orpo is not supported with sharded"),
        ({"preference": {"reference": "none"}}, r"'preference.reference' is none but objective dpo compares"),
        ({"objective": "orpo", "preference": {"reference": "precompute"}}, r"orpo uses no reference model"),
        (
            {"preference": {"simpo_gamma": 1.0}},
            r"'preference.simpo_gamma' is set but objective dpo does not use",
        ),
        ({"preference": {"beta": 0}}, r"'preference.beta' is 0 but objective dpo needs a positive beta"),
        ({"preference": {"label_smoothing": 0.5}}, r"'preference.label_smoothing' must be in \[0, 0.5\)"),
        (
            {"method": "full", "full": {}, "init_adapter": "."},
            r"'init_adapter' starts from a saved adapter, but",
        ),
    ],
    ids=[
        "packing",
        "fsdp",
        "orpo-fsdp",
        "no-reference",
        "orpo-precompute",
        "unused-option",
        "beta",
        "label-smoothing",
        "full-init-adapter",
    ],
)
def test_what_cannot_work_is_refused_at_config_time(tiny_model_dir, data, tmp_path, change, message):
    """Packing (rows shared by examples), FSDP (the reference pass needs whole weights), options of
    another objective and out-of-range values are config errors naming the key and the fix (the
    task / sft / kto-precompute / missing init_adapter cases: test_objectives_correctness.py)."""
    raw = raw_job(tiny_model_dir, data["pairs"], tmp_path / "out")
    for key, value in change.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) else value
    if raw["method"] == "full":
        raw.pop("lora")
    with pytest.raises(ConfigError, match=message):
        build_job_config(raw)
    assert build_job_config(raw_job(tiny_model_dir, data["pairs"], tmp_path / "out")).objective == "dpo"


# -- 6. reward models --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,section",
    [
        ("lora", {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}),
        ("full", {}),
        ("ia3", {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
    ],
)
def test_reward_model_trains_saves_and_loads(tiny_model_dir, data, tmp_path, method, section):
    """objective reward: the loss falls, and the saved adapter loads (AutoPeftModel, one-output head
    sized from the saved head) into a model that scores the held-out pairs as the trained model
    did at the end of the run (eval_results.json's mean margin)."""
    from transformers import AutoTokenizer

    from peftkit import AutoPeftModelForSequenceClassification
    from peftkit.data.preference_encode import encode_pair

    raw = raw_job(
        tiny_model_dir, data["four"], tmp_path / "run", objective="reward", method=method, section=section
    )
    raw["training"].update(max_steps=6, batch_size=4, learning_rate=1e-3 if method == "full" else 1e-2)
    raw["data"]["test"] = str(data["test"])
    raw["evaluation"] = {"accuracy_after": True}
    losses = [r["loss"] for r in train(raw)[0]]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    after = json.loads((tmp_path / "run" / "eval_results.json").read_text())["after"]
    assert after["n"] == 4

    model = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "run" / "adapter").eval()
    assert model.config.num_labels == 1
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    margins = []
    for row in PAIRS[4:8]:
        turns = [[{"role": "assistant", "content": row[side]}] for side in ("chosen", "rejected")]
        pair = encode_pair(tokenizer, [{"role": "user", "content": row["prompt"]}], *turns, max_seq_len=None)
        with torch.no_grad():
            scores = [
                float(model(input_ids=torch.tensor([pair.prompt_ids + c])).logits[0, 0])
                for c in (pair.chosen_ids, pair.rejected_ids)
            ]
        margins.append(scores[0] - scores[1])
    assert sum(margins) / 4 == pytest.approx(after["mean_margin"], abs=1e-5)
    assert sum(m > 0 for m in margins) / 4 == after["pairwise_accuracy"]
