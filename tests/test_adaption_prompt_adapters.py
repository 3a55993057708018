"""LLaMA-Adapter with several adapters, against PEFT: counts, parameter names, trainable names and
state_dict keys after adding, switching and deleting; files written for every adapter; and the one
deliberate difference (inactive adapters stay in ``state_dict()``, see docs/methods/llama-adapter.md).

PEFT keeps the inactive adapters' wrappers outside the module tree (``_cached_adapters``): they
count nowhere and are not in ``state_dict()``. peftkit keeps them outside the tree too, but shows
them in ``state_dict()`` under ``base_model.cached_adapters.<name>.<i>.*``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import peftkit
from peftkit.methods.adaption_prompt import AdaptionPromptConfig
from peftkit.serialization import WEIGHTS_NAME, load_adapter_weights
from test_adaption_prompt import BUILDERS, KWARGS, logits, ours, randomize, theirs, trainable

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("single_thread")


def test_several_adapters_switch_save_and_load_like_peft(tmp_path):
    mine, reference = ours("llama", adapter_layers=1), theirs("llama", adapter_layers=1)
    mine.add_adapter("other", AdaptionPromptConfig(**{**KWARGS, "adapter_layers": 2}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.add_adapter("other", peft.AdaptionPromptConfig(**{**KWARGS, "adapter_layers": 2}))
    assert mine.active_adapter == "default"  # adding does not switch
    for seed, name in ((7, "other"), (6, "default")):  # randomize sees the active adapter only
        mine.set_adapter(name)
        randomize(mine, seed=seed)
    for name in ("default", "other"):  # each saved while "default" is active, loaded into PEFT's
        mine.save_pretrained(tmp_path / name, selected_adapters=[name])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference.set_adapter(name)
        folder = tmp_path / name / ("" if name == "default" else name)
        result = reference.load_state_dict(load_adapter_weights(folder), strict=False)
        assert not result.unexpected_keys
    mine.set_adapter("other")  # reference is on "other" too
    assert trainable(mine) == trainable(reference)
    other = logits(mine)
    torch.testing.assert_close(other, logits(reference), atol=1e-5, rtol=0)
    mine.set_adapter("default")
    assert not torch.allclose(logits(mine), other)
    with mine.disable_adapter():
        torch.testing.assert_close(logits(mine), logits(BUILDERS["llama"]()), atol=0, rtol=0)

    # load_adapter fills an inactive adapter, read back after switching to it
    mine.save_pretrained(tmp_path / "all")
    fresh = peftkit.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path / "all")
    fresh.load_adapter(tmp_path / "all" / "other", "other")
    torch.testing.assert_close(logits(fresh), logits(mine), atol=1e-6, rtol=0)
    fresh.set_adapter("other")
    torch.testing.assert_close(logits(fresh), other, atol=1e-6, rtol=0)
    assert (tmp_path / "all" / "other" / WEIGHTS_NAME).is_file()


def two_adapters(arch: str, *, randomized: bool = False):
    """Ours and PEFT's model, each with "default" (1 layer, active) and "other" (2 layers); with
    ``randomized`` both of ours get random weights, copied into PEFT's."""
    mine, reference = ours(arch, adapter_layers=1), theirs(arch, adapter_layers=1)
    mine.add_adapter("other", AdaptionPromptConfig(**{**KWARGS, "adapter_layers": 2}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.add_adapter("other", peft.AdaptionPromptConfig(**{**KWARGS, "adapter_layers": 2}))
        if randomized:
            for seed, name in enumerate(("other", "default")):
                mine.set_adapter(name)
                randomize(mine, seed=10 + seed)
                reference.set_adapter(name)
                reference.load_state_dict(
                    peftkit.get_peft_model_state_dict(mine, adapter_name=name), strict=False
                )
    return mine, reference


def cached_keys(adapter: str, layers: int) -> list[str]:
    """Where our state_dict() shows an inactive adapter's tensors (PEFT's has no such keys)."""
    return sorted(
        f"base_model.cached_adapters.{adapter}.{i}.{p}"
        for i in range(layers)
        for p in ("adaption_prompt", "adaption_gate")
    )


def assert_like_peft(mine, reference, *, cached: list[str]) -> None:
    """Counts, trainable names and state_dict keys equal PEFT's, plus exactly ``cached`` keys."""
    assert mine.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()
    assert sorted(n for n, _ in mine.named_parameters()) == sorted(n for n, _ in reference.named_parameters())
    assert trainable(mine) == trainable(reference)
    keys = set(mine.state_dict())
    assert sorted(k for k in keys if ".cached_adapters." in k) == cached
    assert keys - set(cached) == set(reference.state_dict())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_two_adapters_count_name_and_key_like_peft_when_added_switched_and_deleted(arch):
    mine, reference = two_adapters(arch)
    n_default, n_other = (
        layers * (3 * 32 + 1) for layers in (1, 2)
    )  # layers x (adapter_len x hidden + gate)
    assert reference.get_nb_trainable_parameters()[0] == n_default  # the inactive adapter is not counted
    assert_like_peft(mine, reference, cached=cached_keys("other", 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.set_adapter("other")
    mine.set_adapter("other")
    assert reference.get_nb_trainable_parameters()[0] == n_other
    assert_like_peft(mine, reference, cached=cached_keys("default", 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.delete_adapter("other")  # the active one: the first remaining becomes active
        mine.delete_adapter("other")
    assert mine.active_adapter == "default" == reference.active_adapter
    assert_like_peft(mine, reference, cached=[])
    torch.testing.assert_close(logits(mine), logits(BUILDERS[arch]()), atol=0, rtol=0)  # gate still 0

    mine, reference = two_adapters(arch)
    mine.delete_adapter("other")  # inactive
    reference.delete_adapter("other")
    assert mine.active_adapter == "default" and list(mine.peft_config) == ["default"]
    assert_like_peft(mine, reference, cached=[])
    with pytest.raises(ValueError, match="no adapter named 'other'"):
        mine.delete_adapter("other")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_saving_two_adapters_writes_peft_files_and_each_side_loads_the_other(arch, tmp_path):
    mine, reference = two_adapters(arch, randomized=True)
    assert mine.active_adapter == "default" and reference.active_adapter == "default"
    mine.save_pretrained(tmp_path / "ours")  # every adapter, the inactive one included
    reference.save_pretrained(tmp_path / "theirs")
    assert mine.active_adapter == "default"
    for sub in ("", "other"):
        got, expected = (load_adapter_weights(tmp_path / side / sub) for side in ("ours", "theirs"))
        assert sorted(got) == sorted(expected) and len(got) == (2 if sub == "" else 4)
        assert all(torch.equal(got[k], expected[k]) for k in got)

    outputs = {}
    for name in ("default", "other"):
        mine.set_adapter(name)
        outputs[name] = logits(mine)
    assert not torch.allclose(outputs["default"], outputs["other"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded_theirs = peft.PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "ours")
        loaded_theirs.load_adapter(tmp_path / "ours" / "other", "other")
    loaded_ours = peftkit.PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "theirs")
    loaded_ours.load_adapter(tmp_path / "theirs" / "other", "other")  # loaded while inactive
    for loaded in (loaded_theirs, loaded_ours):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in ("default", "other"):
                loaded.set_adapter(name)
                torch.testing.assert_close(logits(loaded), outputs[name], atol=1e-5, rtol=0)


def test_state_dict_round_trip_keeps_the_inactive_adapter_unlike_peft():
    """The documented difference: PEFT's state_dict() lacks inactive adapters, so a
    load_state_dict(state_dict()) round trip loses them; ours keeps them under cached_adapters."""
    mine, reference = two_adapters("llama", randomized=True)
    mine.set_adapter("other")
    other = logits(mine)
    mine.set_adapter("default")
    fresh, _ = two_adapters("llama")  # other random prompts, closed gates
    assert fresh.load_state_dict(mine.state_dict()) is not None  # strict: every key fits
    fresh.set_adapter("other")
    torch.testing.assert_close(logits(fresh), other, atol=0, rtol=0)

    fresh, _ = two_adapters("llama")
    with pytest.raises(RuntimeError, match="Missing key.*cached_adapters.other.0.adaption_prompt"):
        fresh.load_state_dict(reference.state_dict())  # PEFT's has no inactive adapter
    result = fresh.load_state_dict(reference.state_dict(), strict=False)
    assert sorted(result.missing_keys) == cached_keys("other", 2) and not result.unexpected_keys
    extra = {"base_model.cached_adapters.nope.0.adaption_prompt": torch.zeros(1, 3, 32)}
    result = fresh.load_state_dict({**mine.state_dict(), **extra}, strict=False)
    assert not result.missing_keys and result.unexpected_keys == list(extra)  # reported, like torch
    with pytest.raises(RuntimeError, match="Unexpected key.*cached_adapters.nope"):
        fresh.load_state_dict({**mine.state_dict(), **extra})
    wrong = {**mine.state_dict(), "base_model.cached_adapters.other.0.adaption_gate": torch.zeros(2)}
    with pytest.raises(
        RuntimeError, match="size mismatch for base_model.cached_adapters.other.0.adaption_gate"
    ):
        fresh.load_state_dict(wrong)


def test_inactive_adapters_follow_to_and_stay_out_of_parameters():
    model = ours("llama")
    model.add_adapter("other", AdaptionPromptConfig(**KWARGS))
    assert not any("other" in n or "cached" in n for n, _ in model.named_parameters())
    model.to(torch.float64)
    assert {t.dtype for t in model.state_dict().values()} == {torch.float64}
    model.set_adapter("other")
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    model.train()
    model.set_adapter("default")  # parked while in eval mode, installed in train mode
    assert all(m.training for m in model.modules())
    copied = copy.deepcopy(model)
    assert sorted(copied.state_dict()) == sorted(model.state_dict())
