"""merge_adapter / unmerge_adapter: merge in place, exact restore.

For every method whose update folds into the weights, on tiny random models with non-zero
(randomised) adapter weights: merged logits equal the adapter's (fp32, <= 1e-4), unmerging gives
back every tensor bit for bit, ``disable_adapter()`` while merged gives the base model's exact
logits, a NaN leaves the model unchanged, and PEFT's own merge_adapter()/unmerge_adapter() agree
(LoRA, DoRA, IA3, LoHa, LoKr, with the same weights loaded into PEFT from our saved adapter).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import peftkit
from _tiny_models import make_tiny_gpt2
from conftest import make_tiny_llama
from peftkit.errors import PeftkitError

pytestmark = pytest.mark.usefixtures("single_thread")

IDS = torch.tensor([[5, 17, 42, 99, 7, 3], [8, 9, 10, 11, 12, 13]])
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {  # case -> (config class, kwargs)
    "lora": ("LoraConfig", LORA),
    "dora": ("LoraConfig", {**LORA, "use_dora": True}),
    "lora_modules_to_save": ("LoraConfig", {**LORA, "modules_to_save": ["lm_head"]}),
    "lora_tokens": ("LoraConfig", {**LORA, "trainable_token_indices": {"embed_tokens": [3, 5, 7]}}),
    "ia3": (
        "IA3Config",
        dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    ),
    "loha": ("LoHaConfig", dict(r=4, target_modules=["q_proj", "v_proj"])),
    "lokr": ("LoKrConfig", dict(r=4, target_modules=["q_proj", "v_proj"])),
    "oft": ("OFTConfig", dict(r=0, oft_block_size=4, target_modules=["q_proj", "v_proj"])),
    "boft": ("BOFTConfig", dict(boft_block_size=4, target_modules=["q_proj", "v_proj"])),
    "adalora": (
        "AdaLoraConfig",
        dict(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"]),
    ),
    "bitfit": ("BitFitConfig", dict(add_missing_biases=True)),
    "partial": ("PartialFinetuneConfig", dict(train_top_n_layers=1)),
    "full": ("FullFinetuneConfig", {}),
}
SELECTIVE = ("bitfit", "partial", "full")


def make_config(case: str, **overrides: Any) -> peftkit.PeftConfig:
    cls, kwargs = CONFIGS[case]
    return getattr(peftkit, cls)(**{**kwargs, **overrides})


def base_model(arch: str = "llama") -> nn.Module:
    return make_tiny_gpt2() if arch == "gpt2" else make_tiny_llama(vocab_size=100)


def perturb(model: nn.Module, seed: int = 3) -> None:
    """Random, as-if-trained values for every trainable tensor (so merging changes the weights)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_tensors(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k].nan_to_num(), after[k].nan_to_num())]
    assert not changed, f"changed: {changed[:4]}"


def adapted(case: str, arch: str = "llama") -> tuple[peftkit.PeftModel, torch.Tensor]:
    """(the model with a randomised adapter, the base model's logits before wrapping)."""
    base = base_model(arch)
    expected_base = logits(base)
    overrides = (
        dict(fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"]) if arch == "gpt2" else {}
    )
    model = peftkit.get_peft_model(base, make_config(case, **overrides))
    perturb(model)
    return model.eval(), expected_base


MATRIX = [pytest.param(case, "llama", id=f"{case}-llama") for case in CONFIGS] + [
    pytest.param("lora", "gpt2", id="lora-gpt2")  # transformers Conv1D layers, (in, out) weights
]


@pytest.mark.parametrize("case, arch", MATRIX)
def test_merge_unmerge_round_trip(case, arch):
    model, base_logits = adapted(case, arch)
    expected = logits(model)
    assert not torch.allclose(expected, base_logits, atol=1e-3)  # the adapter does something
    before = tensors(model)

    model.merge_adapter(safe_merge=True)
    assert model.merged and model.merged_adapters == ["default"]
    merged = logits(model)
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=0)
    if case not in SELECTIVE:  # the base weights now hold the update
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    else:  # the trained values already are the weights: nothing changes
        assert_same_tensors(model, before)

    with model.disable_adapter():  # the exact base model, while merged
        assert torch.equal(logits(model), base_logits)
    assert model.merged
    assert torch.equal(logits(model), merged)  # merged again, identically

    model.unmerge_adapter()
    assert not model.merged and model.merged_adapters == []
    assert_same_tensors(model, before)  # bit-exact restore of every tensor
    assert torch.equal(logits(model), expected)
    if case not in SELECTIVE:
        assert all(m.active_adapter == "default" for _, m in model.base_model.adapter_modules())


