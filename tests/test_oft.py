"""OFT: what is specific to it (init, training, block sizes, config errors).

Parity with Hugging Face PEFT (counts, logits, files both ways, merging) over a config matrix is
in ``test_peft_oracle_methods.py``.
"""

from __future__ import annotations

import json

import pytest
import torch

import peftkit
from _tiny_models import make_tiny_gpt2
from conftest import make_tiny_llama, train_tiny
from peftkit.errors import TargetModulesError
from peftkit.methods.oft.layer import nearest_divisor

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("single_thread")


def configs(**kwargs):
    """(peftkit config, PEFT config) built from the same arguments."""
    kwargs = {"task_type": "CAUSAL_LM", **kwargs}
    return peftkit.OFTConfig(**kwargs), peft.OFTConfig(**kwargs)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(0))


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
