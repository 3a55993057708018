"""LoRA, the method registry, PeftModel and the adapter file format, on tiny random models."""

from __future__ import annotations

import copy
import json
import math
import pickle

import pytest
import torch
from torch import nn

from _tiny_models import make_tiny_gpt2
from conftest import make_tiny_llama
from peftkit import (
    LoraConfig,
    PeftConfig,
    PeftModel,
    PeftModelForCausalLM,
    TaskType,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from peftkit.configuration import ConfigError, from_dict
from peftkit.errors import ModelLoadError, PeftkitError, TargetModulesError
from peftkit.io import TMP_MARKER
from peftkit.methods import UnknownMethodError, get_method, list_methods, register_peft_method
from peftkit.methods.lora import LoraLinear, LoraModel
from peftkit.methods.modules_to_save import ModulesToSaveWrapper

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def trainable(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def wrapped(model: PeftModel) -> set[str]:
    return {name for name, m in model.get_base_model().named_modules() if isinstance(m, LoraLinear)}


def lora(**kwargs) -> LoraConfig:
    return LoraConfig(task_type=TaskType.CAUSAL_LM, **kwargs)


# -- forward ------------------------------------------------------------------------------------


def test_default_init_leaves_logits_unchanged(ids):
    base = make_tiny_llama()
    expected = logits(base, ids)
    model = get_peft_model(base, lora(target_modules="all-linear"))
    assert torch.equal(logits(model, ids), expected)
    assert isinstance(model, PeftModelForCausalLM)


@pytest.mark.parametrize(
    ("r", "alpha", "rslora", "scaling"),
    [(8, 8, False, 1.0), (4, 16, False, 4.0), (16, 8, True, 2.0), (2, 3, False, 1.5), (9, 6, True, 2.0)],
)
def test_scaling(r, alpha, rslora, scaling):
    model = get_peft_model(
        make_tiny_llama(),
        lora(target_modules=["q_proj"], r=r, lora_alpha=alpha, use_rslora=rslora, init_lora_weights=False),
    )
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(scaling)
    assert layer.scaling["default"] == pytest.approx(alpha / (math.sqrt(r) if rslora else r))
    x = torch.randn(3, layer.in_features)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        expected = layer.base_layer(x) + x @ a.T @ b.T * scaling
        torch.testing.assert_close(layer(x), expected)


def test_rank_and_alpha_patterns():
    config = lora(
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"q_proj": 2},
        alpha_pattern={r"layers\.1\.self_attn\.v_proj": 32},
    )
    base = get_peft_model(make_tiny_llama(), config).get_base_model()
    assert base.model.layers[0].self_attn.q_proj.r["default"] == 2
    assert base.model.layers[0].self_attn.v_proj.r["default"] == 8
    assert base.model.layers[1].self_attn.v_proj.scaling["default"] == 4.0
    assert base.model.layers[0].self_attn.v_proj.scaling["default"] == 1.0


def test_bf16_base_with_fp32_adapter(ids):
    model = get_peft_model(make_tiny_llama().to(torch.bfloat16), lora(target_modules=["q_proj", "v_proj"]))
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.lora_A["default"].weight.dtype == torch.float32
    out = model(input_ids=ids).logits
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.lora_B["default"].weight.grad is not None


def test_conv1d_layers_of_gpt2():
    base = make_tiny_gpt2()
    ids = torch.randint(0, 100, (2, 7))
    expected = logits(base, ids)
    model = get_peft_model(base, LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True))
    assert torch.equal(logits(model, ids), expected)
    layer = model.get_base_model().transformer.h[0].attn.c_attn
    assert (layer.in_features, layer.out_features, layer.fan_in_fan_out) == (32, 96, True)


def test_adapter_params_report():
    model = get_peft_model(make_tiny_llama(), lora(target_modules=["q_proj"]))
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.adapter_params("default") == {
        "lora_A.weight": "lora_A.default.weight",
        "lora_B.weight": "lora_B.default.weight",
    }
    assert layer.adapter_params("other") == {}


# -- targeting ----------------------------------------------------------------------------------


