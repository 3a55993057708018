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


SPM_SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def make_tiny_spm_tokenizer(scheme: str = "prepend", drop_last_merge: bool = False):
    """A SentencePiece-style tokenizer (byte-fallback BPE over "▁"-escaped text, 256 byte tokens, adds
    <s>) as Llama 2's: ``scheme`` "prepend" (SentencePiece's dummy prefix: a Prepend normalizer, kept
    as tokenizer.json says), or LlamaTokenizer's Metaspace "always" (legacy=True) / "first"
    (legacy=False). Merges are completed from the vocabulary as transformers converts SentencePiece
    models (``generate_merges``); ``drop_last_merge`` leaves one token no merge produces, which
    llama.cpp would still form."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    from conftest import _CORPUS, CHATML_TEMPLATE

    trainer_tok = Tokenizer(models.BPE(byte_fallback=True))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    specials = SPM_SPECIALS + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, min_frequency=1, special_tokens=specials)
    trainer_tok.train_from_iterator(_CORPUS * 4, trainer)
    vocab = json.loads(trainer_tok.to_str())["model"]["vocab"]
    merges = generate_merges(vocab, {t: -float(i) for t, i in vocab.items()}, skip_tokens=set(specials))
    if drop_last_merge:
        merges = merges[:-1]
    tok = LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        legacy=scheme != "first",
        add_bos_token=True,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if scheme == "prepend":
        backend = tok.backend_tokenizer
        backend.pre_tokenizer = None
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
        )
        tok = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        )
    tok.pad_token = "<unk>"
    tok.chat_template = CHATML_TEMPLATE
    return tok


def save_spm_llama_dir(path: Path, scheme: str, drop_last_merge: bool = False) -> Path:
    """A tiny Llama (as Llama 2) with a SentencePiece-style tokenizer of ``scheme``, as saved on disk
    (LlamaTokenizer's ``legacy`` written to tokenizer_config.json, which it does not save itself)."""
    tok = make_tiny_spm_tokenizer(scheme, drop_last_merge)
    model = make_tiny_llama(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=0
    )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if scheme != "prepend":
        config_file = path / "tokenizer_config.json"
        config_file.write_text(
            json.dumps({**json.loads(config_file.read_text()), "legacy": scheme == "always"})
        )
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
