"""OFT against Hugging Face PEFT, in one config matrix on a tiny Llama.

Each case builds the same tiny Llama twice, wraps one with ``peft`` and one with ``peftkit``
from the same config (random rotations, ``init_weights=False``), copies PEFT's weights into ours
and compares parameter counts, logits, files in both directions and merging.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from _tiny_models import make_tiny_gpt2
from conftest import make_tiny_llama, train_tiny
from peftkit.errors import TargetModulesError
from peftkit.methods.oft.layer import nearest_divisor

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-5
QV = ["q_proj", "v_proj"]
# (config kwargs, tiny-Llama overrides); the tiny Llama's layers take 32 or 64 input features.
CASES = {
    "qv-block8": (dict(target_modules=QV, oft_block_size=8), {}),
    "default-targets": (dict(target_modules=None, oft_block_size=16), {}),
    "all-linear-r4": (dict(target_modules="all-linear", r=4, oft_block_size=0), {}),
    "exact-cayley": (dict(target_modules="all-linear", oft_block_size=8, use_cayley_neumann=False), {}),
    "neumann-3-terms": (dict(target_modules=QV, oft_block_size=8, num_cayley_neumann_terms=3), {}),
    "block-share": (dict(target_modules="all-linear", oft_block_size=8, block_share=True), {}),
    "coft": (dict(target_modules=QV, oft_block_size=8, coft=True, eps=0.5), {}),
    "adjusted-block-size": (dict(target_modules=["q_proj", "down_proj"], oft_block_size=12), {}),
    "exclude": (
        dict(target_modules="all-linear", exclude_modules=["k_proj", "up_proj"], oft_block_size=4),
        {},
    ),
    "layers": (
        dict(target_modules=QV, oft_block_size=8, layers_to_transform=[1], layers_pattern="layers"),
        {},
    ),
    "modules-to-save": (dict(target_modules=QV, oft_block_size=8, modules_to_save=["lm_head"]), {}),
    "bias-oft-only": (dict(target_modules=QV, oft_block_size=8, bias="oft_only"), {"attention_bias": True}),
    "bias-all": (dict(target_modules=["q_proj"], oft_block_size=8, bias="all"), {"attention_bias": True}),
}


def configs(**kwargs):
    """(peftkit config, PEFT config) built from the same arguments."""
    kwargs = {"task_type": "CAUSAL_LM", **kwargs}
    return peftkit.OFTConfig(**kwargs), peft.OFTConfig(**kwargs)


def build(model_kwargs=None, **kwargs):
    """(peft model, peftkit model) on identical tiny Llamas."""
    base = make_tiny_llama(**(model_kwargs or {}))
    ours_base = copy.deepcopy(base)
    ours_config, their_config = configs(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base, their_config)
        ours = peftkit.get_peft_model(ours_base, ours_config)
    return theirs, ours


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def pair(request):
    """(model overrides, peft model, peftkit model) with identical, non-trivial weights; eval mode."""
    kwargs, model_kwargs = CASES[request.param]
    theirs, ours = build(model_kwargs, init_weights=False, **kwargs)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # modules_to_save copies and trained biases start at the base: move them too
        for param in theirs.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    ours.load_state_dict(theirs.state_dict())  # strict: the state-dict layouts are identical
    return model_kwargs, theirs.eval(), ours.eval()


def test_same_parameter_counts_and_keys(pair):
    _, theirs, ours = pair
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }
    assert set(ours.state_dict()) == set(theirs.state_dict())
    expected = peft.get_peft_model_state_dict(theirs)
    got = peftkit.get_peft_model_state_dict(ours)
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_same_logits(pair):
    _, theirs, ours = pair
    torch.testing.assert_close(_logits(ours, IDS), _logits(theirs, IDS), atol=ATOL, rtol=0)


def test_files_load_both_ways(pair, tmp_path):
    model_kwargs, theirs, ours = pair
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "theirs")
        in_peft = peft.PeftModel.from_pretrained(make_tiny_llama(**model_kwargs), tmp_path / "ours")
        in_ours = peftkit.PeftModel.from_pretrained(make_tiny_llama(**model_kwargs), tmp_path / "theirs")
    expected = _logits(theirs, IDS)
    torch.testing.assert_close(_logits(in_peft, IDS), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(_logits(in_ours, IDS), expected, atol=ATOL, rtol=0)
    our_keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert our_keys == set(load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    our_json = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    their_json = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert set(our_json) == set(their_json) - {"peft_version"}


def test_merge_and_unload_equals_unmerged(pair):
    _, theirs, ours = copy.deepcopy(pair)
    unmerged = _logits(ours, IDS)
    merged = ours.merge_and_unload()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        their_merged = theirs.merge_and_unload()
    torch.testing.assert_close(_logits(merged, IDS), unmerged, atol=1e-4, rtol=0)
    torch.testing.assert_close(_logits(their_merged, IDS), unmerged, atol=1e-4, rtol=0)
    assert set(merged.state_dict()) == set(their_merged.state_dict())


@pytest.mark.parametrize(
    "extra",
    [{}, {"use_cayley_neumann": False}, {"block_share": True}, {"r": 2, "oft_block_size": 0}],
    ids=["neumann", "cayley", "block-share", "r2"],
)
def test_default_init_leaves_logits_unchanged(extra):
    config, _ = configs(target_modules="all-linear", **{"oft_block_size": 8, **extra})
    base = make_tiny_llama()
    expected = _logits(base, IDS)
    model = peftkit.get_peft_model(base, config)
    torch.testing.assert_close(_logits(model, IDS), expected, atol=1e-6, rtol=0)
    assert model.get_nb_trainable_parameters()[0] > 0


def test_training_step_changes_only_adapter_and_lowers_loss():
    config, _ = configs(target_modules="all-linear", oft_block_size=8)
    model = peftkit.get_peft_model(make_tiny_llama(), config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param)
        assert changed == param.requires_grad, name
        assert param.requires_grad == (".oft_R." in name), name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=8), r"set only one of r \(8\) and oft_block_size \(32\).*oft_block_size: 0"),
        (dict(r=0, oft_block_size=0), "either r or oft_block_size must be non-zero"),
        (dict(r=4, oft_block_size=16), "set only one of r"),
    ],
)
def test_r_and_block_size_are_exclusive_as_in_peft(kwargs, message):
    with pytest.raises(ValueError, match=message):
        peftkit.OFTConfig(**kwargs)
    with pytest.raises(ValueError):  # PEFT refuses the same combinations
        peft.OFTConfig(**kwargs)


def test_bad_config_says_what_to_change():
    with pytest.raises(ValueError, match="r must be a non-negative integer"):
        peftkit.OFTConfig(r=-2, oft_block_size=0)
    with pytest.raises(ValueError, match="oft_block_size must be a non-negative integer"):
        peftkit.OFTConfig(oft_block_size=4.5)
    with pytest.raises(ValueError, match="bias must be"):
        peftkit.OFTConfig(bias="lora_only")
    with pytest.raises(ValueError, match="num_cayley_neumann_terms"):
        peftkit.OFTConfig(num_cayley_neumann_terms=0)
    config = peftkit.OFTConfig(target_modules=["c_attn"])
    with pytest.raises(TargetModulesError, match="cannot adapt.*Conv1D"):  # PEFT refuses Conv1D too
        peftkit.get_peft_model(make_tiny_gpt2(), config)


def test_block_size_that_does_not_divide_is_adjusted_like_peft():
    assert [nearest_divisor(32, s) for s in (12, 7, 40, 5)] == [8, 8, 32, 4]
    config, _ = configs(target_modules=["q_proj"], oft_block_size=12)
    with pytest.warns(UserWarning, match="oft_block_size=12 does not divide in_features=32; using 8"):
        model = peftkit.get_peft_model(make_tiny_llama(), config)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert (layer.r["default"], layer.oft_block_size["default"]) == (4, 8)


def test_rotations_are_orthogonal():
    config, _ = configs(target_modules=["q_proj"], oft_block_size=8, init_weights=False)
    config_exact, _ = configs(
        target_modules=["q_proj"], oft_block_size=8, init_weights=False, use_cayley_neumann=False
    )
    for cfg, atol in ((config, 1e-1), (config_exact, 1e-5)):  # Neumann: only approximately
        layer = (
            peftkit.get_peft_model(make_tiny_llama(), cfg).base_model.model.model.layers[0].self_attn.q_proj
        )
        rotation = layer.oft_R["default"].matrix().detach()
        torch.testing.assert_close(rotation @ rotation.T, torch.eye(32), atol=atol, rtol=0)


def test_training_run_lowers_loss(tiny_model_dir, tmp_path):
    section = {"oft_block_size": 8, "target_modules": "all-linear"}
    losses = train_tiny(tiny_model_dir, tmp_path / "out", "oft", section, learning_rate=2e-2, warmup_steps=1)
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "OFT"
