"""LLaMA-Adapter (adaption prompts) against PEFT's ``AdaptionPromptConfig`` on tiny Llama, Mistral
and GPT-2 (the model types PEFT 0.21 supports): counts, names, saved keys, logits, files both ways,
generation with the KV cache and left padding, unloading, and bad configs (several adapters:
test_adaption_prompt_adapters.py)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import peftkit
from _tiny_models import make_tiny_bloom, make_tiny_gpt2, tiny_bert_case, tiny_mlp_case, tiny_t5_case
from conftest import make_tiny_llama
from peftkit.errors import PeftkitError, TargetModulesError
from peftkit.methods.adaption_prompt import AdaptedAttention, AdaptionPromptConfig
from peftkit.serialization import load_adapter_weights

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 100


def make_tiny_mistral(seed: int = 0) -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        sliding_window=None,
        pad_token_id=0,
        eos_token_id=2,
    )
    return MistralForCausalLM(config).eval()


BUILDERS = {
    "llama": lambda: make_tiny_llama(vocab_size=VOCAB),
    "mistral": make_tiny_mistral,
    "gpt2": lambda: make_tiny_gpt2(vocab_size=VOCAB),
}
KWARGS = dict(adapter_len=3, adapter_layers=1, task_type="CAUSAL_LM")
IDS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def ours(arch: str, **overrides) -> peftkit.PeftModel:
    return peftkit.get_peft_model(BUILDERS[arch](), AdaptionPromptConfig(**{**KWARGS, **overrides}))


def theirs(arch: str, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(BUILDERS[arch](), peft.AdaptionPromptConfig(**{**KWARGS, **overrides}))


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1].startswith("adaption_")}


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Random prompts and non-zero gates, so the adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("adaption_prompt", "adaption_gate")):
                param.copy_(torch.randn(param.shape, generator=generator))


def logits(model: nn.Module, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**({"input_ids": IDS} | inputs)).logits


def trainable(model: nn.Module) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


# -- parity with PEFT ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", BUILDERS)
@pytest.mark.parametrize("layers", [1, 2])
def test_counts_names_and_keys_equal_peft(arch, layers):
    mine, reference = ours(arch, adapter_layers=layers), theirs(arch, adapter_layers=layers)
    assert mine.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()
    assert trainable(mine) == trainable(reference)
    assert sorted(peftkit.get_peft_model_state_dict(mine)) == sorted(
        peft.get_peft_model_state_dict(reference)
    )
    # The whole state dict too: the original attention sits under `.model` in both.
    assert sorted(mine.state_dict()) == sorted(reference.state_dict())


@pytest.mark.parametrize("arch", BUILDERS)
def test_output_unchanged_at_init(arch):
    torch.testing.assert_close(logits(ours(arch, adapter_layers=2)), logits(BUILDERS[arch]()), atol=0, rtol=0)


@pytest.mark.parametrize("arch", BUILDERS)
def test_same_weights_give_peft_logits_with_nonzero_gate(arch):
    mine, reference = ours(arch, adapter_layers=2), theirs(arch, adapter_layers=2)
    randomize(reference)
    mine.load_state_dict(adapter_tensors(reference), strict=False)
    got = logits(mine)
    assert (got - logits(BUILDERS[arch]())).abs().max() > 1e-2  # the prompts do something
    torch.testing.assert_close(got, logits(reference), atol=1e-5, rtol=0)
    mask = torch.ones_like(IDS)
    torch.testing.assert_close(logits(mine, attention_mask=mask), logits(reference), atol=1e-5, rtol=0)


def test_formula_by_hand_on_llama():
    """The last layer's output equals attention + o_proj(gate * softmax(q kᵀ/√d) v) of the prompt."""
    model = ours("llama")
    randomize(model)
    wrapper = model.get_base_model().model.layers[1].self_attn
    attn = wrapper.model
    captured = {}
    attn.register_forward_hook(
        lambda m, args, kwargs, out: captured.update(kwargs=kwargs, out=out[0]), with_kwargs=True
    )
    wrapper.register_forward_hook(lambda m, args, out: captured.update(wrapped=out[0]))
    logits(model)
    hidden, (cos, sin) = captured["kwargs"]["hidden_states"], captured["kwargs"]["position_embeddings"]
    b, s, _ = hidden.shape
    q = attn.q_proj(hidden).view(b, s, 4, 8).transpose(1, 2)
    rotated = torch.cat((-q[..., 4:], q[..., :4]), dim=-1)
    q = q * cos[:, None] + rotated * sin[:, None]
    prompt = wrapper.adaption_prompt[0]  # (L, 32)
    k = attn.k_proj(prompt).view(3, 2, 8).permute(1, 0, 2).repeat_interleave(2, dim=0)  # (4, L, 8)
    v = attn.v_proj(prompt).view(3, 2, 8).permute(1, 0, 2).repeat_interleave(2, dim=0)
    weights = torch.softmax(q @ k.transpose(1, 2) / 8**0.5, dim=-1)  # (b, 4, s, L)
    extra = attn.o_proj((wrapper.adaption_gate * weights @ v).transpose(1, 2).reshape(b, s, 32))
    torch.testing.assert_close(captured["wrapped"], captured["out"] + extra, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", BUILDERS)
def test_files_load_in_both_directions(arch, tmp_path):
    mine = ours(arch, adapter_layers=2)
    randomize(mine, seed=1)
    mine.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADAPTION_PROMPT" and saved["target_modules"] in ("self_attn", "attn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded_theirs = peft.PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "ours")
    torch.testing.assert_close(logits(loaded_theirs), logits(mine), atol=1e-5, rtol=0)

    reference = theirs(arch, adapter_layers=2)
    randomize(reference, seed=2)
    reference.save_pretrained(tmp_path / "theirs")
    ref_json = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert set(saved) == set(ref_json) - {"peft_version"}  # peftkit writes no PEFT version
    assert sorted(load_adapter_weights(tmp_path / "ours")) == sorted(
        load_adapter_weights(tmp_path / "theirs")
    )
    loaded_ours = peftkit.PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "theirs")
    torch.testing.assert_close(logits(loaded_ours), logits(reference), atol=1e-5, rtol=0)
    assert loaded_ours.get_nb_trainable_parameters()[0] == 0