def test_modules_to_save_copy_stays_in_use_while_merged():
    model, _ = adapted("lora_modules_to_save")
    model.merge_adapter()
    head = model.base_model.model.lm_head
    assert head.active_adapter == "default"  # runs the trained copy: what the adapter computed
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.active_adapter is None  # runs only its base layer, holding the merged weight


@pytest.mark.parametrize("case", ["lora", "ia3", "oft"])
def test_nan_in_one_layer_names_it_and_changes_nothing(case):
    model, _ = adapted(case)
    last_name, last_layer = model.base_model.adapter_modules()[-1]
    trainable = [p for p in last_layer.parameters() if p.requires_grad and p.dim() > 0]
    with torch.no_grad():
        trainable[-1].view(-1)[0] = float("nan")
    before = tensors(model)
    with pytest.raises(ValueError, match="NaN or inf") as raised:
        model.merge_adapter()
    assert last_name in str(raised.value) and "nothing was merged" in str(raised.value)
    assert_same_tensors(model, before)
    assert not model.merged
    assert all(m.active_adapter == "default" for _, m in model.base_model.adapter_modules())


def test_safe_merge_catches_overflow_and_default_merge_does_not():
    """A finite update that overflows fp16 once added: only safe_merge refuses it (PEFT's rule)."""
    model = peftkit.get_peft_model(make_tiny_llama(vocab_size=100).half(), make_config("lora"))
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        layer.lora_A["default"].weight.fill_(300.0)
        layer.lora_B["default"].weight.fill_(300.0)  # delta = 4 * 300 * 300 * 2 = 720000 > 65504
    before = tensors(model)
    with pytest.raises(ValueError, match="layers.1.mlp.down_proj"):
        model.merge_adapter(safe_merge=True)
    assert_same_tensors(model, before)
    model.merge_adapter()
    assert torch.isinf(layer.base_layer.weight).any()
    model.unmerge_adapter()
    assert_same_tensors(model, before)  # even an overflowed merge is undone exactly


