"""AdapterFusion (Pfeiffer et al. 2021) over saved bottleneck adapters, against the paper's definition.

Per fused sub-layer with output h and adapter outputs d_1..d_N (``up(f(down(h)))``):

    s_n = softmax_n((Q h)·(K d_n))        o = Σ_n s_n V d_n        h' = h + o

Q, K random; V = I + tiny noise; only Q, K, V (and modules_to_save) train, with the loss term
λ Σ_layers ||I - V||². The fused adapters stay frozen.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from _tiny_models import tiny_bert_case, tiny_llama_case
from conftest import make_tiny_llama
from peftkit import BottleneckConfig, LoraConfig, PeftModel, get_peft_model
from peftkit.errors import ModelLoadError, PeftkitError, TargetModulesError
from peftkit.methods import get_method
from peftkit.methods.adapter_fusion import AdapterFusionConfig, FusionLayer
from peftkit.methods.adapters import BottleneckLayer

pytestmark = pytest.mark.usefixtures("single_thread")

HIDDEN = 32


def _save_adapter(path, model=None, **kwargs) -> str:
    """A random (as if trained) bottleneck adapter on the tiny Llama, saved to ``path``."""
    config = BottleneckConfig(
        **{"adapter_type": "pfeiffer", "bottleneck_size": 4, "init": "random", **kwargs}
    )
    get_peft_model(model if model is not None else tiny_llama_case().model, config).save_pretrained(path)
    return str(path)


@pytest.fixture
def two_adapters(tmp_path) -> list[str]:
    torch.manual_seed(11)
    first = _save_adapter(tmp_path / "a", non_linearity="relu")
    second = _save_adapter(tmp_path / "b", non_linearity="gelu", bottleneck_size=6)  # widths may differ
    return [first, second]


def _fusion(adapters: list[str], **kwargs):
    case = tiny_llama_case()
    return case, get_peft_model(case.model, AdapterFusionConfig(adapters=adapters, **kwargs))


def _fusion_layers(model: nn.Module) -> dict[str, FusionLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FusionLayer)}


def test_fusion_layer_output_equals_the_formula_by_hand(two_adapters):
    case, model = _fusion(two_adapters, value_init_std=0.01)
    layers = _fusion_layers(model)
    assert sorted(layers) == [f"base_model.model.model.layers.{i}.mlp" for i in (0, 1)]
    layer = layers["base_model.model.model.layers.1.mlp"]
    with torch.no_grad():  # make the mix uneven and V far from I, so every term matters
        layer.fusion_query["default"].bias.normal_(0.0, 3.0)
        layer.fusion_key["default"].weight.normal_(0.0, 1.0)
        layer.fusion_value["default"].weight.add_(0.1 * torch.randn(HIDDEN, HIDDEN))
    seen = {}
    layer.register_forward_hook(lambda _, args, out: seen.update(x=args[0], out=out))
    with torch.no_grad():
        model(**case.inputs)
        x, out = seen["x"], seen["out"]
        adapters = layer.base_layer
        h = adapters.base_layer(x)  # LlamaMLP(x)
        acts = {"fused_0": F.relu, "fused_1": F.gelu}
        d = [
            F.linear(
                acts[n](F.linear(h, adapters.adapter_down[n].weight, adapters.adapter_down[n].bias)),
                adapters.adapter_up[n].weight,
                adapters.adapter_up[n].bias,
            )
            for n in ("fused_0", "fused_1")
        ]
        q_lin, k_lin, v_lin = (getattr(layer, f"fusion_{k}")["default"] for k in ("query", "key", "value"))
        q = h @ q_lin.weight.T + q_lin.bias
        scores = torch.stack([((d_n @ k_lin.weight.T + k_lin.bias) * q).sum(-1) for d_n in d], dim=-1)
        s = torch.softmax(scores, dim=-1)  # (batch, seq, 2)
        assert s.min() < 0.3  # a real mix, not a near-average
        want = h + sum(s[..., n : n + 1] * (d[n] @ v_lin.weight.T) for n in range(2))
        torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)


def test_one_adapter_with_identity_value_is_that_adapter(tmp_path):
    """softmax over one adapter is 1 and V = I, so h' = h + d: exactly the adapter alone."""
    source = _save_adapter(tmp_path / "a", adapter_type="houlsby")
    case = tiny_llama_case()
    alone = PeftModel.from_pretrained(tiny_llama_case().model, source)
    _, exact = _fusion([source], value_init_std=0.0)
    _, paper = _fusion([source])  # V = I + N(0, 1e-6) off the diagonal
    with torch.no_grad():
        want = alone(**case.inputs).logits
        assert not torch.allclose(want, tiny_llama_case().model(**case.inputs).logits)
        torch.testing.assert_close(exact(**case.inputs).logits, want, atol=0, rtol=0)
        torch.testing.assert_close(paper(**case.inputs).logits, want, atol=1e-4, rtol=0)