# -- generation ---------------------------------------------------------------------------------------


def greedy_without_cache(model: nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(steps):
            next_id = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    return ids


@pytest.mark.parametrize("arch", BUILDERS)
def test_generate_with_cache_equals_stepwise_argmax_and_peft(arch):
    model = ours(arch, adapter_layers=2)
    randomize(model, seed=3)
    prompt = IDS[:, :5]
    with torch.no_grad():
        out = model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False
        )
    torch.testing.assert_close(out, greedy_without_cache(model, prompt, 6), atol=0, rtol=0)
    assert not torch.equal(out, greedy_without_cache(BUILDERS[arch](), prompt, 6))  # the adapter matters
    reference = theirs(arch, adapter_layers=2)
    reference.load_state_dict(adapter_tensors(model), strict=False)
    with torch.no_grad():
        expected = reference.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False
        )
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padded_batch_generates_like_each_row_alone(arch):
    """Like PEFT, every position attends to the prompt tokens unmasked; padding cannot leak into the
    real positions, so each row of a left-padded batch generates what it generates alone."""
    model = ours(arch, adapter_layers=2)
    randomize(model, seed=4)
    pad = 0
    rows = [IDS[0, :7], IDS[1, :4]]
    ids = torch.full((2, 7), pad)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, 7 - len(row) :], mask[i, 7 - len(row) :] = row, 1
    with torch.no_grad():
        batch = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=pad
        )
        for i, row in enumerate(rows):
            alone = model.generate(
                input_ids=row[None],
                attention_mask=torch.ones(1, len(row), dtype=torch.long),
                max_new_tokens=5,
                do_sample=False,
                pad_token_id=pad,
            )
            torch.testing.assert_close(batch[i, 7:], alone[0, len(row) :], atol=0, rtol=0)


# -- training -----------------------------------------------------------------------------------------