def test_selective_safe_merge_and_names():
    model, _ = adapted("partial")
    name = next(n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        model.get_parameter(name).view(-1)[0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        model.merge_adapter(safe_merge=True)
    assert not model.merged
    with pytest.raises(PeftkitError, match="active adapter only"):
        model.merge_adapter(adapter_names=["other"])


# -- refusals -------------------------------------------------------------------------------------


def test_methods_that_cannot_merge_say_why():
    prompt = peftkit.get_peft_model(
        make_tiny_llama(vocab_size=100),
        peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    )
    with pytest.raises(PeftkitError, match="cannot be merged.*virtual tokens"):
        prompt.merge_adapter()
    with pytest.raises(PeftkitError, match="cannot be merged"):
        prompt.unmerge_adapter()
    assert not prompt.merged
    llama_adapter = peftkit.get_peft_model(
        make_tiny_llama(vocab_size=100),
        peftkit.AdaptionPromptConfig(adapter_len=3, adapter_layers=1, task_type="CAUSAL_LM"),
    )
    with pytest.raises(PeftkitError, match="adaption prompt cannot be merged.*attention to learned tokens"):
        llama_adapter.merge_adapter()

    bottleneck = peftkit.get_peft_model(
        make_tiny_llama(vocab_size=100), peftkit.BottleneckConfig(bottleneck_size=4, init="random")
    )
    before, expected = tensors(bottleneck), logits(bottleneck)
    with pytest.raises(PeftkitError, match="bottleneck adapters add layers and cannot be merged") as raised:
        bottleneck.merge_adapter()
    assert "nothing was merged" in str(raised.value)
    assert_same_tensors(bottleneck, before)
    assert torch.equal(logits(bottleneck), expected)


def two_adapters() -> peftkit.PeftModel:
    model = peftkit.get_peft_model(make_tiny_llama(vocab_size=100), make_config("lora"), "a")
    model.add_adapter("b", make_config("lora"))
    for seed, name in enumerate(("a", "b")):
        model.set_adapter(name)
        perturb(model, seed=seed + 1)
    model.set_adapter("a")
    return model.eval()


def test_refusals_while_merged():
    model = two_adapters()
    model.merge_adapter()
    for action, call in [
        ("add_adapter", lambda: model.add_adapter("c", make_config("lora"))),
        ("delete_adapter", lambda: model.delete_adapter("b")),
        ("add_weighted_adapter", lambda: model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ab", "linear")),
        ("adapter_names", lambda: model(input_ids=IDS, adapter_names=["a", "b"])),
        ("adapter_names", lambda: model.generate(input_ids=IDS, adapter_names=["a", "b"], max_new_tokens=2)),
    ]:
        with pytest.raises(PeftkitError, match=f"{action}.*unmerge_adapter\\(\\) first"):
            call()
    assert model.merged and list(model.peft_config) == ["a", "b"]


def test_set_adapter_unmerges_first_with_a_warning():
    model = two_adapters()
    expected_b = copy.deepcopy(model)
    expected_b.set_adapter("b")
    before = tensors(model)
    model.merge_adapter()
    with pytest.warns(UserWarning, match="unmerging"):
        model.set_adapter("b")
    assert not model.merged
    assert_same_tensors(model, before)
    assert torch.equal(logits(model), logits(expected_b))


def test_merging_more_adapters_on_top():
    """As PEFT: merging again adds the adapters not merged yet; unmerge restores the base once."""
    model = two_adapters()
    reference = copy.deepcopy(model).merge_and_unload(adapter_names=["a", "b"])
    before = tensors(model)
    model.merge_adapter()
    with pytest.warns(UserWarning, match="already merged; now additionally merging b"):
        model.merge_adapter(["a", "b"])
    assert model.merged_adapters == ["a", "b"]
    assert torch.equal(logits(model), logits(reference))
    with pytest.warns(UserWarning, match="nothing to do"):
        model.merge_adapter(["b"])
    model.unmerge_adapter()
    assert_same_tensors(model, before)


def test_merging_adapters_of_other_layers_on_top_restores_every_layer():
    model = peftkit.get_peft_model(make_tiny_llama(vocab_size=100), make_config("lora"), "a")
    model.add_adapter("b", make_config("lora", target_modules=["k_proj", "up_proj"]))
    for seed, name in enumerate(("a", "b")):
        model.set_adapter(name)
        perturb(model, seed=seed + 1)
    model.set_adapter("a")
    model.eval()
    before = tensors(model)
    model.merge_adapter(["a"])
    with pytest.warns(UserWarning, match="additionally merging b"):
        model.merge_adapter(["b"])  # layers the first merge left alone
    assert not torch.equal(
        model.state_dict()["base_model.model.model.layers.0.self_attn.k_proj.base_layer.weight"],
        before["base_model.model.model.layers.0.self_attn.k_proj.base_layer.weight"],
    )
    model.unmerge_adapter()
    assert_same_tensors(model, before)


def test_a_trained_base_bias_keeps_its_new_value_at_unmerge():
    """LoRA's bias="all" trains the base biases, which merging leaves alone: a step taken while
    merged must survive unmerging, while the weights merging changed are restored bit for bit."""
    config = make_config("lora", bias="all", fan_in_fan_out=True, target_modules=["c_attn", "c_fc"])
    model = peftkit.get_peft_model(make_tiny_gpt2(), config)
    perturb(model)
    before = tensors(model)
    model.merge_adapter()
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        layer.base_layer.bias.add_(0.5)  # as an optimizer step on the trainable bias would
    model.unmerge_adapter()
    after = model.state_dict()
    bias = "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias"
    torch.testing.assert_close(after[bias], before[bias] + 0.5, atol=0, rtol=0)
    assert_same_tensors(model, {**before, bias: after[bias]})


def test_merge_several_adapters_at_once_equals_merge_and_unload():
    model = two_adapters()
    reference = copy.deepcopy(model).merge_and_unload(adapter_names=["a", "b"])
    model.merge_adapter(adapter_names=["a", "b"])
    assert torch.equal(logits(model), logits(reference))


def test_merge_and_unload_and_unload_after_merge_adapter():
    model, base_logits = adapted("lora")
    expected = logits(model)
    model.merge_adapter()
    merged = model.merge_and_unload()  # not merged twice
    assert not any(isinstance(m, peftkit.methods.base.AdapterModule) for m in merged.modules())
    torch.testing.assert_close(logits(merged), expected, atol=1e-4, rtol=0)

    model, base_logits = adapted("lora")
    model.merge_adapter()
    plain = model.unload()  # the base weights, restored
    assert torch.equal(logits(plain), base_logits)
    reference = base_model().state_dict()  # the same seed: the same base weights
    assert plain.state_dict().keys() == reference.keys()
    assert all(torch.equal(value, reference[key]) for key, value in plain.state_dict().items())


def test_merge_adapter_refuses_a_layer_that_cannot_merge_in_place():
    """A layer whose merge builds a new module (as bitsandbytes layers do) is refused, all-or-nothing."""
    model, _ = adapted("lora")
    before, expected = tensors(model), logits(model)
    name, layer = model.base_model.adapter_modules()[-1]
    original = layer.unwrap

    def dense_on_merge(merge: bool) -> nn.Module:
        return copy.deepcopy(original(merge)) if merge else layer.base_layer

    layer.unwrap = dense_on_merge
    with pytest.raises(PeftkitError, match="cannot merge into this .* in place.*merge_and_unload") as raised:
        model.merge_adapter()
    assert name in str(raised.value)
    assert_same_tensors(model, before)
    assert not model.merged and torch.equal(logits(model), expected)


# -- PEFT as the oracle ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["lora", "dora", "ia3", "loha", "lokr"])
def test_merge_and_unmerge_match_peft(case, tmp_path):
    peft = pytest.importorskip("peft")
    ours, _ = adapted(case)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(make_tiny_llama(vocab_size=100), tmp_path).eval()
    expected = logits(ours)
    torch.testing.assert_close(logits(theirs), expected, atol=1e-5, rtol=0)

    ours.merge_adapter()
    theirs.merge_adapter()
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=0)

    ours.unmerge_adapter()
    theirs.unmerge_adapter()
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=0)
    assert torch.equal(logits(ours), expected)  # ours exactly; PEFT's by subtraction


# -- a bitsandbytes 4-bit base ----------------------------------------------------------------------


def test_4bit_base_merge_adapter_refuses_and_merge_and_unload_dequantizes(tmp_path):
    pytest.importorskip("bitsandbytes", reason="needs bitsandbytes: pip install 'peftkit[qlora]'")
    from conftest import make_tiny_tokenizer
    from peftkit.models import load_model_and_tokenizer
    from peftkit.quantization import QuantizationConfig

    tok = make_tiny_tokenizer()
    make_tiny_llama(vocab_size=len(tok), hidden_size=64, intermediate_size=128).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    quant = QuantizationConfig(bits=4, quant_type="nf4", double_quant=True, compute_dtype="fp32")
    base, _ = load_model_and_tokenizer(tmp_path, quantization=quant)
    model = peftkit.get_peft_model(base, peftkit.LoraConfig(**LORA, init_lora_weights=False)).eval()
    expected = logits(model)
    before = tensors(model)
    with pytest.raises(PeftkitError, match="quantized.*merge_and_unload"):
        model.merge_adapter()
    assert not model.merged
    assert_same_tensors(model, before)
    with pytest.warns(UserWarning, match="merging LoRA into a 4-bit layer"):
        merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=0)


def test_bf16_merge_rounds_once():
    """A bf16 base: the merged weight is W + B A s computed in fp32 and rounded once (adding a delta
    already rounded to bf16 would round twice: up to 1 ulp off)."""
    torch.manual_seed(0)
    model = peftkit.get_peft_model(
        make_tiny_llama(), peftkit.LoraConfig(target_modules=["q_proj"], init_lora_weights=False)
    )
    model.to(torch.bfloat16)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    expected = (layer.base_layer.weight.float() + layer.delta_weight("default")).to(torch.bfloat16)
    merged = model.merge_and_unload()
    assert torch.equal(merged.model.layers[0].self_attn.q_proj.weight, expected)