def test_only_fusion_weights_train_and_the_adapters_stay_frozen(two_adapters):
    case, model = _fusion(two_adapters)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".fusion_" in n for n in trainable)
    per_layer = 3 * HIDDEN * HIDDEN + 2 * HIDDEN  # Q (W, b), K (W, b), V (W)
    assert model.get_nb_trainable_parameters()[0] == 2 * per_layer
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        loss = case.loss(model(**case.inputs))
        reg = model.base_model.regularization_loss()
        (loss + reg).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    for name, param in model.named_parameters():
        if ".fusion_" in name:
            assert not torch.equal(param, before[name]), name
        else:  # the fused adapters and the base model: bit-identical
            assert torch.equal(param, before[name]), name
    assert any(".adapter_down.fused_1." in n for n in before)


def test_regularization_is_lambda_times_distance_of_v_from_identity(two_adapters):
    _, model = _fusion(two_adapters, value_init_std=0.0, regularization=0.5)
    model.train()
    assert model.base_model.regularization_loss().item() == 0.0  # V = I exactly
    values = [layer.fusion_value["default"].weight for layer in _fusion_layers(model).values()]
    with torch.no_grad():
        for v in values:
            v.add_(0.01 * torch.randn_like(v))
    want = 0.5 * sum(((torch.eye(HIDDEN) - v) ** 2).sum() for v in values)
    torch.testing.assert_close(model.base_model.regularization_loss(), want)
    model.eval()
    assert model.base_model.regularization_loss() is None
    _, off = _fusion(two_adapters, regularization=0)
    off.train()
    assert off.base_model.regularization_loss() is None