def test_training_loss_fast_path_goes_through_the_prompts():
    """train/loss.py runs the transformer body directly: the wrappers sit inside it, so the loss
    equals the full model's and its gradient reaches the gates (no loss hook needed)."""
    from peftkit.train.loss import lm_loss_sum

    model = ours("llama", adapter_layers=2)
    randomize(model, seed=5)
    labels = IDS.clone()
    labels[:, :3] = -100
    batch = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": labels}
    total, n = lm_loss_sum(model, batch)
    full = model(input_ids=IDS).logits[:, :-1].reshape(-1, VOCAB)
    expected = nn.functional.cross_entropy(
        full, labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    torch.testing.assert_close(total, expected, atol=1e-4, rtol=1e-5)
    assert n == int((labels[:, 1:] != -100).sum())
    total.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_bf16_model_keeps_fp32_adapter_and_runs():
    model = peftkit.get_peft_model(
        make_tiny_llama(vocab_size=VOCAB).to(torch.bfloat16), AdaptionPromptConfig(**KWARGS)
    )
    randomize(model)
    assert {p.dtype for n, p in model.named_parameters() if p.requires_grad} == {torch.float32}
    out = model(input_ids=IDS).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().sum().backward()


# -- unloading and several adapters --------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unload_restores_the_base_model_and_merge_is_refused(arch):
    model = ours(arch, adapter_layers=2)
    randomize(model)
    before = logits(model)
    with pytest.raises(PeftkitError, match="cannot be merged.*unload"):
        model.merge_and_unload()
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)  # refused before changing anything
    base = model.unload()
    assert not any(isinstance(m, AdaptedAttention) for m in base.modules())
    assert not any("adaption_" in n for n, _ in base.named_parameters())
    reference = BUILDERS[arch]()
    assert sorted(base.state_dict()) == sorted(reference.state_dict())
    assert type(
        base.get_submodule("model.layers.1.self_attn" if arch == "llama" else "transformer.h.1.attn")
    ) is type(
        reference.get_submodule("model.layers.1.self_attn" if arch == "llama" else "transformer.h.1.attn")
    )
    torch.testing.assert_close(logits(base), logits(reference), atol=0, rtol=0)


def test_wrapping_a_model_twice_is_refused():
    model = ours("llama")
    with pytest.raises(PeftkitError, match="already contains adapter layers"):
        peftkit.get_peft_model(model.get_base_model(), AdaptionPromptConfig(**KWARGS))


# -- bad configs and unsupported models ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(adapter_len=0, adapter_layers=1), "adapter_len must be a positive integer"),
        (dict(adapter_len=None, adapter_layers=1), "adapter_len must be a positive integer"),
        (dict(adapter_len=2, adapter_layers=0), "adapter_layers must be a positive integer"),
        (dict(adapter_len=2.5, adapter_layers=1), "adapter_len must be a positive integer"),
        (dict(adapter_len=2, adapter_layers=1, target_modules=["self_attn"]), "name of the attention"),
    ],
)
def test_bad_config_values_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaptionPromptConfig(**kwargs)


def test_too_many_layers_and_unknown_target_are_refused():
    with pytest.raises(TargetModulesError, match="adapter_layers=3 but the model has only 2 .*at most 2"):
        ours("llama", adapter_layers=3)
    with pytest.raises(TargetModulesError, match="'attention' matched no module.*'self_attn'"):
        ours("llama", target_modules="attention")


@pytest.mark.parametrize(
    "build",
    [
        lambda: make_tiny_bloom(),
        lambda: tiny_t5_case().model,
        lambda: tiny_bert_case().model,
        lambda: tiny_mlp_case().model,
    ],
    ids=["bloom", "t5", "bert", "mlp"],
)
def test_unsupported_models_are_refused_naming_the_supported_types(build):
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TargetModulesError, match="llama, mistral, gpt2"):
        peftkit.get_peft_model(model, AdaptionPromptConfig(adapter_len=2, adapter_layers=1))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_config_round_trips_through_json(tmp_path):
    config = AdaptionPromptConfig(**KWARGS, target_modules="self_attn")
    config.save_pretrained(tmp_path)
    assert peftkit.PeftConfig.from_pretrained(tmp_path) == config
    theirs_config = peft.AdaptionPromptConfig.from_pretrained(tmp_path)
    assert (theirs_config.adapter_len, theirs_config.adapter_layers) == (3, 1)
