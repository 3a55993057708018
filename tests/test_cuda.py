"""The CUDA paths: training, resume, parity with PEFT and generation on a GPU (skipped without one).

CI has no GPU; these run where one is lent (see README, "Checked on a GPU"). They cover what the
CPU suite cannot: SDPA attention and bf16 autocast chosen by `auto`, CUDA RNG state in checkpoints,
and numerics of the adapters on CUDA kernels.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import peftkit
from conftest import make_tiny_llama
from peftkit.train.loop import run_training, setup
from test_train_loop import ROWS, adapter_weights, job, read_metrics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_training_on_cuda_uses_sdpa_and_bf16_and_learns(tiny_model_dir, data_file, tmp_path):
    config = job(tiny_model_dir, data_file, tmp_path, max_steps=30, precision="auto", device="auto")
    session = setup(config)
    assert session.device.type == "cuda" and session.autocast_dtype is torch.bfloat16
    assert session.model.config._attn_implementation == "sdpa"
    run_training(config, progress=False, overwrite=True)
    losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


def test_resume_on_cuda_ends_with_the_same_adapter(tiny_model_dir, data_file, tmp_path):
    settings = dict(save_every=3, precision="fp32", device="cuda")
    run_training(job(tiny_model_dir, data_file, tmp_path / "straight", **settings), progress=False)
    interrupted = job(tiny_model_dir, data_file, tmp_path / "resumed", **settings)
    run_training(interrupted, progress=False, stop_after_step=5)
    run_training(interrupted, resume=True, progress=False)
    a, b = adapter_weights(tmp_path / "straight"), adapter_weights(tmp_path / "resumed")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


def test_lora_logits_on_cuda_equal_peft(tiny_tokenizer):
    peft = pytest.importorskip("peft")
    kwargs = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    theirs = peft.get_peft_model(make_tiny_llama(), peft.LoraConfig(**kwargs)).cuda().eval()
    ours = peftkit.get_peft_model(make_tiny_llama(), peftkit.LoraConfig(**kwargs)).cuda().eval()
    ours.load_state_dict(theirs.state_dict())
    ids = torch.randint(0, 400, (2, 12), device="cuda")
    with torch.no_grad():
        diff = (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-5


def test_greedy_generation_on_cuda_equals_cpu():
    config = peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peftkit.get_peft_model(make_tiny_llama(), config).eval()
    ids = torch.randint(3, 400, (2, 6))
    args = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cpu = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **args)
    model.cuda()
    gpu = model.generate(input_ids=ids.cuda(), attention_mask=torch.ones_like(ids).cuda(), **args)
    assert torch.equal(cpu, gpu.cpu())


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_on_cuda_matches_peft_and_trains(tmp_path, bits):
    """NF4 / int8 bases quantized by bitsandbytes on the GPU: same logits as PEFT, and LoRA learns."""
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from conftest import make_tiny_tokenizer
    from peftkit.models import load_model_and_tokenizer
    from peftkit.quantization import QuantizationConfig

    tok = make_tiny_tokenizer()
    make_tiny_llama(vocab_size=len(tok), hidden_size=64, intermediate_size=128).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    quant = QuantizationConfig(bits=bits, compute_dtype="bf16") if bits == 4 else QuantizationConfig(bits=8)

    def load():
        model, _ = load_model_and_tokenizer(tmp_path, quantization=quant, device_map={"": "cuda"})
        return model

    kwargs = dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(load(), peft.LoraConfig(**kwargs)).eval()
        ours = peftkit.get_peft_model(load(), peftkit.LoraConfig(**kwargs)).eval()
    ours.load_state_dict({k: v for k, v in theirs.state_dict().items() if ".lora_" in k}, strict=False)
    ids = torch.randint(3, 40, (2, 9), device="cuda")
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits.float(), theirs(input_ids=ids).logits.float()
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)  # same kernels; bf16/fp16 summation order
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()

    ours.train()
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = ours(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # a random tiny model with adapters on three layer types learns slowly but steadily
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_on_cuda_equals_unpacked(attention):
    """Sample packing through CUDA's attention kernels: same loss and gradients as padded rows."""
    from test_packing import _lora, check_packed_equals_unpacked

    base = make_tiny_llama(vocab_size=100)
    base.set_attn_implementation(attention)
    check_packed_equals_unpacked(_lora(base).cuda(), capacity=16, device="cuda")
