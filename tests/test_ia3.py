"""(IA)³ against Hugging Face PEFT (the oracle), plus its own checks and a short training run.

Every parity case builds the same tiny model twice, wraps one with ``peft`` and one with
``peftkit``, copies PEFT's (random) vectors into ours and compares counts, logits and files.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from _tiny_models import make_tiny_bloom, make_tiny_gpt2
from conftest import make_tiny_llama, train_tiny
from peftkit import IA3Config, TaskType, get_peft_model
from peftkit.configuration import ConfigError
from peftkit.errors import TargetModulesError
from peftkit.methods import get_method
from peftkit.methods.ia3 import IA3Linear

peft = pytest.importorskip("peft")

ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("single_thread")


def biased_llama():
    return make_tiny_llama(attention_bias=True, mlp_bias=True)


LAYER_1 = ["model.layers.1.self_attn.k_proj", "model.layers.1.mlp.down_proj"]

# (model builder, peftkit IA3Config kwargs, PEFT kwargs when they differ)
CASES = {
    "llama-default": (make_tiny_llama, {}, None),
    "llama-ff-subset": (
        biased_llama,
        dict(target_modules=["q_proj", "k_proj", "up_proj", "down_proj"], feedforward_modules=["down_proj"]),
        None,
    ),
    "llama-no-ff": (make_tiny_llama, dict(target_modules=["v_proj", "o_proj"], feedforward_modules=[]), None),
    "llama-all-linear": (
        make_tiny_llama,
        dict(target_modules="all-linear", exclude_modules=["q_proj"], feedforward_modules=["down_proj"]),
        None,
    ),
    "llama-ff-regex": (
        make_tiny_llama,
        dict(target_modules=r".*\.(v_proj|gate_proj)", feedforward_modules=r".*gate_proj"),
        None,
    ),
    # PEFT's IA3Config has no layer filter: its oracle names the same modules in full.
    "llama-layers": (
        make_tiny_llama,
        dict(
            target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], layers_to_transform=[1]
        ),
        dict(target_modules=LAYER_1, feedforward_modules=LAYER_1[1:]),
    ),
    "llama-modules-to-save": (
        make_tiny_llama,
        dict(
            target_modules=["k_proj", "down_proj"],
            feedforward_modules=["down_proj"],
            modules_to_save=["lm_head"],
        ),
        None,
    ),
    "gpt2-default": (make_tiny_gpt2, {}, None),
    "gpt2-explicit": (
        make_tiny_gpt2,
        dict(
            target_modules=["c_attn", "c_fc", "mlp.c_proj"], feedforward_modules=["c_fc"], fan_in_fan_out=True
        ),
        None,
    ),
    "bloom-default": (make_tiny_bloom, {}, None),
    "bloom-modules-to-save": (
        make_tiny_bloom,
        dict(
            target_modules=["query_key_value", "dense_h_to_4h"],
            feedforward_modules=["dense_h_to_4h"],
            modules_to_save=["lm_head"],
        ),
        None,
    ),
}


def _vocab(builder) -> int:
    return 400 if builder in (make_tiny_llama, biased_llama) else 100


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def ia3(**kwargs) -> IA3Config:
    return IA3Config(task_type=TaskType.CAUSAL_LM, **kwargs)


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def pair(request):
    """(peft model, peftkit model, input ids, builder) with identical weights; tests change copies."""
    builder, ours_kwargs, their_kwargs = CASES[request.param]
    base = builder()
    ours_base = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            base,
            peft.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False, **(their_kwargs or ours_kwargs)),
        )
        ours = get_peft_model(ours_base, ia3(init_ia3_weights=False, **ours_kwargs))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move everything trainable (incl. modules_to_save) off its init
        for param in theirs.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    ours.load_state_dict(theirs.state_dict())  # strict: the layouts are identical
    ids = torch.randint(0, _vocab(builder), (2, 11), generator=gen)
    return theirs.eval(), ours.eval(), ids, builder


def test_same_counts_trainable_names_and_keys(pair):
    theirs, ours, *_ = pair
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }
    assert set(ours.state_dict()) == set(theirs.state_dict())


def test_same_logits_and_adapter_state_dict(pair):
    theirs, ours, ids, _ = pair
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=ATOL, rtol=0)
    expected = peft.get_peft_model_state_dict(theirs)
    got = peftkit.get_peft_model_state_dict(ours)
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def test_peftkit_adapter_loads_in_peft(pair, tmp_path):
    theirs, ours, ids, builder = pair
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(builder(), tmp_path)
    assert not [w for w in caught if "Unexpected keyword" in str(w.message)]  # PEFT knows every key
    torch.testing.assert_close(_logits(loaded, ids), _logits(ours, ids), atol=ATOL, rtol=0)
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == set(
        peft.get_peft_model_state_dict(loaded)
    )
    assert all(
        k.endswith(".ia3_l") or k == "base_model.model.lm_head.weight"
        for k in load_file(tmp_path / "adapter_model.safetensors")
    )


def test_peft_adapter_loads_in_peftkit(pair, tmp_path):
    theirs, _, ids, builder = pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(builder(), tmp_path)
    torch.testing.assert_close(_logits(loaded, ids), _logits(theirs, ids), atol=ATOL, rtol=0)
    assert loaded.get_nb_trainable_parameters()[0] == 0


def test_merge_and_unload(pair):
    theirs, ours, ids, _ = copy.deepcopy(pair)
    expected = _logits(ours, ids)
    merged = ours.merge_and_unload()
    assert not any(isinstance(m, IA3Linear) for m in merged.modules())
    torch.testing.assert_close(_logits(merged, ids), expected, atol=1e-4, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        their_merged = theirs.merge_and_unload()
    torch.testing.assert_close(_logits(merged, ids), _logits(their_merged, ids), atol=1e-4, rtol=0)
    assert set(merged.state_dict()) == set(their_merged.state_dict())


# -- behaviour of our own ----------------------------------------------------------------------


def test_default_init_is_a_no_op_and_feedforward_scales_inputs():
    ids = torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(1))
    base = make_tiny_llama()
    expected = _logits(base, ids)
    model = get_peft_model(base, ia3())
    assert torch.equal(_logits(model, ids), expected)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, IA3Linear)}
    assert len(layers) == 6 and {n.rsplit(".", 1)[-1] for n in layers} == {"k_proj", "v_proj", "down_proj"}
    for name, layer in layers.items():
        expected_shape = (1, 64) if name.endswith("down_proj") else (layer.out_features, 1)
        assert tuple(layer.ia3_l["default"].shape) == expected_shape
        assert layer.is_feedforward["default"] == name.endswith("down_proj")


@pytest.mark.parametrize(
    ("kwargs", "extra"),
    [
        (dict(target_modules=["q_proj", "down_proj"], feedforward_modules=["up_proj"]), "['up_proj']"),
        (dict(target_modules=["k_proj"], feedforward_modules=["down_proj", "w2"]), "['down_proj', 'w2']"),
    ],
)
def test_feedforward_must_be_subset_of_targets(kwargs, extra):
    with pytest.raises(ValueError, match="feedforward_modules must be a subset of target_modules") as err:
        ia3(**kwargs)
    assert extra in str(err.value)
    with pytest.raises(ConfigError, match="subset"):  # also when read from a file
        peftkit.PeftConfig.from_dict({"peft_type": "IA3", **kwargs})
    with pytest.raises(ValueError, match="subset"):  # PEFT refuses the same configs
        peft.IA3Config(**kwargs)


def test_unknown_architecture_needs_feedforward_modules():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

    with pytest.raises(TargetModulesError, match="feedforward_modules is not set"):
        get_peft_model(Tiny(), IA3Config(target_modules=["fc"]))
    model = get_peft_model(Tiny(), IA3Config(target_modules=["fc"], feedforward_modules=["fc"]))
    assert model.base_model.model.fc.is_feedforward == {"default": True}


def test_saved_config_has_peft_keys_and_resolves_defaults(tmp_path):
    model = get_peft_model(
        make_tiny_llama(), ia3(target_modules=["k_proj", "down_proj"], layers_to_transform=[0])
    )
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    their_keys = set(peft.IA3Config(task_type="CAUSAL_LM").to_dict()) - {"peft_version"}
    assert set(saved) == their_keys
    assert saved["target_modules"] == ["model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"]
    assert saved["feedforward_modules"] == ["model.layers.0.mlp.down_proj"]
    loaded = peftkit.PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    assert sorted(n for n, _ in loaded.base_model.adapter_modules()) == sorted(
        f"model.{n}" for n in saved["target_modules"]
    )


def test_training_step_changes_only_ia3_vectors_and_lowers_loss():
    ids = torch.randint(0, 400, (4, 12), generator=torch.Generator().manual_seed(2))
    model = get_peft_model(make_tiny_llama(), ia3())
    model.train()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.endswith(".ia3_l.default") for n in names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == names


def test_nb_trainable_parameters_on_meta_device():
    config = dict(
        target_modules=["q_proj", "up_proj", "down_proj"],
        feedforward_modules=["down_proj"],
        modules_to_save=["lm_head"],
    )
    real = get_peft_model(make_tiny_llama(), ia3(**config))
    with torch.device("meta"):
        meta_base = make_tiny_llama()
    meta = get_peft_model(meta_base, ia3(**config))
    assert next(meta.parameters()).device.type == "meta"
    assert meta.get_nb_trainable_parameters() == real.get_nb_trainable_parameters()


def test_registered_and_exported():
    spec = get_method("IA3")
    assert spec.name == "ia3" and spec.config_cls is IA3Config and spec.peft_type == "IA3"
    assert isinstance(peftkit.PeftConfig.from_dict({"peft_type": "IA3"}), IA3Config)


def test_short_training_run_with_ia3(tiny_model_dir, tmp_path):
    section = {"target_modules": "all-linear", "feedforward_modules": ["down_proj", "up_proj", "gate_proj"]}
    losses = train_tiny(
        tiny_model_dir,
        tmp_path / "out",
        "ia3",
        section,
        max_steps=20,
        learning_rate=5e-2,
        warmup_steps=1,
        group_by_length=False,
    )
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    saved = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    assert saved and all(k.endswith(".ia3_l") for k in saved)
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3"
