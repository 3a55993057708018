"""MAM adapter and UniPELT against their papers' formulas, computed by hand on tiny models.

PEFT has neither method, so the oracle is prefix tuning (peftkit's, itself checked against PEFT)
with the same prefix, plus the adapter / LoRA terms added by forward hooks written here from the
formulas:

    MAM (He et al. 2022):      ffn(x) + s * up(relu(down(x)))                       beside every ffn
    UniPELT (Mao et al. 2022): W0 x + g_L * (alpha / r) * B A x                     on q, v
                               h + g_A * up(relu(down(h)))                          after every ffn
                               [g_P,K * P_K ; K], [g_P,V * P_V ; V]                 every attention
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

import peftkit
from _tiny_models import make_tiny_gpt2
from conftest import make_tiny_llama
from peftkit.errors import PeftkitError
from peftkit.methods.adapters import BottleneckLayer
from peftkit.methods.unipelt import GatedBottleneckLayer, GatedLoraLinear

pytestmark = pytest.mark.usefixtures("single_thread")

N = 3  # virtual tokens
BUILD = {"llama": lambda: make_tiny_llama(vocab_size=100), "gpt2": lambda: make_tiny_gpt2()}
SMALL = dict(task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=8, bottleneck_size=4)


def batch(pad: bool = False) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if pad:
        mask[1, -3:] = 0  # right padding in the second row
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def wrap(arch: str, config) -> peftkit.PeftModel:
    torch.manual_seed(7)  # the adapter's own random init
    return peftkit.get_peft_model(BUILD[arch](), config)


def prefix_reference(model: peftkit.PeftModel, arch: str, table: torch.Tensor | None = None):
    """Prefix tuning on a fresh base with ``model``'s prefix (or the given key/value ``table``)."""
    config = model.peft_config["default"]
    ref = peftkit.get_peft_model(
        BUILD[arch](),
        peftkit.PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=config.num_virtual_tokens,
            prefix_projection=table is None and config.prefix_projection,
            encoder_hidden_size=config.encoder_hidden_size,
        ),
    )
    encoder = ref.base_model.prompt_encoder["default"]
    if table is None:
        encoder.load_state_dict(model.base_model.prompt_encoder["default"].state_dict())
    else:
        with torch.no_grad():
            encoder.embedding.weight.copy_(table)
    return ref


def linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, module.weight, module.bias)


def hook_outputs(ref: peftkit.PeftModel, model: peftkit.PeftModel, kind: type, extra) -> None:
    """On ``ref``, add ``extra(layer, input, output)`` to the output of every module that is a
    ``kind`` adapter layer in ``model`` (same names in both user models)."""
    ref_modules = dict(ref.base_model.model.named_modules())
    for name, layer in model.base_model.model.named_modules():
        if isinstance(layer, kind):

            def add(module, args, output, layer=layer):
                return output + extra(layer, args[0], output)

            ref_modules[name].register_forward_hook(add)


