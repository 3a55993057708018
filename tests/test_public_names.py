"""PEFT's public names at peftkit's top level: every name of ``peft.__all__`` is either exported by
peftkit (as the object playing the same role) or listed in ``MISSING_ON_PURPOSE`` with the reason.

Users port PEFT tutorials by changing only ``from peft import ...`` to ``from peftkit import ...``;
these tests keep that working for everything peftkit implements, and keep the list of what it
does not implement exact (a name exported later, or dropped by PEFT, makes a test fail).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import pickle
from enum import Enum
from pathlib import Path

import peft
import pytest
import torch

import peftkit
from conftest import make_tiny_llama, sample_ids
from peftkit.errors import ModelLoadError
from peftkit.methods import get_method, list_methods

pytestmark = pytest.mark.usefixtures("single_thread")

_METHOD = "a PEFT method peftkit does not implement"
_LORA_VARIANT = "a LoRA variant, initialisation or option peftkit does not implement"
_CONVERSION = "converting other methods' adapters to LoRA is not implemented"
_MIXED = "mixed-method models (adapters of several methods on one model) are not implemented"
_INTERNAL = "PEFT internals or low-level helpers, not part of peftkit's API"
_STATUS = "adapter status reports (get_layer_status / get_model_status) are not implemented"
_ERRORS = "PEFT's exception and warning classes: peftkit raises its own (PeftkitError and subclasses)"

# Every name of peft.__all__ (PEFT 0.21.2) that ``import peftkit`` does not provide, and why.
MISSING_ON_PURPOSE: dict[str, str] = {
    **dict.fromkeys(
        [
            "AdamssConfig",
            "AdamssModel",
            "BeftConfig",
            "BeftModel",
            "C3AConfig",
            "C3AModel",
            "CPTConfig",
            "CPTEmbedding",
            "CartridgeConfig",
            "CartridgeEncoder",
            "compose_cartridge_adapters",
            "initialize_kv_prefix_from_past_key_values",
            "initialize_kv_prefix_from_text",
            "prompt_embeddings_from_past_key_values",
            "DeftConfig",
            "DeftModel",
            "DeloraConfig",
            "DeloraModel",
            "FourierFTConfig",
            "FourierFTModel",
            "FrodConfig",
            "FrodModel",
            "GloraConfig",
            "GloraModel",
            "GraloraConfig",
            "GraloraModel",
            "HRAConfig",
            "HRAModel",
            "HiraConfig",
            "HiraModel",
            "LNTuningConfig",
            "LNTuningModel",
            "LilyConfig",
            "LilyModel",
            "MissConfig",
            "MissModel",
            "MultitaskPromptTuningConfig",
            "MultitaskPromptTuningInit",
            "OSFConfig",
            "OSFModel",
            "PeanutConfig",
            "PeanutModel",
            "PolyConfig",
            "PolyModel",
            "PsoftConfig",
            "PsoftModel",
            "PveraConfig",
            "PveraModel",
            "RandLoraConfig",
            "RandLoraModel",
            "RoadConfig",
            "RoadModel",
            "ShadowConfig",
            "ShadowModel",
            "ShiraConfig",
            "ShiraModel",
            "SupertuningConfig",
            "SupertuningModel",
            "TinyLoraConfig",
            "TinyLoraModel",
            "TrainableTokensConfig",  # peftkit: only LoRA's trainable_token_indices
            "TrainableTokensModel",
            "UniLoraConfig",
            "UniLoraModel",
            "VBLoRAConfig",
            "VBLoRAModel",
            "VeraConfig",
            "VeraModel",
            "WaveFTConfig",
            "WaveFTModel",
            "XLoraConfig",
            "XLoraModel",
        ],
        _METHOD,
    ),
    **dict.fromkeys(
        [
            "ArrowConfig",
            "create_arrow_model",
            "BdLoraConfig",
            "EvaConfig",
            "get_eva_state_dict",
            "initialize_lora_eva_weights",
            "KasaConfig",
            "LoftQConfig",
            "replace_lora_weights_loftq",
            "LoraGAConfig",
            "preprocess_loraga",
            "LoraRuntimeConfig",  # ephemeral GPU offload
            "MontecloraConfig",
            "VeloraConfig",
            "find_kappa_target_modules",  # KappaTune target selection
        ],
        _LORA_VARIANT,
    ),
    **dict.fromkeys(["convert_to_lora", "save_as_lora"], _CONVERSION),
    **dict.fromkeys(["PeftMixedModel", "PEFT_TYPE_TO_MIXED_MODEL_MAPPING"], _MIXED),
    **dict.fromkeys(
        [
            "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
            "PEFT_TYPE_TO_TUNER_MAPPING",
            "TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING",
            "bloom_model_postprocess_past_key_value",
            "cast_mixed_precision_params",
            "get_base_model_state_dict",
            "inject_adapter_in_model",
            "set_base_model_state_dict",
            "shift_tokens_right",
        ],
        _INTERNAL,
    ),
    **dict.fromkeys(["get_layer_status", "get_model_status"], _STATUS),
    **dict.fromkeys(["NoMatchingPeftModuleError", "PeftError", "PeftWarning"], _ERRORS),
}

EXPORTED = sorted(set(peft.__all__) - set(MISSING_ON_PURPOSE))

# The tuner model classes PEFT exports, by the peftkit method they belong to.
TUNER_MODELS = {
    "lora": "LoraModel",
    "adalora": "AdaLoraModel",
    "ia3": "IA3Model",
    "loha": "LoHaModel",
    "lokr": "LoKrModel",
    "oft": "OFTModel",
    "boft": "BOFTModel",
    "adaption_prompt": "AdaptionPromptModel",
}


# -- the name table -------------------------------------------------------------------------


def test_every_peft_name_is_exported_or_missing_on_purpose():
    unaccounted = sorted(
        name for name in peft.__all__ if name not in MISSING_ON_PURPOSE and name not in dir(peftkit)
    )
    assert unaccounted == [], f"export these from peftkit or add them to MISSING_ON_PURPOSE: {unaccounted}"


def test_missing_on_purpose_is_really_missing_and_really_peft_s():
    exported = sorted(name for name in MISSING_ON_PURPOSE if name in dir(peftkit) or hasattr(peftkit, name))
    assert exported == [], f"peftkit exports these now: remove them from MISSING_ON_PURPOSE: {exported}"
    not_peft = sorted(set(MISSING_ON_PURPOSE) - set(peft.__all__))
    assert not_peft == [], f"not in peft.__all__ (any more): remove them from MISSING_ON_PURPOSE: {not_peft}"


@pytest.mark.parametrize("name", EXPORTED)
def test_each_exported_peft_name_imports_from_the_top_level(name):
    namespace: dict = {}
    exec(f"from peftkit import {name}", namespace)
    ours, theirs = namespace[name], getattr(peft, name)
    assert name in peftkit.__all__
    assert isinstance(ours, type) == isinstance(theirs, type)  # a class for a class
    assert callable(ours) == callable(theirs)  # a function for a function, a mapping for a mapping
    if isinstance(theirs, type) and issubclass(theirs, Enum):
        assert issubclass(ours, Enum) and issubclass(ours, str) == issubclass(theirs, str)


def test_lazy_exports_all_and_type_checking_block_agree():
    """``__init__.py`` names each export three times; they must agree (name and module)."""
    tree = ast.parse(Path(peftkit.__file__).read_text())
    type_checking = next(
        node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
    )
    imported = {
        alias.name: node.module
        for node in ast.walk(type_checking)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert imported == peftkit._LAZY_EXPORTS
    assert sorted(peftkit.__all__) == sorted([*peftkit._LAZY_EXPORTS, "__version__"])
    assert len(peftkit.__all__) == len(set(peftkit.__all__))


# -- the exported objects play PEFT's roles ----------------------------------------------------


@pytest.mark.parametrize("name", ["TaskType", "PromptTuningInit", "PromptEncoderReparameterizationType"])
def test_enums_have_peft_s_values(name):
    ours, theirs = getattr(peftkit, name), getattr(peft, name)
    assert {m.name: m.value for m in ours} == {m.name: m.value for m in theirs}


@pytest.mark.parametrize("method", sorted(TUNER_MODELS))
def test_tuner_model_classes_are_the_registered_ones(method):
    name = TUNER_MODELS[method]
    spec = get_method(method)
    assert getattr(peftkit, name) is spec.model_cls
    assert peft.PEFT_TYPE_TO_TUNER_MAPPING[spec.peft_type] is getattr(peft, name)  # PEFT's tuner there
    assert spec.config_cls is getattr(peftkit, spec.config_cls.__name__)  # its config is exported too


def test_prompt_learning_classes_are_what_the_soft_prompt_methods_use():
    for method in ("prompt_tuning", "p_tuning", "prefix_tuning"):
        assert issubclass(get_method(method).config_cls, peftkit.PromptLearningConfig)
    assert not issubclass(peftkit.LoraConfig, peftkit.PromptLearningConfig)
    shared = {f.name for f in dataclasses.fields(peftkit.PromptLearningConfig)}
    assert {"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_layers"} <= shared

    def encoder(config):
        model = peftkit.get_peft_model(make_tiny_llama(), config)
        return model.base_model.prompt_encoder["default"]

    common = dict(task_type="CAUSAL_LM", num_virtual_tokens=3)
    assert type(encoder(peftkit.PromptTuningConfig(**common))) is peftkit.PromptEmbedding
    assert (
        type(encoder(peftkit.PromptEncoderConfig(encoder_hidden_size=8, **common))) is peftkit.PromptEncoder
    )
    assert type(encoder(peftkit.PrefixTuningConfig(**common))) is peftkit.PrefixEncoder


# -- PeftType ----------------------------------------------------------------------------------


def test_peft_type_covers_the_registry_exactly():
    assert issubclass(peftkit.PeftType, str) and issubclass(peftkit.PeftType, Enum)
    registered = {get_method(name).peft_type for name in list_methods()}
    assert {m.value for m in peftkit.PeftType} == registered
    assert all(m.name == m.value for m in peftkit.PeftType)


def test_peft_type_values_are_peft_s_for_the_methods_both_have():
    shared = set(peftkit.PeftType.__members__) & set(peft.PeftType.__members__)
    assert {"LORA", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "IA3", "ADALORA"} <= shared
    for name in shared:
        assert peftkit.PeftType[name].value == peft.PeftType[name].value
        assert peftkit.PeftType[name] == peft.PeftType[name]  # both are str
    # a PEFT config's peft_type compares equal to peftkit's member and the other way round
    assert peft.LoraConfig().peft_type == peftkit.PeftType.LORA
    assert peftkit.LoraConfig().peft_type == peft.PeftType.LORA
    assert peftkit.BottleneckConfig().peft_type == peftkit.PeftType.BOTTLENECK  # peftkit's own


# -- a PEFT tutorial with only the import changed ----------------------------------------------


def _soft_prompt_tutorial(lib):
    """PEFT's prompt tuning / P-tuning tutorial code, for ``lib`` = peft or peftkit."""
    results = []
    for config in (
        lib.PromptTuningConfig(
            task_type=lib.TaskType.CAUSAL_LM,
            prompt_tuning_init=lib.PromptTuningInit.RANDOM,
            num_virtual_tokens=4,
        ),
        lib.PromptEncoderConfig(
            task_type=lib.TaskType.CAUSAL_LM,
            encoder_reparameterization_type=lib.PromptEncoderReparameterizationType.MLP,
            num_virtual_tokens=4,
            encoder_hidden_size=16,
        ),
    ):
        model = lib.get_peft_model(make_tiny_llama(), config)
        ids = sample_ids()
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        results.append(
            (model.peft_config["default"].peft_type, model.get_nb_trainable_parameters(), logits.shape)
        )
    return results