def _layer_names(layers, suffixes):
    prefix = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
    return {f"model.layers.{i}.{prefix.get(s, 'mlp')}.{s}" for i in layers for s in suffixes}


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (dict(target_modules=["q_proj", "v_proj"]), _layer_names([0, 1], ["q_proj", "v_proj"])),
        (dict(target_modules=None), _layer_names([0, 1], ["q_proj", "v_proj"])),  # llama default
        (dict(target_modules=["self_attn.o_proj"]), _layer_names([0, 1], ["o_proj"])),
        (dict(target_modules=r".*\.1\.mlp\.(up|down)_proj"), _layer_names([1], ["up_proj", "down_proj"])),
        (dict(target_modules=r"q_proj"), set()),  # a regex must match the full name
        (dict(target_modules="all-linear"), _layer_names([0, 1], LLAMA_LINEARS)),
        (
            dict(target_modules="all-linear", exclude_modules=["o_proj", "down_proj"]),
            _layer_names([0, 1], LLAMA_LINEARS[:3] + LLAMA_LINEARS[4:6]),
        ),
        (
            dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
            _layer_names([1], ["q_proj", "v_proj"]),
        ),
        (
            dict(target_modules=["k_proj"], layers_to_transform=0, layers_pattern="layers"),
            _layer_names([0], ["k_proj"]),
        ),
        (dict(target_modules="all-linear", layers_to_transform=[0]), _layer_names([0], LLAMA_LINEARS)),
    ],
)
def test_target_selection(config, expected):
    if not expected:
        with pytest.raises(TargetModulesError):
            get_peft_model(make_tiny_llama(), lora(**config))
        return
    model = get_peft_model(make_tiny_llama(), lora(**config))
    assert wrapped(model) == expected
    assert "lm_head" not in wrapped(model)


def test_target_that_matches_nothing_lists_what_would():
    with pytest.raises(TargetModulesError) as err:
        get_peft_model(make_tiny_llama(), lora(target_modules=["query", "value"]))
    message = str(err.value)
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head" in message
    assert "['query', 'value']" in message


def test_target_of_unsupported_type_is_refused():
    with pytest.raises(TargetModulesError, match="LlamaMLP"):
        get_peft_model(make_tiny_llama(), lora(target_modules=["mlp"]))


def test_no_default_targets_for_unknown_architecture():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(TargetModulesError, match="no default LoRA targets"):
        get_peft_model(model, LoraConfig())
    peft_model = get_peft_model(model, LoraConfig(target_modules=["0"]))
    assert peft_model(torch.randn(3, 4)).shape == (3, 2)


def test_targetable_modules_for_inspect():
    spec = get_method("lora")
    names = spec.targetable_modules(make_tiny_llama())
    assert "model.layers.0.self_attn.q_proj" in names and "lm_head" in names
    assert "model.embed_tokens" in names  # embeddings take LoRA too
    assert len(names) == 2 * len(LLAMA_LINEARS) + 2


# -- trainable parameters -----------------------------------------------------------------------


def _biased_llama():
    return make_tiny_llama(attention_bias=True, mlp_bias=True)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bias_options_choose_trainable_parameters(bias):
    model = get_peft_model(_biased_llama(), lora(target_modules=["q_proj", "v_proj"], bias=bias))
    names = trainable(model)
    lora_params = {n for n in names if ".lora_A." in n or ".lora_B." in n}
    assert len(lora_params) == 2 * 2 * 2
    extra = names - lora_params
    every_bias = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    if bias == "none":
        assert extra == set()
    elif bias == "all":
        assert extra == every_bias and len(every_bias) == 2 * 7
    else:
        assert extra == {n for n in every_bias if ("q_proj" in n or "v_proj" in n)} and len(extra) == 4
    saved = get_peft_model_state_dict(model)
    assert len(saved) == len(names)


def test_only_adapter_parameters_train_and_get_grads(ids):
    model = get_peft_model(make_tiny_llama(), lora(target_modules="all-linear", modules_to_save=["lm_head"]))
    model.train()
    names = trainable(model)
    assert names == {n for n in names if ".lora_" in n or ".modules_to_save.default." in n}
    assert any("modules_to_save" in n for n in names)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == names


