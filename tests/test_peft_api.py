"""PEFT's Python API, call for call: signatures, adapter switching and trainability, the tuner
methods PEFT users reach through ``PeftModel``, and dtype handling, with PEFT as the oracle."""

from __future__ import annotations

import inspect
import warnings

import peft
import pytest
import torch

import peftkit
from _lora_helpers import logits, trainable, trained
from conftest import make_tiny_llama, sample_ids

pytestmark = pytest.mark.usefixtures("single_thread")

LORA = dict(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])


def both(**config):
    """The same LoRA on two identical tiny Llamas: (PEFT's, peftkit's)."""
    theirs = peft.get_peft_model(make_tiny_llama(), peft.LoraConfig(**{**LORA, **config}))
    ours = peftkit.get_peft_model(make_tiny_llama(), peftkit.LoraConfig(**{**LORA, **config}))
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def positional(function) -> list[str]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in inspect.signature(function).parameters.values() if p.kind in kinds]


@pytest.mark.parametrize(
    "name, peft_name",
    [
        ("get_peft_model", None),
        ("get_peft_model_state_dict", None),
        ("set_peft_model_state_dict", None),
        ("PeftModel.save_pretrained", None),
        ("PeftModel.from_pretrained", None),
        ("PeftModel.load_adapter", None),
        ("PeftModel.set_adapter", None),
        ("PeftModel.set_requires_grad", None),
        ("PeftModel.merge_and_unload", "LoraModel.merge_and_unload"),  # PEFT: on the tuner
        ("PeftModel.add_weighted_adapter", "LoraModel.add_weighted_adapter"),
    ],
)
def test_positional_arguments_are_peft_s(name, peft_name):
    """Code calling PEFT positionally gets the same meaning (peftkit may add keyword-only ones)."""

    def resolve(module, path):
        obj = module
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj

    ours, theirs = positional(resolve(peftkit, name)), positional(resolve(peft, peft_name or name))
    assert theirs[: len(ours)] == ours
    assert len(theirs) - len(ours) <= 1  # at most PEFT's key_mapping, which peftkit lacks


def test_set_adapter_makes_a_frozen_loaded_adapter_trainable_as_peft_does(tmp_path):
    theirs, ours = both()
    trained(ours).save_pretrained(tmp_path)
    theirs.load_adapter(str(tmp_path), "b")
    ours.load_adapter(tmp_path, "b")
    assert not any(".b." in n for n in trainable(ours))
    theirs.set_adapter("b")
    ours.set_adapter("b")
    assert trainable(ours) == trainable(theirs) and all(".b." in n for n in trainable(ours))
    ours.add_adapter("c", peftkit.LoraConfig(**LORA))  # a later refresh keeps the choice
    assert trainable(ours) == trainable(theirs)
    theirs.set_adapter("default", inference_mode=True)
    ours.set_adapter("default", inference_mode=True)
    assert trainable(ours) == trainable(theirs) == set()
    with pytest.raises(ValueError, match="no adapter.*'nope'.*adapters: default, b, c"):
        ours.set_adapter("nope")


def test_set_requires_grad():
    theirs, ours = both()
    for model in (theirs, ours):
        model.add_adapter("b", model.peft_config["default"])
        model.set_requires_grad(["b"], True)
    assert trainable(ours) == trainable(theirs)
    assert any(".b." in n for n in trainable(ours)) and any(".default." in n for n in trainable(ours))
    for model in (theirs, ours):
        model.set_requires_grad("default", requires_grad=False)
    assert trainable(ours) == trainable(theirs)


def test_disable_and_enable_adapter_layers_and_what_they_target():
    theirs, ours = both()
    trained(ours)
    theirs.load_state_dict(ours.state_dict())
    ids = sample_ids()
    adapted = logits(ours, ids)
    for model in (theirs, ours):
        model.disable_adapter_layers()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids))
    assert not torch.allclose(logits(ours, ids), adapted)
    for model in (theirs, ours):
        model.enable_adapter_layers()
    assert torch.equal(logits(ours, ids), adapted)
    torch.testing.assert_close(logits(theirs, ids), adapted)
    assert ours.targeted_module_names == theirs.targeted_module_names
    assert ours.modules_to_save == theirs.modules_to_save == {"lm_head"}


def test_disabling_merged_adapters_unmerges_them_first():
    _, ours = both()
    trained(ours)
    ids = sample_ids()
    adapted = logits(ours, ids)
    ours.merge_adapter()
    with pytest.warns(UserWarning, match="unmerging"):
        ours.disable_adapter_layers()
    assert not ours.merged_adapters
    ours.enable_adapter_layers()
    torch.testing.assert_close(logits(ours, ids), adapted)


