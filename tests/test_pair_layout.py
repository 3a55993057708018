"""One row per preference pair (objectives/pair_layout.py): the same log-probs, losses, metrics and
training as the two-row layout, and the two rows wherever the one-row layout would not be exact.

log-probs   policy (and its gradients) and reference (adapter off, frozen start) for LoRA, IA3,
            full fine-tuning and a plain model; Llama, GPT-2, Qwen2, Mistral; eager and sdpa;
            fp32 to 1e-5, bf16 looser
objectives  dpo / orpo / simpo loss and metrics of a batch; held-out evaluation (two rows, as
            ``peftkit eval``)
fallback    prompt tuning, dropout, training.shared_prefix: false, no position_ids (Bloom), rows
            past a sliding window, and a layout the first-batch check finds wrong
training    a DPO run (validation, held-out evaluation) with the layout on and off: same per-step
            losses, metrics, token counts and adapter (1e-5)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import peftkit
from _tiny_models import make_tiny_bloom, make_tiny_gpt2, make_tiny_gqa
from conftest import make_tiny_llama
from peftkit.data.preference_collate import collate_pairs
from peftkit.data.preference_encode import PreferenceExample
from peftkit.objectives import objective_task
from peftkit.objectives import pair_layout as pl
from peftkit.objectives.sequence import AdapterOff, FrozenStart, completion_logps
from peftkit.train.config import build_job_config
from peftkit.train.loop import run_training
from peftkit.train.loop import (
    setup as setup_session,  # not `setup`: pytest 8.0 runs a module's setup_session()
)
from peftkit.train.shared_prefix import SharedPrefix

pytestmark = pytest.mark.usefixtures("single_thread")

# (prompt, chosen, rejected) lengths: rows of different lengths, a longer rejected than chosen,
# one-token completions, and an empty prompt (whose first completion token has no label).
SHAPES = [(7, 2, 3), (12, 1, 1), (5, 4, 2), (9, 3, 5), (0, 2, 3)]


def pairs(shapes=SHAPES, seed: int = 0, vocab: int = 100) -> list[PreferenceExample]:
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    return [PreferenceExample(ids(p), ids(c), ids(r), "test") for p, c, r in shapes]


def no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def perturbed(model, seed: int = 5, scale: float = 0.3):
    """Move every trainable parameter at random, so that an adapter changes the result."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=g))
    return model


def with_method(base, method: str):
    if method == "plain":
        return base
    config = {
        "lora": lambda: peftkit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
        "ia3": lambda: peftkit.IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
        "full": lambda: peftkit.FullFinetuneConfig(),
    }[method]()
    return peftkit.get_peft_model(base, config)


def layouts(model, examples, pad: int = 0):
    """The two-row batch with the one-row tensors, and a fresh SharedPrompt for ``model``."""
    shared = pl.shared_prompt_for(model)
    assert isinstance(shared, pl.SharedPrompt), shared
    batch = collate_pairs(examples, pad)
    batch.update(shared.collate(examples, pad))
    return batch, shared


def logps_and_grads(model, batch, shared=None):
    model.zero_grad(set_to_none=True)
    logps, counts = completion_logps(model, batch, shared)
    (logps * torch.linspace(0.5, 1.5, len(logps))).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), counts, grads