def set_gates(model: peftkit.PeftModel, kind: str, bias: float, weight: float | None = 0.0) -> None:
    """Gate parameters of one kind ("lora", "adapter", "prefix"): bias, and weight (None: keep)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f"{kind}_gate" in name:
                if name.endswith("bias"):
                    param.fill_(bias)
                elif weight is not None:
                    param.fill_(weight)


OFF, ON = -1.0e4, 1.0e4  # sigmoid gives exactly 0.0 and 1.0 in fp32


# -- MAM ------------------------------------------------------------------------------------------


def test_mam_defaults_are_the_papers():
    config = peftkit.MAMConfig(task_type="CAUSAL_LM")
    assert (config.num_virtual_tokens, config.bottleneck_size, config.scaling) == (30, 512, 4.0)
    assert config.prefix_projection and config.encoder_hidden_size == 800 and config.non_linearity == "relu"
    assert config.peft_type == "MAM"
    with pytest.raises(ValueError, match="bottleneck_size must be a positive integer"):
        peftkit.MAMConfig(task_type="CAUSAL_LM", bottleneck_size=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mam_with_zero_adapter_equals_prefix_tuning(arch):
    model = wrap(arch, peftkit.MAMConfig(**SMALL))
    inputs = batch(pad=True)
    torch.testing.assert_close(
        logits(model, inputs), logits(prefix_reference(model, arch), inputs), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mam_adds_scaled_parallel_adapter_beside_the_ffn(arch):
    model = wrap(arch, peftkit.MAMConfig(**SMALL, scaling=4.0, adapter_init="random"))
    layers = [m for m in model.modules() if isinstance(m, BottleneckLayer)]
    assert len(layers) == 2 and all(m.parallel["default"] for m in layers)
    ref = prefix_reference(model, arch)

    def adapter(layer, x, output):  # s * up(relu(down(x))), x = the ffn's input
        return 4.0 * linear(layer.adapter_up["default"], F.relu(linear(layer.adapter_down["default"], x)))

    hook_outputs(ref, model, BottleneckLayer, adapter)
    inputs = batch(pad=True)
    got = logits(model, inputs)
    torch.testing.assert_close(got, logits(ref, inputs), atol=1e-5, rtol=0)
    assert not torch.allclose(got, logits(prefix_reference(model, arch), inputs), atol=1e-3)


# -- UniPELT --------------------------------------------------------------------------------------


def unipelt(arch: str, **overrides) -> peftkit.PeftModel:
    return wrap(arch, peftkit.UniPELTConfig(**{**SMALL, "adapter_init": "random", "r": 2, **overrides}))


def test_unipelt_defaults_and_placement():
    config = peftkit.UniPELTConfig(task_type="CAUSAL_LM")
    assert (config.num_virtual_tokens, config.r, config.reduction_factor) == (10, 8, 16)
    model = peftkit.get_peft_model(make_tiny_llama(vocab_size=100), peftkit.UniPELTConfig(**SMALL))
    lora = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, GatedLoraLinear)}
    adapters = {n.rsplit(".", 2)[-1] for n, m in model.named_modules() if isinstance(m, GatedBottleneckLayer)}
    assert lora == {"q_proj", "v_proj"} and adapters == {"mlp"}
    assert not any(m.parallel["default"] for m in model.modules() if isinstance(m, GatedBottleneckLayer))
    assert len(model.base_model.prefix_gate["default"]) == 2  # one (hidden -> 2) gate per layer


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unipelt_closed_gates_leave_prefix_tuning(arch):
    model = unipelt(arch)
    set_gates(model, "lora", OFF)
    set_gates(model, "adapter", OFF)
    set_gates(model, "prefix", ON)
    inputs = batch(pad=True)
    torch.testing.assert_close(
        logits(model, inputs), logits(prefix_reference(model, arch), inputs), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unipelt_open_lora_gate_is_ungated_lora(arch):
    model = unipelt(arch, lora_alpha=6)
    set_gates(model, "lora", ON)
    set_gates(model, "adapter", OFF)
    set_gates(model, "prefix", ON)
    ref = prefix_reference(model, arch)

    def lora(layer, x, output):  # (alpha / r) * B A x
        return 3.0 * F.linear(F.linear(x, layer.lora_A["default"].weight), layer.lora_B["default"].weight)

    hook_outputs(ref, model, GatedLoraLinear, lora)
    inputs = batch(pad=True)
    torch.testing.assert_close(logits(model, inputs), logits(ref, inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unipelt_adapter_gate_scales_the_sequential_adapter(arch):
    model = unipelt(arch)
    set_gates(model, "lora", OFF)
    set_gates(model, "prefix", ON)
    set_gates(model, "adapter", 0.0, weight=None)  # keep the random weights: g_A varies per token
    ref = prefix_reference(model, arch)

    def adapter(layer, h, output):  # g_A(h) * up(relu(down(h))), h = the ffn's output
        g = torch.sigmoid(linear(layer.adapter_gate["default"], output))
        return g * linear(layer.adapter_up["default"], F.relu(linear(layer.adapter_down["default"], output)))

    hook_outputs(ref, model, GatedBottleneckLayer, adapter)
    inputs = batch()
    torch.testing.assert_close(logits(model, inputs), logits(ref, inputs), atol=1e-5, rtol=0)


def test_unipelt_lora_gate_is_per_token_sigmoid_of_the_input():
    model = unipelt("llama")
    set_gates(model, "adapter", OFF)
    set_gates(model, "prefix", ON)
    ref = prefix_reference(model, "llama")

    def lora(layer, x, output):  # sigmoid(W_g x + b) * (alpha / r) * B A x
        g = torch.sigmoid(linear(layer.lora_gate["default"], x))
        return g * 8.0 * F.linear(F.linear(x, layer.lora_A["default"].weight), layer.lora_B["default"].weight)

    hook_outputs(ref, model, GatedLoraLinear, lora)
    inputs = batch()
    torch.testing.assert_close(logits(model, inputs), logits(ref, inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("gate_k, gate_v", [(0.0, 0.0), (0.3, 0.8)])
def test_unipelt_prefix_gate_scales_prefix_keys_and_values(gate_k, gate_v):
    model = unipelt("llama", prefix_projection=False)
    set_gates(model, "lora", OFF)
    set_gates(model, "adapter", OFF)
    with torch.no_grad():
        for gate in model.base_model.prefix_gate["default"]:
            gate.weight.zero_()
            gate.bias.copy_(torch.logit(torch.tensor([gate_k, gate_v])))
    config = model.peft_config["default"]
    table = model.base_model.prompt_encoder["default"].embedding.weight.detach()
    table = table.view(N, config.num_layers, 2, config.token_dim) * torch.tensor([gate_k, gate_v]).view(
        1, 1, 2, 1
    )
    ref = prefix_reference(model, "llama", table=table.reshape(N, -1))
    inputs = batch(pad=True)
    torch.testing.assert_close(logits(model, inputs), logits(ref, inputs), atol=1e-5, rtol=0)


def test_unipelt_prefix_gate_averages_the_layer_input_over_real_tokens():
    """One layer: its input is the token embeddings, so g_P can be computed by hand per sequence."""
    build = lambda: make_tiny_llama(vocab_size=100, num_hidden_layers=1)  # noqa: E731
    torch.manual_seed(7)
    config = peftkit.UniPELTConfig(**{**SMALL, "prefix_projection": False})
    model = peftkit.get_peft_model(build(), config)
    set_gates(model, "lora", OFF)
    set_gates(model, "adapter", OFF)
    with torch.no_grad():
        model.base_model.prefix_gate["default"][0].weight.normal_(std=1.0)
    inputs = batch(pad=True)
    got = logits(model, inputs)
    gate_layer = model.base_model.prefix_gate["default"][0]
    embeds = model.get_input_embeddings()(inputs["input_ids"])  # (B, L, hidden)
    table = model.base_model.prompt_encoder["default"].embedding.weight.detach()
    token_dim = model.peft_config["default"].token_dim
    for row in range(2):
        real = inputs["attention_mask"][row].bool()
        g = torch.sigmoid(linear(gate_layer, embeds[row, real])).mean(dim=0)  # (2,): key gate, value gate
        scaled = (table.view(N, 2, token_dim) * g.view(1, 2, 1)).reshape(N, -1)
        ref = peftkit.get_peft_model(
            build(), peftkit.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)
        )
        with torch.no_grad():
            ref.base_model.prompt_encoder["default"].embedding.weight.copy_(scaled)
        one = {k: v[row : row + 1] for k, v in inputs.items()}
        expected = logits(ref, one)[0, real]
        torch.testing.assert_close(got[row, real], expected, atol=1e-5, rtol=0)


def test_unipelt_gradients_reach_every_gate():
    model = unipelt("llama")
    inputs = batch()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    gates = {n: p for n, p in model.named_parameters() if "_gate" in n}
    assert len(gates) == 2 * 2 * 2 + 2 * 2 + 2 * 2  # lora (q, v) x 2 layers, adapters, prefix: weight + bias
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates.values()), [
        n for n, p in gates.items() if p.grad is None or not p.grad.any()
    ]


# -- both -----------------------------------------------------------------------------------------

CASES = [
    pytest.param(method, arch, id=f"{method}-{arch}")
    for method in ("mam", "unipelt")
    for arch in ("llama", "gpt2")
]
TRAINED = {
    "mam": (".adapter_", ".prompt_encoder."),
    "unipelt": (".adapter_", ".lora_", ".prompt_encoder.", "prefix_gate"),
}


def make(method: str, arch: str, **overrides) -> peftkit.PeftModel:
    cls = peftkit.MAMConfig if method == "mam" else peftkit.UniPELTConfig
    return wrap(arch, cls(**{**SMALL, **overrides}))


@pytest.mark.parametrize("method, arch", CASES)
def test_only_the_methods_parameters_train(method, arch):
    model = make(method, arch)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if any(part in n for part in TRAINED[method])}
    assert trainable == expected and trainable
    assert not any(".base_layer." in n for n in trainable)


@pytest.mark.parametrize("method, arch", CASES)
def test_save_and_load_into_a_fresh_base(method, arch, tmp_path):
    model = make(method, arch, adapter_init="random")
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    inputs = batch(pad=True)
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "prompt_embeddings" not in saved and any(".transform." in k for k in saved)  # the MLP is kept
    assert set(saved) == {f"base_model.{k}" for k in model.base_model.adapter_state_keys("default")}
    loaded = peftkit.PeftModel.from_pretrained(BUILD[arch](), tmp_path)
    assert type(loaded.peft_config["default"]) is type(model.peft_config["default"])
    torch.testing.assert_close(logits(loaded, inputs), expected, atol=1e-6, rtol=0)
    assert loaded.get_nb_trainable_parameters()[0] == 0
    trainable = peftkit.PeftModel.from_pretrained(BUILD[arch](), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()


@pytest.mark.parametrize("method, arch", CASES)
def test_disable_unload_and_merge(method, arch):
    base = BUILD[arch]()
    inputs = batch(pad=True)
    expected = logits(base, inputs)
    model = make(method, arch, adapter_init="random")
    assert not torch.allclose(logits(model, inputs), expected, atol=1e-4)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, inputs), expected, atol=0, rtol=0)
    model.base_model.set_adapter(None)
    torch.testing.assert_close(logits(model, inputs), expected, atol=0, rtol=0)
    model.base_model.set_adapter("default")
    with pytest.raises(PeftkitError, match="cannot be merged"):
        model.merge_and_unload()
    plain = model.unload()
    assert not any(hasattr(m, "base_layer") for m in plain.modules())
    torch.testing.assert_close(logits(plain, inputs), expected, atol=0, rtol=0)


@pytest.mark.parametrize("method, arch", CASES)
def test_generate_with_kv_cache_equals_step_by_step_argmax(method, arch):
    model = make(method, arch, adapter_init="random")
    if method == "unipelt":  # g_P from the prompt only, as generate computes it (see the model's docstring)
        set_gates(model, "prefix", 0.5)
    ids = batch()["input_ids"][:1]
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False
        )
        seq = ids
        for _ in range(5):
            step = (
                model(input_ids=seq, attention_mask=torch.ones_like(seq))
                .logits[:, -1]
                .argmax(-1, keepdim=True)
            )
            seq = torch.cat([seq, step], dim=1)
    assert torch.equal(out, seq)


def test_unipelt_refuses_seq2seq():
    from _tiny_models import tiny_t5_case

    with pytest.raises(PeftkitError, match="seq2seq"):
        peftkit.get_peft_model(
            tiny_t5_case().model, peftkit.UniPELTConfig(**{**SMALL, "task_type": "SEQ_2_SEQ_LM"})
        )


# -- UniPELT: a failure half-way leaves the user's model as it was ---------------------------------------


def model_state(model: torch.nn.Module) -> dict:
    """Everything a failed injection must not change: module objects, tensors, flags, hooks."""
    return {
        "modules": dict(model.named_modules()),
        "tensors": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
        "grads": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": {
            n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._forward_pre_hooks_with_kwargs))
            for n, m in model.named_modules()
        },
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = model_state(model)
    assert after["modules"].keys() == before["modules"].keys()
    assert all(after["modules"][n] is m for n, m in before["modules"].items())  # the same objects
    assert after["tensors"].keys() == before["tensors"].keys()
    assert all(torch.equal(after["tensors"][k], v) for k, v in before["tensors"].items())
    assert after["grads"] == before["grads"] and after["hooks"] == before["hooks"]


def fail_gates(*args, **kwargs):
    raise RuntimeError("cannot build the prefix gate")


UNIPELT_FAILURES = {
    # the LoRA layers (and the lm_head copy) are in, then the adapter site q_proj is a LoRA layer
    "adapter site taken": (dict(mlp_modules=["q_proj"], modules_to_save=["lm_head"]), "cannot adapt"),
    "no LoRA target": (dict(target_modules=["nope"]), r"target_modules=\['nope'\] matched no module"),
    "prefix gates": (dict(), "cannot build the prefix gate"),  # LoRA and adapters in, then the gates fail
}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("failure", UNIPELT_FAILURES)
def test_unipelt_failed_construction_leaves_the_model_as_it_was(arch, failure, monkeypatch):
    overrides, message = UNIPELT_FAILURES[failure]
    if failure == "adapter site taken" and arch == "gpt2":
        overrides = {**overrides, "mlp_modules": ["c_attn"]}  # GPT-2's LoRA target
    if failure == "prefix gates":
        monkeypatch.setattr("peftkit.methods.unipelt.model.make_gate", fail_gates)
    base = BUILD[arch]()
    before = model_state(base)
    out = logits(base, batch())
    with pytest.raises(Exception, match=message):
        peftkit.get_peft_model(base, peftkit.UniPELTConfig(**{**SMALL, **overrides}))
    assert_unchanged(base, before)
    torch.testing.assert_close(logits(base, batch()), out, atol=0, rtol=0)
    monkeypatch.undo()
    peftkit.get_peft_model(base, peftkit.UniPELTConfig(**SMALL))  # the model is still a clean base


@pytest.mark.parametrize("failure", UNIPELT_FAILURES)
def test_unipelt_failed_add_adapter_leaves_the_peft_model_as_it_was(failure, monkeypatch):
    overrides, message = UNIPELT_FAILURES[failure]
    model = unipelt("llama")
    set_gates(model, "prefix", ON)
    out = logits(model, batch(pad=True))
    before, configs = model_state(model), dict(model.peft_config)
    if failure == "prefix gates":
        monkeypatch.setattr("peftkit.methods.unipelt.model.make_gate", fail_gates)
    with pytest.raises(Exception, match=message):  # the LoRA layers get "second" before the adapters fail
        model.add_adapter("second", peftkit.UniPELTConfig(**{**SMALL, **overrides}))
    assert_unchanged(model, before)
    assert model.peft_config == configs and list(model.base_model.prompt_encoder) == ["default"]
    assert all("second" not in n for n in model.state_dict())
    torch.testing.assert_close(logits(model, batch(pad=True)), out, atol=0, rtol=0)
    monkeypatch.undo()
    model.add_adapter("second", peftkit.UniPELTConfig(**SMALL))  # works afterwards
    model.set_adapter("second")
    logits(model, batch())
    base = model.unload()  # the gate hooks' handles still reach the restored hook dicts
    assert not any(m._forward_pre_hooks for m in base.modules())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mam_failed_injection_half_way_leaves_the_model_as_it_was(arch, monkeypatch):
    """MAM shares UniPELT's add_adapter (prefix, then adapter layers): the second layer's adapter
    fails after the first is in; the model must come back exactly as it was."""
    from peftkit.methods.mam import model as mam_model

    real, calls = mam_model.add_bottleneck, []

    def fail_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("cannot add this adapter")
        return real(*args, **kwargs)

    monkeypatch.setattr(mam_model, "add_bottleneck", fail_on_second)
    base = BUILD[arch]()
    before = model_state(base)
    out = logits(base, batch())
    with pytest.raises(RuntimeError, match="cannot add this adapter"):
        peftkit.get_peft_model(base, peftkit.MAMConfig(**SMALL, modules_to_save=["lm_head"]))
    assert len(calls) == 2  # the first layer's adapter was in when the second failed
    assert_unchanged(base, before)
    torch.testing.assert_close(logits(base, batch()), out, atol=0, rtol=0)
    monkeypatch.undo()
    peftkit.get_peft_model(base, peftkit.MAMConfig(**SMALL))  # still a clean base
