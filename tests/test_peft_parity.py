"""Parity with Hugging Face PEFT (the oracle): parameter counts, logits, files in both directions.

Every case builds the same tiny model twice, wraps one with ``peft`` and one with ``peftkit``
from the same config, copies PEFT's (randomised) weights into ours, and compares.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from _tiny_models import make_tiny_bloom, make_tiny_gpt2
from conftest import make_tiny_llama

peft = pytest.importorskip("peft")

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("single_thread")


def biased_llama():
    return make_tiny_llama(attention_bias=True, mlp_bias=True)


# (model builder, LoraConfig kwargs shared by both libraries)
CASES = {
    "qv": (make_tiny_llama, dict(target_modules=["q_proj", "v_proj"])),
    "default-targets": (make_tiny_llama, dict(target_modules=None)),
    "attn-r4-a16": (
        make_tiny_llama,
        dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=4, lora_alpha=16),
    ),
    "all-linear-rslora": (
        make_tiny_llama,
        dict(target_modules="all-linear", r=16, lora_alpha=32, use_rslora=True),
    ),
    "regex": (make_tiny_llama, dict(target_modules=r".*\.mlp\.(gate|up)_proj", r=2, lora_alpha=5)),
    "suffix-path": (make_tiny_llama, dict(target_modules=["self_attn.o_proj", "mlp.down_proj"])),
    "exclude": (make_tiny_llama, dict(target_modules="all-linear", exclude_modules=["k_proj", "up_proj"])),
    "bias-all": (biased_llama, dict(target_modules=["q_proj", "v_proj"], bias="all")),
    "bias-lora-only": (biased_llama, dict(target_modules=["q_proj", "up_proj"], bias="lora_only")),
    "modules-to-save": (
        make_tiny_llama,
        dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    ),
    "layers-list": (make_tiny_llama, dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
    "layers-int-pattern": (
        make_tiny_llama,
        dict(target_modules=["k_proj"], layers_to_transform=0, layers_pattern="layers"),
    ),
    "patterns": (
        make_tiny_llama,
        dict(target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 32}),
    ),
    "dropout": (make_tiny_llama, dict(target_modules=["q_proj"], lora_dropout=0.1)),
    "no-task-type": (make_tiny_llama, dict(target_modules=["q_proj"], task_type=None)),
    "gpt2-conv1d": (make_tiny_gpt2, dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "gpt2-all-linear": (make_tiny_gpt2, dict(target_modules="all-linear", fan_in_fan_out=True)),
    "bloom-fused-qkv": (
        make_tiny_bloom,
        dict(target_modules=None, bias="lora_only", modules_to_save=["lm_head"]),
    ),
}


def _kwargs(config: dict) -> dict:
    return {"task_type": "CAUSAL_LM", **config}


def _vocab(builder) -> int:
    return 400 if builder in (make_tiny_llama, biased_llama) else 100


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def pair(request):
    """(peft model, peftkit model, input ids, builder, config) with identical weights.

    Built once per case; tests that change the models work on copies.
    """
    builder, config = CASES[request.param]
    base = builder()
    ours_base = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base, peft.LoraConfig(**_kwargs(config), init_lora_weights=False))
    ours = peftkit.get_peft_model(ours_base, peftkit.LoraConfig(**_kwargs(config), init_lora_weights=False))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the trainable tensors (incl. biases, modules_to_save) off their init
        for param in theirs.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    ours.load_state_dict(theirs.state_dict())  # strict: the state-dict layouts are identical
    ids = torch.randint(0, _vocab(builder), (2, 11), generator=gen)
    theirs.eval()
    ours.eval()
    return theirs, ours, ids, builder, config


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_same_parameter_counts_and_trainable_names(pair):
    theirs, ours, *_ = pair
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    their_trainable = {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == their_trainable
    assert set(ours.state_dict()) == set(theirs.state_dict())


def test_same_logits(pair):
    theirs, ours, ids, *_ = pair
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=ATOL, rtol=0)


def test_same_adapter_state_dict(pair):
    theirs, ours, *_ = pair
    expected = peft.get_peft_model_state_dict(theirs)
    got = peftkit.get_peft_model_state_dict(ours)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_peftkit_adapter_loads_in_peft(pair, tmp_path):
    theirs, ours, ids, builder, _ = pair
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(builder(), tmp_path)
    torch.testing.assert_close(_logits(loaded, ids), _logits(ours, ids), atol=ATOL, rtol=0)
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == set(
        peft.get_peft_model_state_dict(loaded)
    )


def test_peft_adapter_loads_in_peftkit(pair, tmp_path):
    theirs, ours, ids, builder, _ = pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(builder(), tmp_path)
    torch.testing.assert_close(_logits(loaded, ids), _logits(theirs, ids), atol=ATOL, rtol=0)
    assert loaded.get_nb_trainable_parameters()[0] == 0


def test_adapter_config_json_matches_peft(pair, tmp_path):
    theirs, ours, *_ = pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    their_json = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    our_json = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(our_json) == set(their_json) - {"peft_version"}
    implemented = {f.name for f in dataclasses.fields(peftkit.LoraConfig)} | {"auto_mapping"}
    for key in implemented:
        mine, yours = our_json[key], their_json[key]
        if isinstance(yours, list) and isinstance(mine, list):
            mine, yours = sorted(mine), sorted(yours)  # PEFT stores target sets in arbitrary order
        assert mine == yours, key


def test_merge_and_unload_matches_peft(pair):
    theirs, ours, ids, *_ = copy.deepcopy(pair)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        their_merged = theirs.merge_and_unload()
    ours_merged = ours.merge_and_unload()
    torch.testing.assert_close(_logits(ours_merged, ids), _logits(their_merged, ids), atol=ATOL, rtol=0)
    assert set(ours_merged.state_dict()) == set(their_merged.state_dict())