def test_modules_to_save_wrapper(ids):
    base = make_tiny_llama()
    original_head = base.lm_head.weight.detach().clone()
    model = get_peft_model(base, lora(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    head = model.get_base_model().lm_head
    assert isinstance(head, ModulesToSaveWrapper)
    assert not head.original_module.weight.requires_grad
    assert head.modules_to_save["default"].weight.requires_grad
    keys = set(model.state_dict())
    assert {
        "base_model.model.lm_head.original_module.weight",
        "base_model.model.lm_head.modules_to_save.default.weight",
    } <= keys
    saved = get_peft_model_state_dict(model)
    assert "base_model.model.lm_head.weight" in saved
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(1.0)
    torch.testing.assert_close(head.original_module.weight, original_head)
    changed = logits(model, ids)
    with model.disable_adapter():
        unchanged = logits(model, ids)
    assert not torch.allclose(changed, unchanged)
    torch.testing.assert_close(unchanged, logits(make_tiny_llama(), ids))


def test_modules_to_save_that_matches_nothing():
    with pytest.raises(TargetModulesError, match="modules_to_save"):
        get_peft_model(make_tiny_llama(), lora(target_modules=["q_proj"], modules_to_save=["score"]))


def test_nb_trainable_parameters_on_meta_device():
    real = get_peft_model(make_tiny_llama(), lora(target_modules="all-linear", modules_to_save=["lm_head"]))
    with torch.device("meta"):
        meta_base = make_tiny_llama()
    meta = get_peft_model(meta_base, lora(target_modules="all-linear", modules_to_save=["lm_head"]))
    assert next(meta.parameters()).device.type == "meta"
    assert meta.get_nb_trainable_parameters() == real.get_nb_trainable_parameters()
    trainable_count, total = real.get_nb_trainable_parameters()
    assert 0 < trainable_count < total


def test_print_trainable_parameters(capsys):
    get_peft_model(make_tiny_llama(), lora(target_modules=["q_proj"])).print_trainable_parameters()
    assert capsys.readouterr().out.startswith("trainable params: 1,024 || all params: ")


# -- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(r=-4), "r must be a positive integer"),
        (dict(lora_dropout=1.0), "lora_dropout must be in"),
        (
            dict(target_modules=".*proj", layers_to_transform=[0]),
            "layers_to_transform only works with a list",
        ),
        (
            dict(target_modules=["q_proj"], layers_pattern="layers"),
            "layers_pattern is set but layers_to_transform",
        ),
        (dict(init_lora_weights="corda"), "init_lora_weights='corda' is not supported"),
        (dict(task_type="CAUSAL"), "task_type must be one of"),
    ],
)
def test_invalid_config_says_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_config_problems_from_yaml_are_reported_together():
    with pytest.raises(ConfigError) as err:
        from_dict(LoraConfig, {"r": 0, "lora_dropout": 2.0, "lora_alhpa": 4})
    text = str(err.value)
    assert "r must be a positive integer" in text and "lora_dropout" in text and "lora_alpha" in text


def test_every_config_field_has_help():
    import dataclasses

    for field in dataclasses.fields(LoraConfig):
        assert field.metadata.get("help"), field.name


def test_config_reads_peft_json_and_refuses_missing_features(tmp_path):
    data = {
        **LoraConfig().to_peft_json(),
        "peft_version": "0.21.2",
        "auto_mapping": None,
        "some_future_flag": None,
    }
    config = PeftConfig.from_pretrained(data)
    assert isinstance(config, LoraConfig) and config.r == 8
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({**data, "use_qalora": True, "megatron_config": {"x": 1}})
    )
    with pytest.raises(ConfigError) as err:
        PeftConfig.from_pretrained(tmp_path)
    assert "'use_qalora' = True" in str(err.value) and "'megatron_config'" in str(err.value)
    # a key that only matters when its feature is on is accepted while the feature is off
    assert PeftConfig.from_pretrained({**data, "qalora_group_size": 64}).r == 8
    with pytest.raises(ConfigError, match="new_thing"):
        PeftConfig.from_pretrained({**data, "new_thing": [1, 2]})


def test_config_round_trip(tmp_path):
    config = lora(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 2}, layers_to_transform=[1])
    config.save_pretrained(tmp_path)
    loaded = LoraConfig.from_pretrained(tmp_path)
    assert loaded == config
    assert loaded.task_type is TaskType.CAUSAL_LM


# -- registry -----------------------------------------------------------------------------------


