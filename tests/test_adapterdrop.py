"""AdapterDrop (Rueckle et al. 2021) on bottleneck adapters, against the paper's definition.

specialized:  drop_lowest_layers=k                     layers 0..k-1 carry no adapter, in training
                                                       and inference (so they are not created)
robust:       drop_lowest_layers=k, drop_random=True   each training pass skips the adapters of
                                                       layers 0..n-1, n ~ U{0..k}; inference skips none
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from _tiny_models import tiny_mlp_case
from conftest import make_tiny_llama, train_tiny
from peftkit import BottleneckConfig, PeftModel, get_peft_model
from peftkit.errors import TargetModulesError
from peftkit.methods.adapters import BottleneckLayer

pytestmark = pytest.mark.usefixtures("single_thread")

N_LAYERS, HIDDEN, WIDTH = 4, 32, 4
IDS = torch.randint(3, 400, (2, 7), generator=torch.Generator().manual_seed(1))


def _llama() -> nn.Module:
    return make_tiny_llama(num_hidden_layers=N_LAYERS)


def _layers(model: nn.Module) -> dict[str, BottleneckLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BottleneckLayer)}


def _block_outputs(model: nn.Module) -> list[torch.Tensor]:
    """The hidden states leaving each decoder layer."""
    blocks = model.get_submodule("model.layers")
    seen: list[torch.Tensor] = []
    hooks = [
        b.register_forward_hook(lambda _, __, out: seen.append(out[0] if isinstance(out, tuple) else out))
        for b in blocks
    ]
    with torch.no_grad():
        model(input_ids=IDS)
    for hook in hooks:
        hook.remove()
    return seen


def _copy_adapters(source: nn.Module, target: nn.Module) -> None:
    """Copy every adapter tensor of ``source`` into the same-named one of ``target``."""
    theirs = dict(target.named_parameters())
    with torch.no_grad():
        for name, param in source.named_parameters():
            if ".adapter_" in name:
                theirs[name].copy_(param)


def test_lowest_layers_carry_no_adapter_and_compute_the_base_model():
    base_blocks = _block_outputs(_llama())
    model = get_peft_model(
        _llama(), BottleneckConfig(bottleneck_size=WIDTH, init="random", drop_lowest_layers=2)
    )
    layers = _layers(model)
    indices = sorted({int(re.search(r"layers\.(\d+)\.", n)[1]) for n in layers})
    assert indices == [2, 3]
    assert all(m.layer_index in (2, 3) for m in layers.values())
    blocks = _block_outputs(model.get_base_model())
    for i in (0, 1):
        assert torch.equal(blocks[i], base_blocks[i]), i  # untouched, bit for bit
    for i in (2, 3):
        assert not torch.allclose(blocks[i], base_blocks[i]), i


def test_remaining_layers_behave_as_adapters_placed_there_directly():
    """Dropping the lowest k equals placing the adapters in layers k.. only (same weights, same logits)."""
    dropped = get_peft_model(
        _llama(), BottleneckConfig(bottleneck_size=WIDTH, init="random", drop_lowest_layers=1)
    )
    placed = get_peft_model(_llama(), BottleneckConfig(bottleneck_size=WIDTH, layers_to_transform=[1, 2, 3]))
    assert sorted(_layers(dropped)) == sorted(_layers(placed))
    _copy_adapters(dropped, placed)
    with torch.no_grad():
        torch.testing.assert_close(
            dropped(input_ids=IDS).logits, placed(input_ids=IDS).logits, atol=0, rtol=0
        )


@pytest.mark.parametrize(("adapter_type", "per_layer"), [("houlsby", 2), ("pfeiffer", 1)])
@pytest.mark.parametrize("drop", [0, 1, 3])
def test_parameter_count_is_hand_computed(adapter_type, per_layer, drop):
    model = get_peft_model(
        _llama(), BottleneckConfig(adapter_type=adapter_type, bottleneck_size=WIDTH, drop_lowest_layers=drop)
    )
    per_adapter = HIDDEN * WIDTH + WIDTH + WIDTH * HIDDEN + HIDDEN  # down (W, b) + up (W, b)
    assert model.get_nb_trainable_parameters()[0] == (N_LAYERS - drop) * per_layer * per_adapter


def test_save_and_load_round_trip(tmp_path):
    model = get_peft_model(
        _llama(), BottleneckConfig(bottleneck_size=WIDTH, init="random", drop_lowest_layers=3)
    )
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["drop_lowest_layers"] == 3 and saved["drop_random"] is False
    loaded = PeftModel.from_pretrained(_llama(), tmp_path)
    assert sorted(_layers(loaded)) == sorted(_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, expected, atol=0, rtol=0)


def _adapters_used(model: nn.Module, **inputs) -> set[int]:
    """The layer numbers whose adapter ran in one forward pass."""
    used: set[int] = set()
    hooks = [
        m.adapter_down["default"].register_forward_hook(lambda *_, i=m.layer_index: used.add(i))
        for m in _layers(model).values()
    ]
    model(input_ids=IDS, **inputs)
    for hook in hooks:
        hook.remove()
    return used


def test_robust_variant_skips_a_random_lowest_range_in_training_only(tmp_path):
    config = BottleneckConfig(bottleneck_size=WIDTH, init="random", drop_lowest_layers=3, drop_random=True)
    model = get_peft_model(_llama(), config)
    assert {m.layer_index for m in _layers(model).values()} == set(range(N_LAYERS))  # all created
    reference = get_peft_model(_llama(), BottleneckConfig(bottleneck_size=WIDTH))
    _copy_adapters(model, reference)

    model.train()
    torch.manual_seed(0)
    skipped = []
    for _ in range(40):
        used = _adapters_used(model)
        n = min(used)
        assert used == set(range(n, N_LAYERS))  # always a lowest range, never all of them
        skipped.append(n)
    assert set(skipped) == {0, 1, 2, 3}  # n ~ U{0..3}

    model.eval()  # inference: every adapter, deterministically, as without AdapterDrop
    with torch.no_grad():
        first = model(input_ids=IDS).logits
        for _ in range(3):
            assert _adapters_used(model) == set(range(N_LAYERS))
            assert torch.equal(model(input_ids=IDS).logits, first)
        torch.testing.assert_close(first, reference(input_ids=IDS).logits, atol=0, rtol=0)

    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["drop_random"] is True
    loaded = PeftModel.from_pretrained(_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, first, atol=0, rtol=0)


def test_robust_variant_draws_in_the_training_loss_fast_path(tiny_model_dir, tmp_path):
    section = {"bottleneck_size": 8, "drop_lowest_layers": 1, "drop_random": True}
    losses = train_tiny(tiny_model_dir, tmp_path / "out", "bottleneck", section)
    assert losses[-1] < 0.7 * losses[0], losses
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert saved["drop_lowest_layers"] == 1 and saved["drop_random"] is True


def test_body_hidden_states_draws_too():
    model = get_peft_model(
        _llama(),
        BottleneckConfig(bottleneck_size=WIDTH, init="random", drop_lowest_layers=3, drop_random=True),
    )
    model.train()
    torch.manual_seed(1)
    body = model.get_base_model().model
    seen = set()
    for _ in range(20):
        model.base_model.body_hidden_states(body, IDS, torch.ones_like(IDS))
        seen.add(next(iter(_layers(model).values())).skip_below)
    assert seen == {0, 1, 2, 3}


def test_clear_errors():
    with pytest.raises(ValueError, match="drop_random needs drop_lowest_layers >= 1"):
        BottleneckConfig(drop_random=True)
    with pytest.raises(ValueError, match="drop_lowest_layers must be a non-negative integer"):
        BottleneckConfig(drop_lowest_layers=-1)
    with pytest.raises(TargetModulesError, match="above the 4 dropped by drop_lowest_layers"):
        get_peft_model(_llama(), BottleneckConfig(drop_lowest_layers=4))
    with pytest.raises(TargetModulesError, match="lies in no numbered layer"):
        get_peft_model(
            tiny_mlp_case().model,
            BottleneckConfig(adapter_type="pfeiffer", mlp_modules=["fc2"], drop_lowest_layers=1),
        )