def test_soft_prompt_tutorial_runs_with_only_the_import_changed():
    ours = _soft_prompt_tutorial(peftkit)
    assert ours == _soft_prompt_tutorial(peft)  # same types, trainable parameter counts, shapes
    assert ours[0][0] == peftkit.PeftType.PROMPT_TUNING
    assert ours[1][0] == peftkit.PeftType.P_TUNING
    default = peftkit.PromptEncoderConfig(num_virtual_tokens=4).encoder_reparameterization_type
    assert default is peftkit.PromptEncoderReparameterizationType.MLP


# -- get_peft_config, PEFT_TYPE_TO_CONFIG_MAPPING, load_peft_weights ---------------------------

LORA = dict(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"])


def _saved_lora(directory: Path) -> peftkit.PeftModel:
    torch.manual_seed(3)
    model = peftkit.get_peft_model(make_tiny_llama(), peftkit.LoraConfig(**LORA, init_lora_weights=False))
    model.save_pretrained(directory)
    return model


def test_peft_type_to_config_mapping_is_the_registry_and_agrees_with_peft():
    mapping = peftkit.PEFT_TYPE_TO_CONFIG_MAPPING
    assert dict(mapping) == {get_method(n).peft_type: get_method(n).config_cls for n in list_methods()}
    assert mapping[peftkit.PeftType.LORA] is peftkit.LoraConfig and mapping["LORA"] is peftkit.LoraConfig
    for peft_type, theirs in peft.PEFT_TYPE_TO_CONFIG_MAPPING.items():
        if peft_type in mapping:
            assert mapping[peft_type].__name__ == theirs.__name__
    with pytest.raises(KeyError):
        mapping["lora"]  # keys are peft_type values, as in PEFT
    with pytest.raises(TypeError, match="register_peft_method"):
        mapping["MINE"] = peftkit.LoraConfig


@pytest.mark.parametrize("name", ["get_peft_config", "load_peft_weights"])
def test_positional_arguments_are_peft_s(name):
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)

    def positional(function):
        return [p.name for p in inspect.signature(function).parameters.values() if p.kind in kinds]

    ours = positional(getattr(peftkit, name))
    assert ours == positional(getattr(peft, name))[: len(ours)]