def test_registry():
    assert "lora" in list_methods()
    assert get_method("LORA") is get_method("LoRA")
    assert get_method("lora").config_cls is LoraConfig
    with pytest.raises(UnknownMethodError, match="did you mean 'lora'"):
        get_method("lroa")
    with pytest.raises(ValueError, match="already registered"):
        register_peft_method("lora", LoraConfig, LoraModel)
    for bad in ("LoRA", "my-method", "", "1x"):
        with pytest.raises(ValueError, match="lower-case identifier"):
            register_peft_method(bad, LoraConfig, LoraModel)
    with pytest.raises(ValueError, match="needs 'NEWMETHOD'"):
        register_peft_method("newmethod", LoraConfig, LoraModel)
    assert "newmethod" not in list_methods()


# -- saving and loading -------------------------------------------------------------------------


def _trained(model: PeftModel, seed: int = 0) -> PeftModel:
    """Stand-in for training: move every trainable tensor away from its init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    return model


@pytest.mark.parametrize(
    "config",
    [
        dict(target_modules=["q_proj", "v_proj"]),
        dict(target_modules="all-linear", bias="all", modules_to_save=["lm_head"], r=4),
        dict(target_modules=["q_proj"], bias="lora_only", layers_to_transform=[1], use_rslora=True),
    ],
)
def test_save_load_round_trip(tmp_path, ids, config):
    model = _trained(get_peft_model(_biased_llama(), lora(**config)))
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary directories left
    loaded = PeftModel.from_pretrained(_biased_llama(), tmp_path / "adapter")
    assert isinstance(loaded, PeftModelForCausalLM)
    assert torch.equal(logits(loaded, ids), expected)
    assert trainable(loaded) == set() and not loaded.training
    again = PeftModel.from_pretrained(_biased_llama(), tmp_path / "adapter", is_trainable=True)
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
    first = _trained(get_peft_model(make_tiny_llama(), lora(target_modules=["q_proj"])), seed=1)
    first.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(serialization, "write_json", crash)
    second = _trained(get_peft_model(make_tiny_llama(), lora(target_modules=["q_proj"])), seed=2)
    with pytest.raises(KeyboardInterrupt):
        second.save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    assert not any(TMP_MARKER in p.name for p in tmp_path.rglob("*"))


def test_save_into_directory_shared_with_other_files(tmp_path, ids):
    (tmp_path / "tokenizer.json").write_text("{}")
    model = _trained(get_peft_model(make_tiny_llama(), lora(target_modules=["q_proj"])))
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
    model = _trained(get_peft_model(make_tiny_llama(), lora(target_modules=["q_proj"])))
    first = logits(model, ids)
    model.add_adapter("other", lora(target_modules=["v_proj"], r=2))
    assert model.active_adapter == "default" and torch.equal(logits(model, ids), first)
    assert all(".default." in n for n in trainable(model))
    model.set_adapter("other")
    assert trainable(model) and all(".other." in n for n in trainable(model))
    _trained(model, seed=3)
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
        model = _trained(get_peft_model(make(), config))
        inputs = ids % 100
        expected = logits(model, inputs)
        merged = model.merge_and_unload()
        assert not any(isinstance(m, (LoraLinear, ModulesToSaveWrapper)) for m in merged.modules())
        torch.testing.assert_close(logits(merged, inputs), expected, atol=1e-5, rtol=1e-5)


def test_unload_restores_base(ids):
    base = make_tiny_llama()
    expected = logits(base, ids)
    plain = _trained(get_peft_model(base, lora(target_modules="all-linear"))).unload()
    assert torch.equal(logits(plain, ids), expected)


def test_wrapping_twice_is_refused():
    model = get_peft_model(make_tiny_llama(), lora(target_modules=["q_proj"]))
    with pytest.raises(PeftkitError, match="already contains adapter layers"):
        get_peft_model(model.get_base_model(), lora(target_modules=["v_proj"]))


def test_explicit_delegation_and_generate(ids):
    base = make_tiny_llama()
    model = get_peft_model(base, lora(target_modules=["q_proj"]))
    assert model.config is base.config
    assert model.device.type == "cpu" and model.dtype == torch.float32
    assert model.get_input_embeddings() is base.model.embed_tokens
    assert "__getattr__" not in PeftModel.__dict__
    with pytest.raises(AttributeError):
        model.vocab_size  # noqa: B018 - not delegated: no silent forwarding
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