@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype_on_a_bf16_model(tmp_path, autocast):
    def dtypes(model):
        return {n: p.dtype for n, p in model.named_parameters() if "lora_" in n}

    config = dict(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"])
    theirs = peft.get_peft_model(
        make_tiny_llama().to(torch.bfloat16), peft.LoraConfig(**config), autocast_adapter_dtype=autocast
    )
    ours = peftkit.get_peft_model(
        make_tiny_llama().to(torch.bfloat16), peftkit.LoraConfig(**config), autocast_adapter_dtype=autocast
    )
    assert dtypes(ours) == dtypes(theirs)
    assert set(dtypes(ours).values()) == {torch.float32 if autocast else torch.bfloat16}
    ours.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(
        make_tiny_llama().to(torch.bfloat16), tmp_path, autocast_adapter_dtype=autocast
    )
    assert dtypes(loaded) == dtypes(ours)


def test_state_dict_functions_take_peft_s_arguments(tmp_path):
    theirs, ours = both()
    trained(ours)
    state = peftkit.get_peft_model_state_dict(ours, ours.state_dict(), "default")  # PEFT's order
    assert set(state) == set(peft.get_peft_model_state_dict(theirs, theirs.state_dict(), "default"))
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    wrong = {**state, name: torch.zeros(1, 1)}
    with pytest.raises(peftkit.errors.ModelLoadError, match="ignore_mismatched_sizes=True"):
        peftkit.set_peft_model_state_dict(ours, wrong)
    before = ours.state_dict()[name.replace("lora_A.weight", "lora_A.default.weight")].clone()
    with pytest.warns(UserWarning, match="wrong shape were not loaded"):
        peftkit.set_peft_model_state_dict(ours, wrong, "default", True, True)
    assert torch.equal(ours.state_dict()[name.replace("lora_A.weight", "lora_A.default.weight")], before)


def test_subfolder_mixed_and_conversion_options(tmp_path):
    _, ours = both()
    trained(ours)
    ours.save_pretrained(tmp_path / "repo" / "adapters" / "one")
    loaded = peftkit.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "repo", subfolder="adapters/one")
    ids = sample_ids()
    assert torch.equal(logits(loaded, ids), logits(ours, ids))
    with pytest.raises(peftkit.errors.ModelLoadError, match="subfolder 'two'"):
        peftkit.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "repo", subfolder="two")
    with pytest.raises(peftkit.errors.PeftkitError, match="no mixed model"):
        peftkit.get_peft_model(make_tiny_llama(), peftkit.LoraConfig(**LORA), mixed=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT's no-op options are accepted quietly
        peftkit.PeftModel.from_pretrained(
            make_tiny_llama(),
            tmp_path / "repo" / "adapters" / "one",
            low_cpu_mem_usage=True,
            ephemeral_gpu_offload=False,
            torch_device="cpu",
        )


@pytest.mark.parametrize(
    "init, extra",
    [
        ("pissa", {}),
        ("olora", {"use_rslora": True}),
        ("pissa", {"target_modules": ["q_proj", "embed_tokens"], "rank_pattern": {"q_proj": 2}}),
    ],
)
def test_pissa_olora_adapter_saved_as_plain_lora_for_the_original_base(tmp_path, init, extra):
    """PEFT's path_initial_model_for_weight_conversion: the converted adapter on the unchanged base
    model gives the trained model's outputs, in peftkit and in PEFT, and its config is PEFT's."""
    config = {
        "task_type": "CAUSAL_LM",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        **extra,
    }
    model = peftkit.get_peft_model(make_tiny_llama(), peftkit.LoraConfig(init_lora_weights=init, **config))
    model.save_pretrained(tmp_path / "init")
    trained(model)
    ids = sample_ids()
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "init")

    assert not torch.allclose(logits(make_tiny_llama(), ids), expected)  # the base differs
    ours = peftkit.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "plain")
    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path / "plain"))
    torch.testing.assert_close(logits(ours, ids), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits(theirs, ids), expected, atol=1e-5, rtol=1e-4)
    saved = peftkit.PeftConfig.from_pretrained(tmp_path / "plain")
    assert saved.r == 8 and saved.init_lora_weights is True
    assert saved.lora_alpha == pytest.approx(8 * (2**0.5 if extra.get("use_rslora") else 2))
    assert saved.rank_pattern == {k: 2 * v for k, v in extra.get("rank_pattern", {}).items()}


def test_only_lora_converts_from_its_initial_weights(tmp_path):
    model = peftkit.get_peft_model(make_tiny_llama(), peftkit.IA3Config(task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "init")
    with pytest.raises(peftkit.errors.PeftkitError, match="only LoRA adapters"):
        model.save_pretrained(tmp_path / "x", path_initial_model_for_weight_conversion=tmp_path / "init")
    dora = peftkit.get_peft_model(make_tiny_llama(), peftkit.LoraConfig(**LORA, use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(peftkit.errors.PeftkitError, match="DoRA"):
        dora.save_pretrained(tmp_path / "y", path_initial_model_for_weight_conversion=tmp_path / "dora")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