# -- 1. log-probs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "ia3", "full", "plain"])
def test_policy_and_reference_log_probs_equal_the_two_rows(method):
    model = with_method(make_tiny_llama(vocab_size=100, initializer_range=0.2), method)
    frozen = FrozenStart(model) if method != "plain" else None  # the weights before the change
    if method != "plain":
        perturbed(model)
    model.train()
    batch, shared = layouts(model, pairs())
    used = []
    original = shared.hidden_and_targets
    shared.hidden_and_targets = lambda *a: used.append(1) or original(*a)

    logps, counts, grads = logps_and_grads(model, batch)
    for _ in range(2):  # the first pass is also compared with the two rows, the second is not
        mine, my_counts, my_grads = logps_and_grads(model, batch, shared)
        torch.testing.assert_close(mine, logps, rtol=0, atol=1e-5)
        assert my_counts.tolist() == counts.tolist() == [2, 1, 4, 3, 1, 3, 1, 2, 5, 2]  # empty prompt: 1 less
        assert my_grads.keys() == grads.keys() and grads
        for name, grad in grads.items():  # summed in another order: relative to the largest entry
            assert (my_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name
    references = [r for r in (AdapterOff() if method in ("lora", "ia3") else None, frozen) if r]
    for reference in references:
        expected = reference.logps(model, batch)[0]
        torch.testing.assert_close(reference.logps(model, batch, shared)[0], expected, rtol=0, atol=1e-5)
        assert (expected - logps).abs().max() > 1e-3  # the reference is another model
    assert shared.enabled and shared.note is None
    assert shared.checked == ({True, False} if references else {True})  # policy, reference passes
    assert len(used) == 2 + len(references)  # the one-row layout really ran


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "mistral"])
def test_architectures_and_attention_kernels(arch, attention):
    base = {
        "llama": lambda: make_tiny_llama(vocab_size=100),
        "gpt2": lambda: no_dropout(make_tiny_gpt2(vocab_size=100)),  # absolute position embeddings
        "qwen2": lambda: make_tiny_gqa("Qwen2"),
        "mistral": lambda: make_tiny_gqa("Mistral"),  # sliding window 4096: wider than the rows
    }[arch]()
    base.set_attn_implementation(attention)
    gpt2 = arch == "gpt2"  # Conv1D layers: weights stored transposed
    config = peftkit.LoraConfig(
        r=4, target_modules=["c_attn", "c_proj"] if gpt2 else "all-linear", fan_in_fan_out=gpt2
    )
    model = perturbed(peftkit.get_peft_model(base, config))
    batch, shared = layouts(model, pairs())
    with torch.no_grad():
        expected = completion_logps(model, batch)[0]
        torch.testing.assert_close(completion_logps(model, batch, shared)[0], expected, rtol=0, atol=1e-5)
    assert shared.enabled and shared.checked == {False}


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_bf16_log_probs_agree_within_bf16_rounding(attention):
    """Frozen weights stored in bf16 under bf16 autocast, as peftkit trains in bf16: the two
    layouts round differently shaped matmuls differently, never by more than a few 1e-2 nats."""
    base = make_tiny_llama(vocab_size=100, initializer_range=0.2)
    base.set_attn_implementation(attention)
    model = perturbed(with_method(base, "lora"))
    for param in model.parameters():
        if not param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    batch, shared = layouts(model, pairs())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, counts = completion_logps(model, batch)
        mine = completion_logps(model, batch, shared)[0]
    assert shared.enabled and shared.checked == {False}
    assert ((mine - expected).abs() / counts).max() <= 0.05


# -- 2. the objectives -------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["dpo", "orpo", "simpo"])
def test_loss_metrics_and_evaluation_equal_the_two_rows(objective):
    model = perturbed(with_method(make_tiny_llama(vocab_size=100, initializer_range=0.2), "lora"))
    examples = pairs()
    results = {}
    for on in (False, True):
        task = objective_task(objective)
        task.start_reference(model)
        task.use_shared_prefix(SharedPrefix(say=lambda _: None) if on else None)
        assert (task.shared_prompt is not None) == on
        batch = task.collate(examples, 0)
        assert ("pair_input_ids" in batch) == on
        assert "pair_input_ids" not in task.collate(examples, 0, one_row=False)  # held-out evaluation
        loss, n = task.loss_sum(model, batch)
        tokenizer = type("Tok", (), {"pad_token_id": 0})
        evaluation = type("Eval", (), {"batch_size": 2})  # 3 batches, the last of one pair
        held_out = task.evaluate(model, tokenizer, examples, eval_cfg=evaluation, autocast_dtype=None)
        results[on] = (loss.item(), n, task.step_metrics(*_one_process()), held_out)
    (loss, n, metrics, held_out), (loss_on, n_on, metrics_on, held_out_on) = results[False], results[True]
    assert n == n_on == len(examples)
    assert loss_on == pytest.approx(loss, abs=1e-5)
    assert metrics_on.keys() == metrics.keys() and metrics
    for name, value in metrics.items():
        assert metrics_on[name] == pytest.approx(value, abs=1e-5), name
    for name, value in held_out.items():
        assert held_out_on[name] == pytest.approx(value, abs=1e-5), name


