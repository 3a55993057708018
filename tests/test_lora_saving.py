"""LoRA adapters on disk (PEFT's file layout, atomic saves, no unpickling) and a PeftModel's life
cycle: several adapters, merging, unloading, delegation to the base model."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch

from _lora_helpers import LLAMA_LINEARS, biased_llama, logits, lora, trainable, trained
from _tiny_models import make_tiny_gpt2
from conftest import make_tiny_llama
from peftkit import (
    LoraConfig,
    PeftModel,
    PeftModelForCausalLM,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from peftkit.errors import ModelLoadError, PeftkitError, TargetModulesError
from peftkit.io import TMP_MARKER
from peftkit.methods.lora import LoraLinear
from peftkit.methods.modules_to_save import ModulesToSaveWrapper

pytestmark = pytest.mark.usefixtures("single_thread")


# -- saving and loading -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        dict(target_modules=["q_proj", "v_proj"]),
        dict(target_modules="all-linear", bias="all", modules_to_save=["lm_head"], r=4),
        dict(target_modules=["q_proj"], bias="lora_only", layers_to_transform=[1], use_rslora=True),
    ],
)
def test_save_load_round_trip(tmp_path, ids, config):
    model = trained(get_peft_model(biased_llama(), lora(**config)))
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary directories left
    loaded = PeftModel.from_pretrained(biased_llama(), tmp_path / "adapter")
    assert isinstance(loaded, PeftModelForCausalLM)
    assert torch.equal(logits(loaded, ids), expected)
    assert trainable(loaded) == set() and not loaded.training
    again = PeftModel.from_pretrained(biased_llama(), tmp_path / "adapter", is_trainable=True)
    assert trainable(again) == trainable(model)


def test_saved_keys_and_config(tmp_path):
    from safetensors.torch import load_file

    model = get_peft_model(make_tiny_llama(), lora(target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 4
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["inference_mode"] is True and config["use_dora"] is False
    assert model.peft_config["default"].inference_mode is False  # saving does not change the live config


def test_save_is_atomic_and_keeps_old_adapter_on_failure(tmp_path, monkeypatch, ids):
    import peftkit.serialization as serialization

    target = tmp_path / "adapter"
    first = trained(get_peft_model(make_tiny_llama(), lora(target_modules=["q_proj"])), seed=1)
    first.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(serialization, "write_json", crash)
    second = trained(get_peft_model(make_tiny_llama(), lora(target_modules=["q_proj"])), seed=2)
    with pytest.raises(KeyboardInterrupt):
        second.save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    assert not any(TMP_MARKER in p.name for p in tmp_path.rglob("*"))


def test_save_into_directory_shared_with_other_files(tmp_path, ids):
    (tmp_path / "tokenizer.json").write_text("{}")
    model = trained(get_peft_model(make_tiny_llama(), lora(target_modules=["q_proj"])))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
    ]
    assert torch.equal(
        logits(PeftModel.from_pretrained(make_tiny_llama(), tmp_path), ids), logits(model, ids)
    )


def test_pickle_only_adapter_is_refused_without_unpickling(tmp_path, monkeypatch):
    get_peft_model(make_tiny_llama(), lora(target_modules=["q_proj"])).save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    (tmp_path / "adapter_model.bin").write_bytes(pickle.dumps({"x": 1}))

    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle file was opened for unpickling")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    with pytest.raises(ModelLoadError, match="adapter_model.bin, a pickle file"):
        PeftModel.from_pretrained(make_tiny_llama(), tmp_path)


def test_missing_directory_and_safe_serialization(tmp_path):
    with pytest.raises(ModelLoadError):
        PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "nowhere")
    model = get_peft_model(make_tiny_llama(), lora(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="only as safetensors"):
        model.save_pretrained(tmp_path, safe_serialization=False)


def test_set_state_dict_reports_missing_and_unexpected_keys():
    model = get_peft_model(make_tiny_llama(), lora(target_modules=["q_proj"]))
    state = get_peft_model_state_dict(model)
    dropped = sorted(state)[0]
    partial = {k: v for k, v in state.items() if k != dropped}
    partial["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(8, 32)
    with pytest.raises(ModelLoadError) as err:
        set_peft_model_state_dict(model, partial)
    assert dropped in str(err.value) and "up_proj.lora_A.weight" in str(err.value)
    result = set_peft_model_state_dict(model, partial, strict=False)
    assert result.missing_keys == [dropped] and len(result.unexpected_keys) == 1
    with pytest.raises(ModelLoadError, match="wrong shape"):
        set_peft_model_state_dict(model, {**state, dropped: torch.zeros(1, 1)})


# -- several adapters, unloading, delegation ------------------------------------------------------


def test_two_adapters(tmp_path, ids):
    model = trained(get_peft_model(make_tiny_llama(), lora(target_modules=["q_proj"])))
    first = logits(model, ids)
    model.add_adapter("other", lora(target_modules=["v_proj"], r=2))
    assert model.active_adapter == "default" and torch.equal(logits(model, ids), first)
    assert all(".default." in n for n in trainable(model))
    model.set_adapter("other")
    assert trainable(model) and all(".other." in n for n in trainable(model))
    trained(model, seed=3)
    second = logits(model, ids)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    assert torch.equal(logits(loaded, ids), first)
    loaded.set_adapter("other")
    assert torch.equal(logits(loaded, ids), second)


def test_merge_and_unload(ids):
    for make, config in [
        (make_tiny_llama, lora(target_modules="all-linear", modules_to_save=["lm_head"])),
        (make_tiny_gpt2, LoraConfig(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    ]:
        model = trained(get_peft_model(make(), config))
        inputs = ids % 100
        expected = logits(model, inputs)
        merged = model.merge_and_unload()
        assert not any(isinstance(m, (LoraLinear, ModulesToSaveWrapper)) for m in merged.modules())
        torch.testing.assert_close(logits(merged, inputs), expected, atol=1e-5, rtol=1e-5)


def test_unload_restores_base(ids):
    base = make_tiny_llama()
    expected = logits(base, ids)
    plain = trained(get_peft_model(base, lora(target_modules="all-linear"))).unload()
    assert torch.equal(logits(plain, ids), expected)


def test_wrapping_twice_is_refused():
    model = get_peft_model(make_tiny_llama(), lora(target_modules=["q_proj"]))
    with pytest.raises(PeftkitError, match="already contains adapter layers"):
        get_peft_model(model.get_base_model(), lora(target_modules=["v_proj"]))


def test_delegation_to_the_base_model_and_generate(ids):
    base = make_tiny_llama()
    model = get_peft_model(base, lora(target_modules=["q_proj"]))
    assert model.config is base.config
    assert model.device.type == "cpu" and model.dtype == torch.float32
    assert model.get_input_embeddings() is base.model.embed_tokens
    # as in PEFT, what the wrapper lacks is read from the model inside it
    assert model.vocab_size == base.vocab_size and model.can_generate()
    assert model.num_parameters() == base.num_parameters()
    with pytest.raises(AttributeError, match="nor has its base model .LlamaForCausalLM"):
        model.no_such_thing  # noqa: B018
    # ... except what would act on the wrong object
    with pytest.raises(AttributeError, match="does not upload: save_pretrained"):
        model.push_to_hub  # noqa: B018 - it would upload the whole base model
    with pytest.raises(AttributeError, match="disable_adapter_layers"):
        model.disable_adapters()
    assert not hasattr(model, "__deepcopy__")  # copying copies the wrapper, not only the base model
    twin = copy.deepcopy(model)
    assert isinstance(twin, PeftModel) and torch.equal(logits(twin, ids), logits(model, ids))
    out = model.generate(input_ids=ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


def test_gradient_checkpointing_still_trains_adapters(ids):
    model = get_peft_model(make_tiny_llama(), lora(target_modules=["q_proj", "v_proj"]))
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_user_config_is_not_modified():
    config = lora(target_modules="all-linear")
    snapshot = copy.deepcopy(config)
    model = get_peft_model(make_tiny_llama(), config)
    assert config == snapshot
    assert isinstance(model.peft_config["default"].target_modules, list)


def test_bad_requests_leave_the_model_untouched():
    base = make_tiny_llama()
    with pytest.raises(TargetModulesError, match="modules_to_save"):
        get_peft_model(base, lora(target_modules=["q_proj"], modules_to_save=["classifier"]))
    assert not any(isinstance(m, (LoraLinear, ModulesToSaveWrapper)) for m in base.modules())
    model = get_peft_model(base, lora(target_modules=["q_proj"]))
    for name in ("a.b", "", "default"):
        with pytest.raises(ValueError, match="adapter name|already exists"):
            model.add_adapter(name, lora(target_modules=["v_proj"]))


def test_twenty_or_more_suffix_targets_are_accepted(tiny_llama):
    """A long list of name suffixes (not full module names) must not be "condensed" into nothing."""
    suffixes = [*LLAMA_LINEARS, *(f"layers.{i}.self_attn.q_proj" for i in range(2))]
    suffixes += [f"unused_{i}" for i in range(20 - len(suffixes))]
    model = get_peft_model(tiny_llama, LoraConfig(r=2, target_modules=suffixes))
    wrapped = [name for name, module in model.named_modules() if isinstance(module, LoraLinear)]
    assert len(wrapped) == 2 * len(LLAMA_LINEARS)


def test_missing_local_adapter_directory_is_named_without_asking_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise AssertionError("a local path must not be looked up on the Hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    missing = tmp_path / "runs" / "job" / "adapter"
    with pytest.raises(ModelLoadError, match="no adapter directory at"):
        PeftModel.from_pretrained(make_tiny_llama(), str(missing))
