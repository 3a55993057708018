"""Bottleneck adapters (``method: bottleneck``) against the papers' definitions.

    sequential (Houlsby et al. 2019, Pfeiffer et al. 2021):  h' = h + up(f(down(h)))
    parallel (He et al. 2022):                                h' = sub(x) + s * up(f(down(x)))

Houlsby puts one after the attention and one after the feed-forward sub-layer of every block,
Pfeiffer one after the feed-forward sub-layer; parallel runs beside the feed-forward sub-layer.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from _tiny_models import tiny_bert_case, tiny_gpt2_case, tiny_llama_case, tiny_mlp_case
from conftest import make_tiny_llama, train_tiny
from peftkit import BottleneckConfig, PeftModel, get_peft_model
from peftkit.errors import PeftkitError, TargetModulesError
from peftkit.methods import get_method
from peftkit.methods.adapters import BottleneckLayer

pytestmark = pytest.mark.usefixtures("single_thread")

CASES = {"llama": tiny_llama_case, "gpt2": tiny_gpt2_case, "bert": tiny_bert_case}
HEADS = {"bert": ["classifier"]}


def _wrap(arch: str, **kwargs):
    case = CASES[arch]()
    expected = case.model(**case.inputs).logits
    config = BottleneckConfig(bottleneck_size=4, modules_to_save=HEADS.get(arch), **kwargs)
    return case, expected, get_peft_model(case.model, config)


def _layers(model: nn.Module) -> dict[str, BottleneckLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BottleneckLayer)}


@pytest.mark.parametrize(
    ("arch", "adapter_type"),
    [(a, t) for a in CASES for t in ("houlsby", "pfeiffer", "parallel") if (a, t) != ("bert", "parallel")],
)
def test_zero_init_leaves_logits_unchanged(arch, adapter_type):
    case, expected, model = _wrap(arch, adapter_type=adapter_type)
    assert _layers(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**case.inputs).logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("arch", "adapter_type", "per_block"),
    [
        ("llama", "houlsby", {"self_attn", "mlp"}),
        ("llama", "pfeiffer", {"mlp"}),
        ("gpt2", "houlsby", {"attn", "mlp"}),
        ("gpt2", "pfeiffer", {"mlp"}),
        ("bert", "houlsby", {"attention.output.dense", "output.dense"}),
        ("bert", "pfeiffer", {"output.dense"}),
    ],
)
def test_sequential_adapters_follow_each_sub_layer_output(arch, adapter_type, per_block):
    case, _, model = _wrap(arch, adapter_type=adapter_type, init="random")
    layers = _layers(model)
    blocks: dict[int, set[str]] = {}
    for name in layers:
        index, rest = re.search(r"\.(\d+)\.(.+)$", name).groups()
        blocks.setdefault(int(index), set()).add(rest)
    assert blocks == {0: per_block, 1: per_block}  # 2 adapters per block for Houlsby, 1 for Pfeiffer

    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, layer in layers.items():

        def sub_output(_, __, out, name=name):
            seen.setdefault(name, []).append(out[0] if isinstance(out, tuple) else out)

        def adapter_input(_, args, name=name):
            seen.setdefault(name, []).append(args[0])

        hooks.append(layer.base_layer.register_forward_hook(sub_output))
        hooks.append(layer.adapter_down["default"].register_forward_pre_hook(adapter_input))
    with torch.no_grad():
        model(**case.inputs)
    for hook in hooks:
        hook.remove()
    for name, (out, adapter_in) in seen.items():
        assert torch.equal(out, adapter_in), name


def test_parallel_adapter_reads_the_feed_forward_input():
    case, _, model = _wrap("llama", adapter_type="parallel", init="random")
    layers = _layers(model)
    assert sorted(layers) == [f"base_model.model.model.layers.{i}.mlp" for i in (0, 1)]
    seen = []
    layer = layers["base_model.model.model.layers.0.mlp"]
    layer.base_layer.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    layer.adapter_down["default"].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        model(**case.inputs)
    assert torch.equal(seen[0], seen[1])


def _random_layer(base: nn.Module, **kwargs) -> BottleneckLayer:
    layer = BottleneckLayer(base)
    layer.update_layer("a", bottleneck=3, init="random", **kwargs)
    layer.active_adapter = "a"
    return layer


def test_hand_computed_sequential_and_parallel_outputs():
    torch.manual_seed(0)
    sub = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        seq = _random_layer(sub, parallel=False, scaling=1.0, non_linearity="gelu")
        down, up = seq.adapter_down["a"], seq.adapter_up["a"]
        h = sub(x)
        want = h + F.linear(F.gelu(F.linear(h, down.weight, down.bias)), up.weight, up.bias)
        torch.testing.assert_close(seq(x), want)

        par = _random_layer(sub, parallel=True, scaling=2.5, non_linearity="silu")
        down, up = par.adapter_down["a"], par.adapter_up["a"]
        want = sub(x) + 2.5 * F.linear(F.silu(F.linear(x, down.weight, down.bias)), up.weight, up.bias)
        torch.testing.assert_close(par(x), want)
        par.active_adapter = None
        assert torch.equal(par(x), sub(x))


def test_tuple_outputs_get_the_adapter_on_their_first_element():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.o_proj = nn.Linear(8, 8)

        def forward(self, x):
            return self.o_proj(x), "weights"

    sub = Attention()
    layer = _random_layer(sub, parallel=False, scaling=1.0, non_linearity="relu")
    x = torch.randn(3, 8)
    with torch.no_grad():
        out, extra = layer(x)
        h = sub(x)[0]
        assert extra == "weights"
        torch.testing.assert_close(out, h + layer.adapter("a", h))


def test_only_adapter_and_head_parameters_train_with_correct_counts():
    case, _, model = _wrap("bert", adapter_type="houlsby")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        re.search(r"\.adapter_(down|up)\.default\.(weight|bias)$|classifier\.modules_to_save\.default\.", n)
        for n in trainable
    )
    hidden, width, n_layers = case.model.config.hidden_size, 4, 4  # 2 blocks x (attention, feed-forward)
    per_adapter = hidden * width + width + width * hidden + hidden
    head = sum(p.numel() for n, p in model.named_parameters() if "classifier.modules_to_save" in n)
    assert model.get_nb_trainable_parameters()[0] == n_layers * per_adapter + head


@pytest.mark.parametrize("adapter_type", ["houlsby", "parallel"])
def test_counts_on_meta_device_equal_real(adapter_type):
    config = dict(adapter_type=adapter_type, reduction_factor=8)
    real = get_peft_model(make_tiny_llama(), BottleneckConfig(**config))
    with torch.device("meta"):
        meta = get_peft_model(make_tiny_llama(), BottleneckConfig(**config))
    assert next(meta.parameters()).device.type == "meta"
    assert meta.get_nb_trainable_parameters() == real.get_nb_trainable_parameters()
    assert {m.adapter_down["default"].out_features for m in _layers(real).values()} == {32 // 8}


@pytest.mark.parametrize("adapter_type", ["houlsby", "parallel"])
def test_save_and_load_into_fresh_base_gives_same_logits(adapter_type, tmp_path):
    case, _, model = _wrap(
        "llama", adapter_type=adapter_type, init="random", scaling=2.0 if adapter_type == "parallel" else 1.0
    )
    with torch.no_grad():
        expected = model(**case.inputs).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK" and saved["adapter_type"] == adapter_type
    loaded = PeftModel.from_pretrained(tiny_llama_case().model, tmp_path)
    assert loaded.get_nb_trainable_parameters()[0] == 0
    with torch.no_grad():
        torch.testing.assert_close(loaded(**case.inputs).logits, expected, atol=0, rtol=0)


def test_merge_is_refused_and_unload_restores_the_original_modules():
    case, expected, model = _wrap("gpt2", adapter_type="houlsby", init="random")
    originals = {n: type(m.base_layer) for n, m in _layers(model).items()}
    with pytest.raises(PeftkitError, match=r"cannot be merged into the weights; use unload\(\)"):
        model.merge_and_unload()
    assert len(_layers(model)) == 4  # nothing was swapped back
    plain = model.unload()
    assert not _layers(plain)
    for name, kind in originals.items():
        assert type(plain.get_submodule(name.removeprefix("base_model.model."))) is kind
    with torch.no_grad():
        torch.testing.assert_close(plain(**case.inputs).logits, expected, atol=0, rtol=0)


def test_layer_filter_and_clear_errors():
    model = get_peft_model(make_tiny_llama(), BottleneckConfig(layers_to_transform=[1], bottleneck_size=2))
    assert sorted(_layers(model)) == [f"base_model.model.model.layers.1.{m}" for m in ("mlp", "self_attn")]
    with pytest.raises(TargetModulesError, match=r"no default .* Candidates in this model: fc1, fc2"):
        get_peft_model(tiny_mlp_case().model, BottleneckConfig())
    with pytest.raises(TargetModulesError, match="matched no module"):
        get_peft_model(make_tiny_llama(), BottleneckConfig(mlp_modules=["ffn"]))
    with pytest.raises(TargetModulesError, match="input and output widths agree"):
        get_peft_model(
            make_tiny_llama(), BottleneckConfig(adapter_type="parallel", mlp_modules=["down_proj"])
        )
    with pytest.raises(ValueError, match="adapter_type must be one of.*not both"):
        BottleneckConfig(adapter_type="lora", bottleneck_size=4, reduction_factor=2)
    # A user's own model works once the sub-layers are named.
    mlp = get_peft_model(
        tiny_mlp_case().model, BottleneckConfig(adapter_type="pfeiffer", mlp_modules=["fc2"])
    )
    assert len(_layers(mlp)) == 2


def test_registered_and_exported():
    spec = get_method("bottleneck")
    assert spec.peft_type == "BOTTLENECK" and spec.config_cls is BottleneckConfig


def test_short_training_run_lowers_the_loss(tiny_model_dir, tmp_path):
    losses = train_tiny(
        tiny_model_dir, tmp_path / "out", "bottleneck", {"adapter_type": "houlsby", "bottleneck_size": 8}
    )
    assert losses[-1] < 0.7 * losses[0], losses


def test_second_adapter_shares_the_wrappers_and_switches():
    case, expected, model = _wrap("llama", adapter_type="houlsby", init="random")
    with torch.no_grad():
        first = model(**case.inputs).logits
    model.add_adapter("ffn_only", BottleneckConfig(adapter_type="pfeiffer", bottleneck_size=2))
    layers = _layers(model)
    assert len(layers) == 4  # the mlp wrappers took the second adapter; no wrapper inside a wrapper
    assert sum("ffn_only" in m.adapter_down for m in layers.values()) == 2
    model.set_adapter("ffn_only")
    with torch.no_grad():
        torch.testing.assert_close(model(**case.inputs).logits, expected, atol=0, rtol=0)  # zero init
        model.set_adapter("default")
        torch.testing.assert_close(model(**case.inputs).logits, first, atol=0, rtol=0)