def _one_process():
    from peftkit.train.distributed import World

    return World(), torch.device("cpu")


# -- 3. where it does not apply ------------------------------------------------------------------


def test_methods_with_virtual_tokens_dropout_and_models_without_positions_keep_two_rows():
    llama = make_tiny_llama(vocab_size=100)
    prompt = peftkit.get_peft_model(
        llama, peftkit.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    )
    assert "virtual tokens" in pl.shared_prompt_for(prompt)
    dropout = peftkit.get_peft_model(
        make_tiny_llama(vocab_size=100),
        peftkit.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1),
    )
    assert "dropout" in pl.shared_prompt_for(dropout)
    assert "dropout" in pl.shared_prompt_for(make_tiny_llama(vocab_size=100, attention_dropout=0.1))
    assert "position_ids" in pl.shared_prompt_for(make_tiny_bloom(vocab_size=100))  # ALiBi
    flash = make_tiny_llama(vocab_size=100)
    flash.config._attn_implementation = "flash_attention_2"
    assert "4D mask" in pl.shared_prompt_for(flash)


def test_rows_past_a_sliding_window_take_two_rows():
    model = make_tiny_gqa("Mistral", sliding_window=8)
    batch, shared = layouts(model, pairs())
    assert shared.window == 8 and batch["input_ids"].shape[1] > 8
    assert shared.hidden_and_targets(model, model.model, batch) is None
    short = pairs([(4, 2, 3), (5, 1, 2)])
    batch, shared = layouts(model, short)
    with torch.no_grad():
        expected = completion_logps(model, batch)[0]
        torch.testing.assert_close(completion_logps(model, batch, shared)[0], expected, rtol=0, atol=1e-5)
    assert shared.checked == {False}  # the one-row layout ran: within the window it is exact
    assert pl.shared_prompt_for(make_tiny_gqa("Qwen2")).window is None  # use_sliding_window: false


def test_the_first_batch_check_switches_off_a_wrong_layout(monkeypatch):
    """A mask that lets the rejected completion see the chosen one is caught on the first pass:
    that pass and every later one return the two-row log-probs, and a note says why."""
    original = pl.pair_attention_mask

    def leaky(segments, eager, dtype):
        return original(torch.where(segments == pl.REJECTED, pl.CHOSEN, segments), eager, dtype)

    monkeypatch.setattr(pl, "pair_attention_mask", leaky)
    model = perturbed(with_method(make_tiny_llama(vocab_size=100, initializer_range=0.2), "lora"))
    notes = []
    batch, shared = layouts(model, pairs())
    shared.say = notes.append
    with torch.no_grad():
        expected = completion_logps(model, batch)[0]
        for _ in range(2):
            torch.testing.assert_close(completion_logps(model, batch, shared)[0], expected, rtol=0, atol=0)
    assert not shared.enabled and len(notes) == 1 and "two rows per preference pair" in notes[0]
    assert shared.collate(pairs(), 0) == {}  # later batches are collated the two-row way only


# -- 4. training --------------------------------------------------------------------------------------

WORDS = [("good", "positive", "negative"), ("bad", "negative", "positive"), ("fox", "neutral", "positive")]
WORDS += [("great", "positive", "neutral"), ("awful", "negative", "neutral"), ("okay", "neutral", "negative")]
ROWS = [{"prompt": f"the word {w} is", "chosen": c, "rejected": f"rather {r}"} for w, c, r in WORDS] * 3


