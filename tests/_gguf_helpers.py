"""Tiny models, adapters and GGUF readers shared by the ``peftkit export`` tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import peftkit
from _serve_helpers import save_random_adapter
from conftest import make_tiny_llama, make_tiny_tokenizer
from peftkit.export import export_gguf

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = [5, 17, 42, 99, 7, 3, 250, 311, 12, 64, 128, 200]


def save_arch_dir(path: Path, arch: str = "Llama", **overrides) -> Path:
    """A tiny model of ``arch`` with the tiny tokenizer, random biases (so their layout matters)."""
    from _tiny_models import make_tiny_gqa

    tok = make_tiny_tokenizer()
    common = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if arch == "Llama":
        model = make_tiny_llama(initializer_range=0.2, **common, **overrides)
    else:
        model = make_tiny_gqa(arch, initializer_range=0.2, **common, **overrides)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def lora_config(**overrides) -> peftkit.LoraConfig:
    settings = dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR, task_type="CAUSAL_LM")
    settings.update(overrides)
    return peftkit.LoraConfig(**settings)


def merged_model(adapter_dir: Path):
    from peftkit.auto import load_adapter_with_base

    peft_model, tokenizer = load_adapter_with_base(adapter_dir, task="causal_lm")
    return peft_model.merge_and_unload(), tokenizer


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def gguf_file(out: Path, role: str = "model") -> Path:
    return out / json.loads((out / "peftkit_export.json").read_text())["files"][role]


def reader_values(path: Path) -> dict:
    import gguf

    from peftkit.export.gguf_source import _field_value

    reader = gguf.GGUFReader(path)
    return {key: _field_value(field) for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def reader_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    """``{name: (type, ne shape, values as float32 in torch layout)}``."""
    import gguf
    from gguf.quants import dequantize

    out = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(n) for n in t.shape)
        values = dequantize(t.data, t.tensor_type).reshape(tuple(reversed(shape)))
        out[t.name] = (t.tensor_type.name, shape, values.astype(np.float32))
    return out


def tiny_exports(tmp_path_factory):
    """A tiny Llama, a random all-linear LoRA adapter on it, and its F32 / F16 exports."""
    root = tmp_path_factory.mktemp("gguf-tiny")
    model_dir = save_arch_dir(root / "model")
    adapter = Path(save_random_adapter(model_dir, root / "run" / "adapter", lora_config(), seed=1))
    exports = {t: root / f"out-{t}" for t in ("f32", "f16")}
    for outtype, out in exports.items():
        export_gguf(adapter, out, outtype=outtype)
    return model_dir, adapter, exports
