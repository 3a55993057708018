"""QLoRA: LoRA on a base model quantized by bitsandbytes (NF4 4-bit and LLM.int8() 8-bit), on the CPU.

PEFT is the oracle: on two copies of the same quantized tiny Llama (quantization is
deterministic, so the packed weights are identical), peftkit's and PEFT's LoRA must agree on
trainable counts and names, and give the same logits with the same adapter weights. Both run the
very same bitsandbytes kernel for the frozen part and an fp32 LoRA branch on top, so the only
difference is float summation order: the fp32 tolerance (1e-5) applies, not a quantization-sized
one. (Quantized vs unquantized logits differ by ~1e-2; that is bitsandbytes' business, not ours.)

The tiny Llama has hidden size 64: bitsandbytes 0.50.2's CPU 4-bit kernel dequantizes layers whose
in_features is not a multiple of its block size (64) wrongly, which peftkit detects at load time
(``test_cpu_kernel_layout_guard``).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from conftest import TINY_ROWS, make_tiny_llama, make_tiny_tokenizer, save_tiny_model_dir

pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes: pip install 'peftkit[qlora]'")
peft = pytest.importorskip("peft")

import bitsandbytes as bnb  # noqa: E402

from peftkit import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict  # noqa: E402
from peftkit.configuration import ConfigError  # noqa: E402
from peftkit.errors import ModelLoadError  # noqa: E402
from peftkit.methods.lora.bnb import LoraLinear4bit, LoraLinear8bitLt  # noqa: E402
from peftkit.models import load_model_and_tokenizer  # noqa: E402
from peftkit.quantization import (  # noqa: E402
    QuantizationConfig,
    prepare_model_for_kbit_training,
    weight_bytes,
)

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt")

QUANT = {
    4: QuantizationConfig(bits=4, quant_type="nf4", double_quant=True, compute_dtype="fp32"),
    8: QuantizationConfig(bits=8),
}
LAYER_TYPE = {4: (bnb.nn.Linear4bit, LoraLinear4bit), 8: (bnb.nn.Linear8bitLt, LoraLinear8bitLt)}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(
        tmp_path_factory.mktemp("tiny-llama-64"), hidden_size=64, intermediate_size=128
    )


def quantized(model_dir, bits: int):
    model, _ = load_model_and_tokenizer(model_dir, quantization=QUANT[bits])
    return model


def batch(vocab: int = 40) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 9), generator=torch.Generator().manual_seed(1))


def lora_config(**overrides):
    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    kwargs.update(overrides)
    return kwargs


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("bits", [4, 8])
def test_lora_on_quantized_base_matches_peft(model_dir, bits):
    torch.manual_seed(0)
    ours = get_peft_model(quantized(model_dir, bits), LoraConfig(**lora_config()))
    theirs = peft.get_peft_model(quantized(model_dir, bits), peft.LoraConfig(**lora_config()))
    base_type, lora_type = LAYER_TYPE[bits]
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, lora_type) and isinstance(layer.base_layer, base_type)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours_trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert ours_trainable == {n for n, p in theirs.named_parameters() if p.requires_grad}
    keys = set(peft.get_peft_model_state_dict(theirs))
    assert set(get_peft_model_state_dict(ours)) == keys
    theirs.load_state_dict(ours.state_dict(), strict=False)  # same (random, non-zero) LoRA weights
    ids = batch()
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max() <= 1e-5
    with ours.disable_adapter():  # the adapter changes the output: the comparison above means something
        assert (logits(ours, ids) - logits(theirs, ids)).abs().max() > 1e-3


def test_dora_on_nf4_base_matches_peft(model_dir):
    torch.manual_seed(0)
    config = lora_config(use_dora=True, init_lora_weights=True)
    ours = get_peft_model(quantized(model_dir, 4), LoraConfig(**config))
    theirs = peft.get_peft_model(quantized(model_dir, 4), peft.LoraConfig(**config))
    assert set(ours.state_dict()) - set(theirs.state_dict()) == set()
    # The magnitude starts at the row norms of the *dequantized* weight (B = 0).
    magnitude = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight"
    assert torch.allclose(ours.state_dict()[magnitude], theirs.state_dict()[magnitude], atol=1e-6)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                param.add_(torch.randn_like(param) * 0.1)
    theirs.load_state_dict(ours.state_dict(), strict=False)
    ids = batch()
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max() <= 1e-5


@pytest.mark.parametrize("bits", [4, 8])
def test_training_lowers_the_loss_and_leaves_quantized_weights_alone(model_dir, bits):
    torch.manual_seed(0)
    model = get_peft_model(quantized(model_dir, bits), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    base = model.base_model.model.model.layers[0].mlp.down_proj.base_layer
    packed = base.weight.data.clone()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = batch()
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert torch.equal(base.weight.data, packed) and base.weight.grad is None


@pytest.mark.parametrize("bits", [4, 8])
def test_save_load_into_fresh_quantized_base_and_into_peft(model_dir, bits, tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(quantized(model_dir, bits), LoraConfig(**lora_config()))
    ids = batch()
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4

    reloaded = PeftModel.from_pretrained(quantized(model_dir, bits), tmp_path)
    assert torch.equal(logits(reloaded, ids), expected)
    in_peft = peft.PeftModel.from_pretrained(quantized(model_dir, bits), tmp_path)
    assert (logits(in_peft, ids) - expected).abs().max() <= 1e-5


def test_peft_adapter_trained_on_nf4_loads_in_peftkit(model_dir, tmp_path):
    torch.manual_seed(0)
    theirs = peft.get_peft_model(quantized(model_dir, 4), peft.LoraConfig(**lora_config()))
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(quantized(model_dir, 4), tmp_path)
    ids = batch()
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max() <= 1e-5


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_and_unload_dequantizes_with_a_warning(model_dir, bits):
    torch.manual_seed(0)
    model = get_peft_model(quantized(model_dir, bits), LoraConfig(**lora_config()))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    delta = layer.delta_weight("default")
    ids = batch()
    expected = logits(model, ids)
    with pytest.warns(UserWarning, match=f"merging LoRA into a {bits}-bit layer"):
        merged = model.merge_and_unload()
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear and q_proj.weight.dtype == torch.float32
    original = load_model_and_tokenizer(model_dir)[0].model.layers[0].self_attn.q_proj.weight
    # The merged weight is the quantized weight plus the update: within one quantization step of
    # the original weight plus the update (4-bit: a code-book gap of at most 0.33 x block absmax;
    # 8-bit: row absmax / 127).
    error = (q_proj.weight - (original + delta)).abs()
    if bits == 4:
        blocks = original.detach().reshape(-1, 64).abs().amax(1, keepdim=True)
        assert (error.reshape(-1, 64) <= 0.17 * blocks + 1e-6).all()
        # Same numbers as the unmerged model: dequant(W) x + B (A x) s vs (dequant(W) + B A s) x,
        # fp32 rounding only.
        torch.testing.assert_close(logits(merged, ids), expected, atol=1e-5, rtol=1e-5)
    else:
        assert (error <= original.detach().abs().amax(1, keepdim=True) / 127 + 1e-6).all()
        # LLM.int8() also quantizes the activations, which the dense merged layer no longer does.
        assert (logits(merged, ids) - expected).abs().max() <= 0.1 * expected.abs().max()


def test_weight_memory_of_quantized_bases(model_dir, capsys):
    """Reported, not timed: bytes of the quantizable (linear-layer) weights at each precision."""

    def linear_bytes(model):
        layers = [m for n, m in model.named_modules() if n.endswith(tuple(TARGETS))]
        return sum(weight_bytes(m) for m in layers)

    dense = load_model_and_tokenizer(model_dir, dtype="bfloat16")[0]
    sizes = {"bf16": linear_bytes(dense), "int8": linear_bytes(quantized(model_dir, 8))}
    sizes["nf4"] = linear_bytes(quantized(model_dir, 4))
    with capsys.disabled():
        print("\nlinear-layer weight bytes: " + ", ".join(f"{k} {v:,d}" for k, v in sizes.items()))
    n_weights = sizes["bf16"] // 2
    assert sizes["nf4"] < sizes["int8"] < sizes["bf16"]
    assert sizes["nf4"] * 8 / n_weights < 4.2  # 4 bits per weight plus double-quantized scales
    assert sizes["int8"] * 8 / n_weights < 8.6  # 8 bits plus one fp32 scale per output row


def test_prepare_model_for_kbit_training_matches_peft(model_dir):
    ours = prepare_model_for_kbit_training(quantized(model_dir, 4), use_gradient_checkpointing=False)
    theirs = peft.prepare_model_for_kbit_training(quantized(model_dir, 4), use_gradient_checkpointing=False)
    ours_params, theirs_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert ours_params.keys() == theirs_params.keys()
    for name, param in ours_params.items():
        assert (param.dtype, param.requires_grad) == (
            theirs_params[name].dtype,
            theirs_params[name].requires_grad,
        )


def test_cpu_kernel_layout_guard(tmp_path, monkeypatch):
    """hidden_size 32 is not a multiple of the 4-bit block size (64). bitsandbytes' CPU kernel
    dequantizes such layers wrongly on some CPUs (seen on AVX512 machines, bitsandbytes 0.50.2)
    and rightly on others (AVX2). Where it is wrong, loading refuses and names skip_modules;
    where it is right, the layers load. A kernel made wrong is refused on every machine, and
    skipping the narrow layers loads."""
    import peftkit.quantization as quantization

    tok = make_tiny_tokenizer()
    make_tiny_llama(vocab_size=len(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with monkeypatch.context() as patch:  # this machine's kernel, measured without the guard
        patch.setattr(quantization, "check_cpu_4bit_layers", lambda model: None)
        unguarded, _ = load_model_and_tokenizer(tmp_path, quantization={"bits": 4})
    narrow = [m for m in unguarded.modules() if isinstance(m, bnb.nn.Linear4bit) and m.in_features == 32]
    assert narrow
    if quantization.misdequantized_cpu_4bit_layers(unguarded):
        with pytest.raises(ModelLoadError, match="skip_modules"):
            load_model_and_tokenizer(tmp_path, quantization={"bits": 4})
    else:
        load_model_and_tokenizer(tmp_path, quantization={"bits": 4})  # nothing to refuse
    kernel = bnb.functional.dequantize_4bit
    monkeypatch.setattr(bnb.functional, "dequantize_4bit", lambda *args, **kw: kernel(*args, **kw) * 1.5)
    with pytest.raises(ModelLoadError, match="skip_modules"):  # a wrong kernel, on every machine
        load_model_and_tokenizer(tmp_path, quantization={"bits": 4})
    skipped = ["lm_head", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]
    model, _ = load_model_and_tokenizer(tmp_path, quantization={"bits": 4, "skip_modules": skipped})
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)  # in_features 64
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear


def test_quantization_config_validation_and_bnb_config():
    from peftkit.train.config import build_job_config

    with pytest.raises(ConfigError, match=r"'quantization.bits' must be 4 or 8"):
        build_job_config({"method": "lora", "quantization": {"bits": 3}})
    with pytest.raises(ConfigError, match=r"'quantization.quant_type' must be one of"):
        build_job_config({"method": "lora", "quantization": {"quant_type": "nf3"}})
    with pytest.raises(ConfigError, match="cannot train on a quantized base model"):
        build_job_config({"method": "ia3", "quantization": {"bits": 4}})
    job = build_job_config({"method": "lora", "quantization": {"bits": 4}})
    assert job.to_yaml_dict()["quantization"]["quant_type"] == "nf4"
    assert build_job_config({"method": "lora"}).quantization is None
    config = QuantizationConfig(bits=4, quant_type="fp4", double_quant=False, skip_modules=["mlp"])
    bnb_config = config.to_bnb_config(torch.bfloat16)
    assert bnb_config.load_in_4bit and bnb_config.bnb_4bit_quant_type == "fp4"
    assert bnb_config.bnb_4bit_compute_dtype == torch.bfloat16 and not bnb_config.bnb_4bit_use_double_quant
    assert bnb_config.llm_int8_skip_modules == ["mlp"]
    assert QuantizationConfig(bits=8).to_bnb_config().load_in_8bit


def test_pissa_on_a_quantized_base_is_refused(model_dir):
    with pytest.raises(ValueError, match="quantized here"):
        get_peft_model(
            quantized(model_dir, 4), LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa")
        )


@pytest.mark.parametrize("bits", [4, 8])
def test_peftkit_train_with_quantization(model_dir, tmp_path, bits):
    from peftkit.train.config import build_job_config
    from peftkit.train.loop import run_training

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS))
    job = build_job_config(
        {
            "base_model": str(model_dir),
            "method": "lora",
            "lora": {"r": 8, "lora_alpha": 16, "target_modules": TARGETS},
            "quantization": {"bits": bits},
            "data": {"train": str(data), "test_size": 4},
            "training": {"max_steps": 12, "batch_size": 4, "learning_rate": 1e-2, "seed": 7},
            "evaluation": {"accuracy_after": False},
            "output_dir": str(tmp_path / "run"),
        }
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_training(job, progress=False)
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    losses = [loss for loss in losses if loss is not None]
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA"


def test_evaluation_before_training_keeps_4bit_layers_trainable(model_dir):
    """bitsandbytes repacks 4-bit CPU weights in place for a forward-only kernel on an eval forward;
    peftkit's loader stops that, so gradients after an evaluation equal those of a fresh model."""

    def first_layer_grad(evaluate_first: bool) -> torch.Tensor:
        model = quantized(model_dir, 4)
        if evaluate_first:
            logits(model, batch())
        torch.manual_seed(0)
        peft_model = get_peft_model(model, LoraConfig(**lora_config(target_modules=["q_proj"])))
        peft_model.train()
        ids = batch()
        peft_model(input_ids=ids, labels=ids).loss.backward()
        return peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.grad

    fresh = first_layer_grad(False)
    assert fresh.abs().sum() > 0
    assert torch.allclose(first_layer_grad(True), fresh, atol=1e-6)
