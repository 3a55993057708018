"""Adapter methods against Hugging Face PEFT as the oracle, in one method × config matrix.

Each case builds the same tiny Llama twice, wraps one with ``peft`` and one with ``peftkit`` from
the same config (random adapter weights, ``init_weights=False``), copies PEFT's weights into ours
and checks the four things every PEFT-compatible method must get right:

    counts + names + state-dict keys   same logits (≤ 1e-5, fp32)
    files load both ways               merge_and_unload equals the unmerged model (≤ 1e-4)

Method-specific behaviour (init, config errors, training) stays in ``test_<method>.py``. LoRA and
IA3 have their own, older matrix in ``test_peft_parity.py``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from conftest import make_tiny_llama

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-5
IDS = torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(0))
QV = ["q_proj", "v_proj"]


@contextlib.contextmanager
def boft_oracle(kwargs: dict[str, Any]) -> Iterator[None]:
    """Make PEFT's BOFT compute what its CUDA extension computes, on CPU.

    Without the extension PEFT silently drops ``boft_n_butterfly_factor`` to 1. Its extension only
    builds block-diagonal matrices, (N, D, H, H) -> (N, D·H, D·H); standing in for it with
    ``torch.block_diag`` lets PEFT's own permutation and product code run with several factors.
    For one factor PEFT's plain CPU path runs (and no compilation is attempted).
    """
    import peft.tuners.boft.layer as boft_layer

    def block_diagonal(blocks: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*level) for level in blocks])]

    extension = types.SimpleNamespace(forward=block_diagonal)
    butterfly = kwargs.get("boft_n_butterfly_factor", 1) > 1
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(boft_layer, "get_fbd_cuda", lambda: extension if butterfly else None)
        yield


@dataclass
class Method:
    """One method's entry: config classes, its cases and how to run PEFT for a case."""

    ours: Callable[..., peftkit.PeftConfig]
    peft_name: str
    # case name -> (config kwargs, tiny-Llama overrides); the tiny Llama's layers take 32 or 64 inputs
    cases: dict[str, tuple[dict[str, Any], dict[str, Any]]]
    oracle: Callable[[dict[str, Any]], contextlib.AbstractContextManager] = field(
        default=lambda kwargs: contextlib.nullcontext()
    )