def job(model_dir, data, out, reference="auto", **training):
    settings = {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-2, "precision": "fp32", "seed": 7}
    settings.update(eval_every=2, log_every=1, num_threads=1, **training)
    return build_job_config(
        {
            "base_model": str(model_dir),
            "objective": "dpo",
            "method": "lora",
            "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.0},
            "data": {"train": str(data), "val_size": 3, "test_size": 4},
            "training": settings,
            "preference": {"reference": reference},
            "evaluation": {"batch_size": 3, "accuracy_before": True},
            "output_dir": str(out),
        }
    )


def lines(out) -> list[dict]:
    return [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("reference", ["auto", "precompute"])
def test_dpo_training_is_the_same_with_one_row_per_pair(tiny_model_dir, tmp_path, capfd, reference):
    """With the reference pass (adapter off) or the precomputed reference log-probs in the batch."""
    from safetensors.torch import load_file

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    runs = {}
    for on in (True, False):
        out = tmp_path / ("on" if on else "off")
        results = run_training(job(tiny_model_dir, data, out, reference, shared_prefix=on), progress=False)
        said = capfd.readouterr().err
        assert ("one row per preference pair" in said) == on and "from now on" not in said
        runs[on] = (lines(out), results, load_file(str(out / "adapter" / "adapter_model.safetensors")))
    (on_lines, on_results, on_adapter), (off_lines, off_results, off_adapter) = runs[True], runs[False]
    assert (
        [r["step"] for r in on_lines] == [r["step"] for r in off_lines] == [1, 2, 2, 3, 4, 4]
    )  # validation: 2, 4
    for mine, theirs in zip(on_lines, off_lines):
        assert mine.keys() == theirs.keys()
        assert mine.get("tokens_seen") == theirs.get("tokens_seen")  # chosen + rejected rows' tokens
        skip = {"step", "epoch", "tokens_seen", "tokens_per_s", "step_time_s"}
        if abs(theirs.get("rewards/margins", 1.0)) < 1e-5:
            # Precomputed log-probs (evaluation batches) against a policy still equal to them:
            # rewards of ~1e-7 either way, whose signs (the accuracy) only rounding decides.
            skip.add("rewards/accuracies")
        for key in mine.keys() - skip:
            assert mine[key] == pytest.approx(theirs[key], abs=1e-5), (mine["step"], key)
    for when in ("before", "after"):
        for key, value in off_results[when].items():
            if isinstance(value, float):
                assert on_results[when][key] == pytest.approx(value, abs=1e-5), (when, key)
    assert on_adapter.keys() == off_adapter.keys() and on_adapter
    for name, tensor in off_adapter.items():
        torch.testing.assert_close(on_adapter[name], tensor, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "change",
    [{"shared_prefix": False}, {"method": "prompt_tuning"}, {"lora_dropout": 0.1}],
    ids=["switched-off", "prompt-tuning", "dropout"],
)
def test_the_loop_keeps_two_rows_where_it_does_not_apply(tiny_model_dir, tmp_path, change):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    config = job(tiny_model_dir, data, tmp_path / "run", shared_prefix=change.get("shared_prefix", True))
    raw = config.to_yaml_dict()
    raw["evaluation"]["accuracy_before"] = False
    if "method" in change:
        raw.update(method="prompt_tuning", prompt_tuning={"num_virtual_tokens": 4})
        raw.pop("lora")
    if "lora_dropout" in change:
        raw["lora"]["lora_dropout"] = 0.1
    session = setup_session(build_job_config(raw), overwrite=True)
    assert session.task.shared_prompt is None
    examples, _ = session.world.shard(session.stream.get(0))
    assert "pair_input_ids" not in session.task.collate(examples, session.tokenizer.pad_token_id)
