"""LoRA, the method registry, PeftModel and the adapter file format, on tiny random models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from _lora_helpers import LLAMA_LINEARS, biased_llama, logits, lora, trainable, wrapped
from _tiny_models import make_tiny_gpt2
from conftest import make_tiny_llama
from peftkit import (
    LoraConfig,
    PeftConfig,
    PeftModelForCausalLM,
    TaskType,
    get_peft_model,
    get_peft_model_state_dict,
)
from peftkit.configuration import ConfigError, from_dict
from peftkit.errors import TargetModulesError
from peftkit.methods import UnknownMethodError, get_method, list_methods, register_peft_method
from peftkit.methods.lora import LoraModel
from peftkit.methods.modules_to_save import ModulesToSaveWrapper

pytestmark = pytest.mark.usefixtures("single_thread")


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


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bias_options_choose_trainable_parameters(bias):
    model = get_peft_model(biased_llama(), lora(target_modules=["q_proj", "v_proj"], bias=bias))
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