LYCORIS_CASES = {
    "qv": (dict(target_modules=QV), {}),
    "default-targets": (dict(target_modules=None), {}),
    "all-linear-r4-a16": (dict(target_modules="all-linear", r=4, alpha=16), {}),
    "exclude": (dict(target_modules="all-linear", exclude_modules=["k_proj", "up_proj"], r=2), {}),
    "patterns": (
        dict(
            target_modules=["q_proj", "v_proj", "up_proj"],
            rank_pattern={"q_proj": 2},
            alpha_pattern={"v_proj": 32},
        ),
        {},
    ),
    "layers": (dict(target_modules=QV, layers_to_transform=[1], layers_pattern="layers"), {}),
    "modules-to-save": (dict(target_modules=QV, r=2, modules_to_save=["lm_head"]), {}),
}
LOKR_CASES = {
    "decompose-both": (dict(target_modules="all-linear", r=1, decompose_both=True), {}),
    "decompose-factor": (dict(target_modules=["q_proj", "down_proj"], r=2, decompose_factor=4), {}),
}
OFT_CASES = {
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
BOFT_CASES = {
    "qv-block4": (dict(target_modules=QV, boft_block_size=4), {}),
    "default-targets": (dict(target_modules=None, boft_block_size=8), {}),
    "all-linear-block-num": (dict(target_modules="all-linear", boft_block_size=0, boft_block_num=4), {}),
    "butterfly-2": (dict(target_modules="all-linear", boft_block_size=4, boft_n_butterfly_factor=2), {}),
    "butterfly-3-block-num": (
        dict(target_modules="all-linear", boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=3),
        {},
    ),
    "butterfly-4-block2": (dict(target_modules=QV, boft_block_size=2, boft_n_butterfly_factor=4), {}),
    "dropout-eval": (dict(target_modules=QV, boft_block_size=4, boft_dropout=0.5), {}),
    "exclude": (
        dict(target_modules="all-linear", exclude_modules=["k_proj", "up_proj"], boft_block_size=8),
        {},
    ),
    "layers": (
        dict(target_modules=QV, boft_block_size=4, layers_to_transform=[1], layers_pattern="layers"),
        {},
    ),
    "modules-to-save": (dict(target_modules=QV, boft_block_size=4, modules_to_save=["lm_head"]), {}),
    "bias-boft-only-butterfly": (
        dict(target_modules=QV, boft_block_size=4, boft_n_butterfly_factor=2, bias="boft_only"),
        {"attention_bias": True},
    ),
    "bias-all": (dict(target_modules=["q_proj"], boft_block_size=8, bias="all"), {"attention_bias": True}),
}

METHODS = {
    "loha": Method(peftkit.LoHaConfig, "LoHaConfig", LYCORIS_CASES),
    "lokr": Method(peftkit.LoKrConfig, "LoKrConfig", {**LYCORIS_CASES, **LOKR_CASES}),
    "oft": Method(peftkit.OFTConfig, "OFTConfig", OFT_CASES),
    "boft": Method(peftkit.BOFTConfig, "BOFTConfig", BOFT_CASES, oracle=boft_oracle),
}
CASES = [(method, name) for method, spec in METHODS.items() for name in spec.cases]


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{name}" for m, name in CASES])
def pair(request):
    """(tiny-Llama overrides, peft model, peftkit model) with identical, non-trivial weights; eval mode.

    PEFT's oracle context (if the method has one) stays active while the case's tests run.
    """
    method, name = request.param
    spec = METHODS[method]
    kwargs, model_kwargs = spec.cases[name]
    kwargs = {"task_type": "CAUSAL_LM", "init_weights": False, **kwargs}
    with spec.oracle(kwargs):
        base = make_tiny_llama(**model_kwargs)
        ours_base = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.get_peft_model(base, getattr(peft, spec.peft_name)(**kwargs))
            ours = peftkit.get_peft_model(ours_base, spec.ours(**kwargs))
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # modules_to_save copies and trained biases start at the base: move them too
            for param in theirs.parameters():
                if param.requires_grad:
                    param.add_(torch.randn(param.shape, generator=gen) * 0.05)
        ours.load_state_dict(theirs.state_dict())  # strict: the state-dict layouts are identical
        yield model_kwargs, theirs.eval(), ours.eval()


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
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=ATOL, rtol=0)


def test_files_load_both_ways(pair, tmp_path):
    model_kwargs, theirs, ours = pair
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "theirs")
        in_peft = peft.PeftModel.from_pretrained(make_tiny_llama(**model_kwargs), tmp_path / "ours")
        in_ours = peftkit.PeftModel.from_pretrained(make_tiny_llama(**model_kwargs), tmp_path / "theirs")
    expected = _logits(theirs)
    torch.testing.assert_close(_logits(in_peft), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(_logits(in_ours), expected, atol=ATOL, rtol=0)
    our_keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert our_keys == set(load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    our_json = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    their_json = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert set(our_json) == set(their_json) - {"peft_version"}


def test_merge_and_unload_equals_unmerged(pair):
    _, theirs, ours = copy.deepcopy(pair)
    unmerged = _logits(ours)
    merged = ours.merge_and_unload()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        their_merged = theirs.merge_and_unload()
    torch.testing.assert_close(_logits(merged), unmerged, atol=1e-4, rtol=0)
    torch.testing.assert_close(_logits(their_merged), unmerged, atol=1e-4, rtol=0)
    assert set(merged.state_dict()) == set(their_merged.state_dict())
