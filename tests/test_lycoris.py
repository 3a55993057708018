"""LoHa and LoKr (the LyCORIS methods) against Hugging Face PEFT, in one method × config matrix.

Each case builds the same tiny Llama twice, wraps one with ``peft`` and one with ``peftkit``
from the same config (random factors, ``init_weights=False``), copies PEFT's weights into ours
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

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-5
CONFIGS = {"loha": (peftkit.LoHaConfig, "LoHaConfig"), "lokr": (peftkit.LoKrConfig, "LoKrConfig")}

QV = ["q_proj", "v_proj"]
SHARED_CASES = {
    "qv": dict(target_modules=QV),
    "default-targets": dict(target_modules=None),
    "all-linear-r4-a16": dict(target_modules="all-linear", r=4, alpha=16),
    "exclude": dict(target_modules="all-linear", exclude_modules=["k_proj", "up_proj"], r=2),
    "patterns": dict(
        target_modules=["q_proj", "v_proj", "up_proj"],
        rank_pattern={"q_proj": 2},
        alpha_pattern={"v_proj": 32},
    ),
    "layers": dict(target_modules=QV, layers_to_transform=[1], layers_pattern="layers"),
    "modules-to-save": dict(target_modules=QV, r=2, modules_to_save=["lm_head"]),
}
LOKR_CASES = {
    "decompose-both": dict(target_modules="all-linear", r=1, decompose_both=True),
    "decompose-factor": dict(target_modules=["q_proj", "down_proj"], r=2, decompose_factor=4),
}
CASES = [(m, name, kw) for m in CONFIGS for name, kw in SHARED_CASES.items()]
CASES += [("lokr", name, kw) for name, kw in LOKR_CASES.items()]


def configs(method: str, **kwargs):
    """(peftkit config, PEFT config) built from the same arguments."""
    ours_cls, peft_name = CONFIGS[method]
    kwargs = {"task_type": "CAUSAL_LM", **kwargs}
    return ours_cls(**kwargs), getattr(peft, peft_name)(**kwargs)


def build(method: str, **kwargs):
    """(peft model, peftkit model) on identical tiny Llamas."""
    base = make_tiny_llama()
    ours_base = copy.deepcopy(base)
    ours_config, their_config = configs(method, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base, their_config)
    return theirs, peftkit.get_peft_model(ours_base, ours_config)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{name}" for m, name, _ in CASES])
def pair(request):
    """(method, peft model, peftkit model) with identical, non-trivial weights; eval mode."""
    method, _, kwargs = request.param
    theirs, ours = build(method, init_weights=False, **kwargs)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # modules_to_save copies start equal to the base: move them too
        for param in theirs.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    ours.load_state_dict(theirs.state_dict())  # strict: the state-dict layouts are identical
    return method, theirs.eval(), ours.eval()


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
    _, theirs, ours = pair
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "theirs")
        in_peft = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "ours")
    in_ours = peftkit.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "theirs")
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
    assert set(merged.state_dict()) == set(their_merged.state_dict())


@pytest.mark.parametrize(
    "method, extra",
    [
        ("loha", {}),
        ("lokr", {"decompose_both": True}),  # r=1: both sides are rank-1 products
        ("lokr", {"init_weights": "lycoris"}),
        ("lokr", {"init_weights": "lycoris", "decompose_both": True}),
    ],
)
def test_default_init_leaves_logits_unchanged(method, extra):
    config, _ = configs(method, target_modules="all-linear", r=1, **extra)
    base = make_tiny_llama()
    expected = _logits(base, IDS)
    model = peftkit.get_peft_model(base, config)
    torch.testing.assert_close(_logits(model, IDS), expected, atol=0, rtol=0)
    assert any(p.abs().sum() > 0 for p in model.parameters() if p.requires_grad)  # not all-zero


@pytest.mark.parametrize("method", list(CONFIGS))
def test_training_step_changes_only_adapter_and_lowers_loss(method):
    config, _ = configs(method, target_modules="all-linear", r=4, rank_dropout=0.1, module_dropout=0.1)
    model = peftkit.get_peft_model(make_tiny_llama(), config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    torch.manual_seed(0)
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
        assert param.requires_grad == (".hada_" in name or ".lokr_" in name), name


@pytest.mark.parametrize("method", list(CONFIGS))
def test_bad_config_says_what_to_change(method):
    with pytest.raises(ValueError, match="r must be a positive integer"):
        configs(method, r=0)
    with pytest.raises(ValueError, match="rank_dropout must be a probability"):
        CONFIGS[method][0](rank_dropout=1.5)
    with pytest.raises(ValueError, match=r"rank_pattern\['q_proj'\]"):
        CONFIGS[method][0](rank_pattern={"q_proj": 0})
    config = CONFIGS[method][0](target_modules=["c_attn"])
    with pytest.raises(TargetModulesError, match="cannot adapt.*Conv1D"):  # PEFT refuses Conv1D too
        peftkit.get_peft_model(make_tiny_gpt2(), config)


def test_lokr_config_checks_its_own_fields():
    with pytest.raises(ValueError, match="decompose_factor"):
        peftkit.LoKrConfig(decompose_factor=0)
    with pytest.raises(ValueError, match="init_weights"):
        peftkit.LoHaConfig(init_weights="lycoris")


@pytest.mark.parametrize(
    "method, section",
    [
        ("loha", {"r": 4, "alpha": 8, "target_modules": "all-linear"}),
        ("lokr", {"r": 4, "alpha": 8, "target_modules": "all-linear", "init_weights": "lycoris"}),
    ],
)
def test_training_run_lowers_loss(method, section, tiny_model_dir, tmp_path):
    losses = train_tiny(tiny_model_dir, tmp_path / "out", method, section, warmup_steps=1)
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == method.upper()