def test_get_peft_config_round_trips_a_saved_adapter_config(tmp_path):
    model = _saved_lora(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    config = peftkit.get_peft_config(data)
    assert type(config) is peftkit.LoraConfig
    assert config == dataclasses.replace(model.peft_config["default"], inference_mode=True)
    assert peftkit.get_peft_config({**data, "peft_type": peftkit.PeftType.LORA}) == config
    prompt = peftkit.get_peft_config({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 5})
    assert type(prompt) is peftkit.PromptTuningConfig and prompt.num_virtual_tokens == 5


def test_get_peft_config_reads_what_peft_writes(tmp_path):
    config = peft.LoraConfig(**LORA)
    config.save_pretrained(tmp_path)
    ours = peftkit.get_peft_config(json.loads((tmp_path / "adapter_config.json").read_text()))
    assert type(ours) is peftkit.LoraConfig and ours.r == 4
    assert sorted(ours.target_modules) == ["q_proj", "v_proj"]


def test_load_peft_weights_round_trips_a_saved_adapter(tmp_path):
    model = _saved_lora(tmp_path)
    loaded = peftkit.load_peft_weights(tmp_path)
    expected = peftkit.get_peft_model_state_dict(model)
    assert loaded.keys() == expected.keys() and loaded
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    theirs = peft.load_peft_weights(str(tmp_path), device="cpu")  # PEFT reads the same tensors
    assert theirs.keys() == loaded.keys() and all(torch.equal(theirs[k], loaded[k]) for k in loaded)

    fresh = peftkit.get_peft_model(make_tiny_llama(), peftkit.LoraConfig(**LORA))
    peftkit.set_peft_model_state_dict(fresh, loaded)
    ids = sample_ids()
    assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    assert {t.device.type for t in peftkit.load_peft_weights(tmp_path, device="meta").values()} == {"meta"}


def test_load_peft_weights_refuses_a_pickle_only_adapter_without_unpickling_it(tmp_path):
    sentinel = tmp_path / "unpickled"

    class RunsCodeWhenUnpickled:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    adapter = tmp_path / "adapter"
    _saved_lora(adapter)
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(RunsCodeWhenUnpickled()))
    with pytest.raises(ModelLoadError, match=r"adapter_model\.bin, a pickle file"):
        peftkit.load_peft_weights(adapter)
    assert not sentinel.exists()