def test_save_writes_fusion_weights_and_sources_and_loads_back(two_adapters, tmp_path, monkeypatch):
    case, model = _fusion(two_adapters)
    with torch.no_grad():
        for layer in _fusion_layers(model).values():
            layer.fusion_key["default"].weight.mul_(30)
        expected = model(**case.inputs).logits
    model.save_pretrained(tmp_path / "fusion")
    saved = json.loads((tmp_path / "fusion" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADAPTER_FUSION" and saved["adapters"] == two_adapters
    keys = set(load_file(tmp_path / "fusion" / "adapter_model.safetensors"))
    assert keys == {
        f"base_model.model.model.layers.{i}.mlp.fusion_{kind}.{p}"
        for i in (0, 1)
        for kind, params in (("query", "wb"), ("key", "wb"), ("value", "w"))
        for p in ("weight", "bias")[: len(params)]
    }
    monkeypatch.chdir(tmp_path)  # recorded paths are absolute: loading elsewhere works
    loaded = PeftModel.from_pretrained(tiny_llama_case().model, tmp_path / "fusion")
    assert loaded.get_nb_trainable_parameters()[0] == 0
    with torch.no_grad():
        torch.testing.assert_close(loaded(**case.inputs).logits, expected, atol=0, rtol=0)
    trainable = PeftModel.from_pretrained(tiny_llama_case().model, tmp_path / "fusion", is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


def test_relative_paths_are_recorded_absolute(two_adapters, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, model = _fusion(["a", "b"])
    assert model.peft_config["default"].adapters == two_adapters


def test_modules_to_save_train_with_the_fusion(tmp_path):
    torch.manual_seed(2)
    sources = [
        _save_adapter(tmp_path / n, model=tiny_bert_case().model, modules_to_save=["classifier"])
        for n in "ab"
    ]
    case = tiny_bert_case()
    config = AdapterFusionConfig(adapters=sources, modules_to_save=["classifier"], task_type="SEQ_CLS")
    model = get_peft_model(case.model, config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier.modules_to_save.default." in n for n in trainable)
    assert all(".fusion_" in n or ".modules_to_save.default." in n for n in trainable)
    case.loss(model(**case.inputs)).backward()


def test_disable_adapter_and_unload_give_the_base_model(two_adapters):
    case, model = _fusion(two_adapters)
    with torch.no_grad():
        base = tiny_llama_case().model(**case.inputs).logits
        with model.disable_adapter():
            torch.testing.assert_close(model(**case.inputs).logits, base, atol=0, rtol=0)
        with pytest.raises(PeftkitError, match="cannot be merged"):
            model.merge_and_unload()
        plain = model.unload()
        assert not any(isinstance(m, FusionLayer) for m in plain.modules())
        torch.testing.assert_close(plain(**case.inputs).logits, base, atol=0, rtol=0)


def test_second_fusion_over_the_same_adapters(two_adapters, tmp_path):
    case, model = _fusion(two_adapters)
    model.add_adapter("reversed", AdapterFusionConfig(adapters=two_adapters[::-1]))
    layer = next(iter(_fusion_layers(model).values()))
    assert layer.fused == {"default": ["fused_0", "fused_1"], "reversed": ["fused_1", "fused_0"]}
    with pytest.raises(PeftkitError, match="can only mix those"):
        model.add_adapter("other", AdapterFusionConfig(adapters=[_save_adapter(tmp_path / "c")]))


def test_clear_errors(tmp_path):
    pfeiffer = _save_adapter(tmp_path / "pfeiffer")
    houlsby = _save_adapter(tmp_path / "houlsby", adapter_type="houlsby")
    dropped = _save_adapter(tmp_path / "dropped", drop_lowest_layers=1)
    with pytest.raises(TargetModulesError, match="must sit at the same sub-layers.*self_attn"):
        _fusion([pfeiffer, houlsby])
    with pytest.raises(
        TargetModulesError, match="only in the first.*layers.0.mlp.*set the fusion's drop_lowest"
    ):
        _fusion([pfeiffer, dropped])
    wide = _save_adapter(tmp_path / "wide", model=make_tiny_llama(vocab_size=100, hidden_size=48))
    with pytest.raises(ModelLoadError, match="does not fit this model.*wrong shape"):
        _fusion([pfeiffer, wide])
    get_peft_model(tiny_llama_case().model, LoraConfig(r=2)).save_pretrained(tmp_path / "lora")
    with pytest.raises(ModelLoadError, match="holds a LORA adapter; AdapterFusion fuses bottleneck"):
        _fusion([pfeiffer, str(tmp_path / "lora")])
    with pytest.raises(ValueError, match="adapters is empty"):
        AdapterFusionConfig()
    with pytest.raises(ValueError, match="lists a directory twice"):
        AdapterFusionConfig(adapters=[pfeiffer, pfeiffer])
    with pytest.raises(ValueError, match="regularization must be a number >= 0"):
        AdapterFusionConfig(adapters=[pfeiffer], regularization=-1)


def test_adapterdrop_for_fusion_fuses_only_the_layers_all_adapters_cover(tmp_path):
    """Rueckle et al. section 5: no fusion (and no adapter) in the lowest layers."""
    torch.manual_seed(4)
    full = _save_adapter(tmp_path / "full")
    dropped = _save_adapter(tmp_path / "dropped", drop_lowest_layers=1)
    robust = _save_adapter(tmp_path / "robust", drop_lowest_layers=1, drop_random=True)  # all layers
    case, model = _fusion([full, dropped, robust], drop_lowest_layers=1)
    assert sorted(_fusion_layers(model)) == ["base_model.model.model.layers.1.mlp"]
    assert sorted(_fusion_layers(model)["base_model.model.model.layers.1.mlp"].base_layer.adapter_down) == [
        "fused_0",
        "fused_1",
        "fused_2",
    ]
    base = tiny_llama_case().model
    seen = []
    for m in (base, model.get_base_model()):
        hook = m.model.layers[0].register_forward_hook(
            lambda _, __, out: seen.append(out[0] if isinstance(out, tuple) else out)
        )
        with torch.no_grad():
            m(**case.inputs)
        hook.remove()
    assert torch.equal(seen[0], seen[1])  # layer 0 computes exactly what the base model computes
    with pytest.raises(PeftkitError, match="must use the same drop_lowest_layers"):
        model.add_adapter("second", AdapterFusionConfig(adapters=[full, dropped, robust]))
    _, robust_only = _fusion([full, robust])  # a robust adapter exists in every layer: same placement
    assert len(_fusion_layers(robust_only)) == 2


def test_registered():
    spec = get_method("adapter_fusion")
    assert spec.peft_type == "ADAPTER_FUSION" and spec.config_cls is AdapterFusionConfig


# -- a failure half-way leaves the user's model as it was -----------------------------------------------


def _state(model: nn.Module) -> dict:
    """Everything a failed injection must not change: module objects, tensors, flags, hooks."""
    return {
        "modules": dict(model.named_modules()),
        "tensors": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
        "grads": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": {n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in model.named_modules()},
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _state(model)
    assert after["modules"].keys() == before["modules"].keys()
    assert all(after["modules"][n] is m for n, m in before["modules"].items())  # the same objects
    assert after["tensors"].keys() == before["tensors"].keys()
    assert all(torch.equal(after["tensors"][k], v) for k, v in before["tensors"].items())
    assert after["grads"] == before["grads"] and after["hooks"] == before["hooks"]
    assert not any(isinstance(m, (FusionLayer, BottleneckLayer)) for m in model.modules())


@pytest.fixture
def fitting_and_wide(tmp_path) -> list[str]:
    """A fitting adapter, then one for a wider model: it fails only after the first is injected."""
    torch.manual_seed(5)
    fitting = _save_adapter(tmp_path / "fitting")
    wide = _save_adapter(tmp_path / "wide", model=make_tiny_llama(vocab_size=100, hidden_size=48))
    return [fitting, wide]


def test_failed_construction_leaves_the_model_as_it_was(fitting_and_wide, tmp_path):
    fitting, wide = fitting_and_wide
    houlsby = _save_adapter(tmp_path / "houlsby", adapter_type="houlsby")
    get_peft_model(tiny_llama_case().model, LoraConfig(r=2)).save_pretrained(tmp_path / "lora")
    failures = [
        ([fitting, wide], ModelLoadError, "wrong shape"),  # after fused_0 is injected
        ([fitting, str(tmp_path / "missing")], ModelLoadError, "no adapter directory"),
        ([fitting, str(tmp_path / "lora")], ModelLoadError, "holds a LORA adapter"),
        ([fitting, houlsby], TargetModulesError, "same sub-layers"),
    ]
    for adapters, error, message in failures:
        case = tiny_llama_case()
        before = _state(case.model)
        with pytest.raises(error, match=message):
            get_peft_model(case.model, AdapterFusionConfig(adapters=adapters, modules_to_save=["lm_head"]))
        _assert_unchanged(case.model, before)
        fused = get_peft_model(case.model, AdapterFusionConfig(adapters=[fitting]))  # still usable
        assert len(_fusion_layers(fused)) == 2


def test_failure_while_wrapping_a_later_layer_leaves_the_model_as_it_was(two_adapters, monkeypatch):
    """The last steps fail on the second sub-layer (simulated): nothing of the first stays."""
    original_init = FusionLayer.__init__
    calls = []

    def fail_second(self, adapters):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("cannot wrap this sub-layer")
        original_init(self, adapters)

    case = tiny_llama_case()
    before = _state(case.model)
    monkeypatch.setattr(FusionLayer, "__init__", fail_second)
    with pytest.raises(RuntimeError, match="cannot wrap"):
        get_peft_model(case.model, AdapterFusionConfig(adapters=two_adapters))
    _assert_unchanged(case.model, before)
    monkeypatch.undo()

    original_update = FusionLayer.update_layer
    calls.clear()

    def fail_second_update(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("cannot add the fusion here")
        original_update(self, *args, **kwargs)

    monkeypatch.setattr(FusionLayer, "update_layer", fail_second_update)
    with pytest.raises(RuntimeError, match="cannot add the fusion"):
        get_peft_model(case.model, AdapterFusionConfig(adapters=two_adapters))
    _assert_unchanged(case.model, before)


def test_failed_add_adapter_leaves_the_fusion_model_as_it_was(two_adapters, tmp_path, monkeypatch):
    case, model = _fusion(two_adapters, modules_to_save=["lm_head"])
    with torch.no_grad():
        out = model(**case.inputs).logits
    before = _state(model)
    configs = dict(model.peft_config)
    with pytest.raises(PeftkitError, match="can only mix those"):
        model.add_adapter("other", AdapterFusionConfig(adapters=[_save_adapter(tmp_path / "c")]))
    _assert_unchanged_fusion(model, before, configs)
    original_update = FusionLayer.update_layer
    calls = []

    def fail_second_update(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("cannot add the fusion here")
        original_update(self, *args, **kwargs)

    monkeypatch.setattr(FusionLayer, "update_layer", fail_second_update)
    with pytest.raises(RuntimeError, match="cannot add the fusion"):  # the first layer got it already
        model.add_adapter(
            "reversed", AdapterFusionConfig(adapters=two_adapters[::-1], modules_to_save=["lm_head"])
        )
    _assert_unchanged_fusion(model, before, configs)
    assert all(layer.fused.keys() == {"default"} for layer in _fusion_layers(model).values())
    monkeypatch.undo()
    with torch.no_grad():
        torch.testing.assert_close(model(**case.inputs).logits, out, atol=0, rtol=0)
    model.add_adapter("reversed", AdapterFusionConfig(adapters=two_adapters[::-1]))  # works afterwards
    assert list(model.peft_config) == ["default", "reversed"]


def _assert_unchanged_fusion(model, before: dict, configs: dict) -> None:
    after = _state(model)
    assert all(after["modules"][n] is m for n, m in before["modules"].items())
    assert after["modules"].keys() == before["modules"].keys()
    assert after["tensors"].keys() == before["tensors"].keys()
    assert all(torch.equal(after["tensors"][k], v) for k, v in before["tensors"].items())
    assert after["grads"] == before["grads"] and model.peft_config == configs


def test_loading_a_fusion_whose_fused_adapter_changed_leaves_the_base_as_it_was(two_adapters, tmp_path):
    _, model = _fusion(two_adapters)
    model.save_pretrained(tmp_path / "fusion")
    # the second fused adapter's directory now holds one for another model
    _save_adapter(two_adapters[1], model=make_tiny_llama(vocab_size=100, hidden_size=48))
    base = tiny_llama_case().model
    before = _state(base)
    with pytest.raises(ModelLoadError, match="wrong shape"):
        PeftModel.from_pretrained(base, tmp_path / "fusion")
    _assert_unchanged(base, before)
