"""LoHa and LoKr (the LyCORIS methods): what is specific to them.

Parity with Hugging Face PEFT (counts, logits, files both ways, merging) over a config matrix is
in ``test_peft_oracle_methods.py``; here: init, training, config errors.
"""

from __future__ import annotations

import json

import pytest
import torch

import peftkit
from _tiny_models import make_tiny_gpt2
from conftest import make_tiny_llama, train_tiny
from peftkit.errors import TargetModulesError

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-5
CONFIGS = {"loha": (peftkit.LoHaConfig, "LoHaConfig"), "lokr": (peftkit.LoKrConfig, "LoKrConfig")}


def configs(method: str, **kwargs):
    """(peftkit config, PEFT config) built from the same arguments."""
    ours_cls, peft_name = CONFIGS[method]
    kwargs = {"task_type": "CAUSAL_LM", **kwargs}
    return ours_cls(**kwargs), getattr(peft, peft_name)(**kwargs)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(0))


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
