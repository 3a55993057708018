"""`peftkit export --format gguf`: the GGUF files are checked by the programs that read them.

Oracles, strongest first:

* llama.cpp itself (llama-cpp-python, compiled from source; the tests that need it skip without
  it): logits / greedy continuations of the exported model equal transformers' merged fp32
  model's; the --lora-only adapter on the base model's GGUF equals the merged export; its
  tokenizer and chat template give transformers' token ids.
* transformers' own GGUF reader (it undoes the q/k permutation independently): an F32 export
  loads back to exactly the merged model's logits, for Llama, Mistral and Qwen2.
* Go's text/template, Ollama's template engine (skipped without `go`): the Modelfile's TEMPLATE
  renders transformers' chat prompts.
* gguf.GGUFReader: metadata, tensor names / types / shapes, the LoRA layout, the tokenizer keys
  against the embedded model's original GGUF.

Slow tests (the embedded SmolLM2, ~60 s together) are marked ``slow``; the rest take ~15 s.

Tolerances on the tiny random models (hidden size 32, logits up to ~5), from measurements with
~2.5x headroom. F16 rounds each weight to 11 significant bits and llama.cpp's F16 matmuls round
activations too: logits move by at most ~0.03 (mean ~0.003). Q8_0 keeps 8 bits per weight, and
these deliberately sensitive models (initializer_range 0.2) amplify it: with the GGUF's own Q8_0
weights dequantized, transformers' logits already move by up to ~0.4, and llama.cpp's Q8_0
matmuls also quantize activations to 8 bits: up to ~0.43, mean ~0.05. A layout error (a wrong
permutation, a transposed matrix) moves every logit by about its own size (mean ~1).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import peftkit
from _serve_helpers import save_random_adapter
from conftest import make_tiny_llama, make_tiny_tokenizer
from peftkit.configuration import ConfigError
from peftkit.errors import PeftkitError
from peftkit.export import export_gguf
from peftkit.export.gguf_model import permute_rows

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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama, a random all-linear LoRA adapter on it, and its F32 / F16 exports."""
    root = tmp_path_factory.mktemp("gguf-tiny")
    model_dir = save_arch_dir(root / "model")
    adapter = Path(save_random_adapter(model_dir, root / "run" / "adapter", lora_config(), seed=1))
    exports = {t: root / f"out-{t}" for t in ("f32", "f16")}
    for outtype, out in exports.items():
        export_gguf(adapter, out, outtype=outtype)
    return model_dir, adapter, exports


# -- metadata, tensors and layout (gguf.GGUFReader) ---------------------------------------------------


def test_merged_gguf_has_llama_metadata_tokenizer_and_every_tensor(tiny):
    model_dir, adapter, exports = tiny
    path = gguf_file(exports["f16"])
    assert path.name == "run-F16.gguf"  # OUTPUT_DIR/adapter is named after OUTPUT_DIR
    values = reader_values(path)
    assert values["general.architecture"] == "llama" and values["general.type"] == "model"
    assert values["general.file_type"] == 1  # MOSTLY_F16
    expected = {
        "llama.block_count": 2,
        "llama.context_length": 256,
        "llama.embedding_length": 32,
        "llama.feed_forward_length": 64,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 8,
        "llama.vocab_size": 400,
    }
    assert {key: values[key] for key in expected} == expected
    assert values["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert values["llama.rope.freq_base"] == pytest.approx(10000.0)
    tok = make_tiny_tokenizer()
    assert values["tokenizer.ggml.model"] == "gpt2" and values["tokenizer.ggml.pre"] == "gpt-2"
    assert len(values["tokenizer.ggml.tokens"]) == 400
    assert values["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert values["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]  # control, ..., normal
    assert values["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert values["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert "tokenizer.ggml.bos_token_id" not in values  # the tiny tokenizer has none
    assert values["tokenizer.ggml.add_bos_token"] is False and values["tokenizer.ggml.add_eos_token"] is False
    assert values["tokenizer.chat_template"] == tok.chat_template

    merged, _ = merged_model(adapter)
    tensors = reader_tensors(path)
    state = merged.state_dict()
    assert len(tensors) == len(state) == 3 + 2 * 9  # embed, norm, head + 9 per layer
    for name, (kind, _, _values) in tensors.items():
        if name.endswith("norm.weight"):
            assert kind == "F32", name
        else:
            assert kind == "F16", name
    q = state["model.layers.1.self_attn.q_proj.weight"]
    k = state["model.layers.1.self_attn.k_proj.weight"]
    np.testing.assert_allclose(tensors["blk.1.attn_q.weight"][2], permute_rows(q, 4).numpy(), atol=2e-3)
    np.testing.assert_allclose(tensors["blk.1.attn_k.weight"][2], permute_rows(k, 2).numpy(), atol=2e-3)
    v = state["model.layers.1.self_attn.v_proj.weight"]
    np.testing.assert_allclose(tensors["blk.1.attn_v.weight"][2], v.numpy(), atol=2e-3)
    assert tensors["output.weight"][1] == (32, 400)  # ne: [n_embd, n_vocab]
    modelfile = (exports["f16"] / "Modelfile").read_text()
    assert "FROM ./run-F16.gguf\n" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


@pytest.mark.parametrize("arch", ["Llama", "Mistral", "Qwen2"])
def test_f32_export_loads_back_in_transformers_exactly(arch, tmp_path):
    """transformers' GGUF reader undoes llama.cpp's q/k permutation on its own: F32 logits equal.

    (It builds a Llama without biases from any GGUF, so Llama's optional biases are left to the
    llama.cpp tests; Qwen2's q/k/v biases are checked here.)"""
    from transformers import AutoModelForCausalLM, GgufConfig

    model_dir = save_arch_dir(tmp_path / "model", arch)
    adapter = save_random_adapter(model_dir, tmp_path / "adapter", lora_config(), seed=2)
    summary = export_gguf(adapter, tmp_path / "out", outtype="f32")
    assert summary.gguf_architecture == ("qwen2" if arch == "Qwen2" else "llama")
    merged, _ = merged_model(Path(adapter))
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out",
        gguf_file=summary.files["model"],
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    np.testing.assert_allclose(hf_logits(loaded, IDS), hf_logits(merged, IDS), atol=1e-5)


def test_tied_embeddings_write_no_output_tensor(tmp_path):
    model_dir = save_arch_dir(tmp_path / "model", tie_word_embeddings=True)
    adapter = save_random_adapter(model_dir, tmp_path / "adapter", lora_config(), seed=3)
    summary = export_gguf(adapter, tmp_path / "out")
    names = set(reader_tensors(tmp_path / "out" / summary.files["model"]))
    assert "token_embd.weight" in names and "output.weight" not in names


def test_q8_0_and_bf16_types(tiny, tmp_path):
    _, adapter, _ = tiny
    for outtype, kind, file_type in (("q8_0", "Q8_0", 7), ("bf16", "BF16", 32)):
        summary = export_gguf(adapter, tmp_path / outtype, outtype=outtype)
        path = tmp_path / outtype / summary.files["model"]
        kinds = {name: t[0] for name, t in reader_tensors(path).items()}
        assert kinds["blk.0.attn_q.weight"] == kind and kinds["blk.0.attn_norm.weight"] == "F32"
        assert reader_values(path)["general.file_type"] == file_type


def test_lora_only_layout_reconstructs_the_merged_weights(tiny, tmp_path):
    """base + (alpha / r) * B A with llama.cpp's shapes and names is the merged export, q/k included."""
    _, adapter, exports = tiny
    summary = export_gguf(adapter, tmp_path / "lora", outtype="f32", lora_only=True, with_base=True)
    assert summary.lora == {"alpha": 8.0, "layers": 14, "folded_layers": 0}
    path = tmp_path / "lora" / summary.files["adapter"]
    values = reader_values(path)
    assert values["general.type"] == "adapter" and values["adapter.type"] == "lora"
    assert values["general.architecture"] == "llama" and values["adapter.lora.alpha"] == 8.0
    lora = reader_tensors(path)
    assert lora["blk.0.attn_k.weight.lora_a"][1] == (32, 4)  # ne: [n_in, r]
    assert lora["blk.0.attn_k.weight.lora_b"][1] == (4, 16)  # ne: [r, n_out]
    base = reader_tensors(tmp_path / "lora" / summary.files["base"])
    merged = reader_tensors(gguf_file(exports["f32"]))
    for name in [n[: -len(".lora_a")] for n in lora if n.endswith(".lora_a")]:
        update = 8.0 / 4 * lora[f"{name}.lora_b"][2] @ lora[f"{name}.lora_a"][2]
        np.testing.assert_allclose(base[name][2] + update, merged[name][2], atol=1e-5, err_msg=name)
    modelfile = (tmp_path / "lora" / "Modelfile").read_text()
    assert f"FROM ./{summary.files['base']}\n" in modelfile
    assert f"ADAPTER ./{summary.files['adapter']}\n" in modelfile


@pytest.mark.parametrize(
    "overrides",
    [
        {"use_rslora": True},
        {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"down_proj": 3}},
        {"lora_alpha": 0},
    ],
    ids=["rslora", "patterns", "alpha0"],
)
def test_lora_only_folds_scalings_gguf_cannot_express(overrides, tmp_path):
    model_dir = save_arch_dir(tmp_path / "model")
    adapter = save_random_adapter(model_dir, tmp_path / "adapter", lora_config(**overrides), seed=5)
    merged = export_gguf(adapter, tmp_path / "merged", outtype="f32")
    summary = export_gguf(adapter, tmp_path / "lora", outtype="f32", lora_only=True, with_base=True)
    assert summary.lora["folded_layers"] > 0
    alpha = summary.lora["alpha"]
    lora = reader_tensors(tmp_path / "lora" / summary.files["adapter"])
    base = reader_tensors(tmp_path / "lora" / summary.files["base"])
    full = reader_tensors(tmp_path / "merged" / merged.files["model"])
    for name in [n[: -len(".lora_a")] for n in lora if n.endswith(".lora_a")]:
        b, a = lora[f"{name}.lora_b"][2], lora[f"{name}.lora_a"][2]
        update = alpha / b.shape[1] * b @ a  # llama.cpp: alpha / r, r = B's columns
        np.testing.assert_allclose(base[name][2] + update, full[name][2], atol=1e-5, err_msg=name)


def test_lora_only_embedding_layout(tmp_path):
    """LoRA on embed_tokens: lora_a is A transposed ([r, n_vocab]), as llama.cpp gathers its rows."""
    model_dir = save_arch_dir(tmp_path / "model")
    config = lora_config(target_modules=["embed_tokens", "q_proj"])
    adapter = save_random_adapter(model_dir, tmp_path / "adapter", config, seed=6)
    summary = export_gguf(adapter, tmp_path / "lora", outtype="f32", lora_only=True, with_base=True)
    merged = export_gguf(adapter, tmp_path / "merged", outtype="f32")
    lora = reader_tensors(tmp_path / "lora" / summary.files["adapter"])
    assert lora["token_embd.weight.lora_a"][1] == (4, 400) and lora["token_embd.weight.lora_b"][1] == (4, 32)
    base = reader_tensors(tmp_path / "lora" / summary.files["base"])["token_embd.weight"][2]
    full = reader_tensors(tmp_path / "merged" / merged.files["model"])["token_embd.weight"][2]
    update = 2.0 * lora["token_embd.weight.lora_a"][2] @ lora["token_embd.weight.lora_b"][2].T
    np.testing.assert_allclose(base + update, full, atol=1e-5)


# -- the tokenizer -----------------------------------------------------------------------------------


def test_pre_tokenizer_recognised_from_tokenizer_json_definitions():
    from peftkit.export.gguf_vocab import _LLAMA3_REGEX, _QWEN2_REGEX, _pre_tokenizer_from_definition

    def spec(pre, normalizer=None, ignore_merges=False):
        return {"normalizer": normalizer, "pre_tokenizer": pre, "model": {"ignore_merges": ignore_merges}}

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}

    def split(regex):
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}, byte_level
        ]}  # fmt: skip

    gpt2 = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, gpt2]}
    assert _pre_tokenizer_from_definition(spec(gpt2)) == "gpt-2"
    assert _pre_tokenizer_from_definition(spec(digits)) == "smollm"
    assert _pre_tokenizer_from_definition(spec(split(_LLAMA3_REGEX), ignore_merges=True)) == "llama-bpe"
    assert _pre_tokenizer_from_definition(spec(split(_QWEN2_REGEX), {"type": "NFC"})) == "qwen2"
    # near misses are not guessed
    assert _pre_tokenizer_from_definition(spec(split(_LLAMA3_REGEX))) is None  # merges not ignored
    assert _pre_tokenizer_from_definition(spec(split(_QWEN2_REGEX))) is None  # no NFC
    assert _pre_tokenizer_from_definition(spec({**gpt2, "add_prefix_space": True})) is None
    assert _pre_tokenizer_from_definition(spec({"type": "Whitespace"})) is None


def test_unknown_pre_tokenizer_is_refused(tmp_path, monkeypatch):
    from tokenizers import pre_tokenizers

    import peftkit.auto

    tok = make_tiny_tokenizer()
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    model = make_tiny_llama(vocab_size=len(tok), eos_token_id=tok.eos_token_id)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    adapter = save_random_adapter(tmp_path / "model", tmp_path / "adapter", lora_config(), seed=1)
    monkeypatch.setattr(peftkit.auto, "load_adapter_with_base", None)  # refused before the model loads
    with pytest.raises(PeftkitError, match="pre-tokenizer is not one llama.cpp is known to reproduce"):
        export_gguf(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sentencepiece_style_tokenizer_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import peftkit.auto

    spm = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    spm.pre_tokenizer = pre_tokenizers.Metaspace()
    spm.train_from_iterator(["hello world, the quick brown fox"] * 8, trainers.BpeTrainer(vocab_size=120))
    tok = PreTrainedTokenizerFast(tokenizer_object=spm, unk_token="<unk>", eos_token="<unk>")
    make_tiny_llama(vocab_size=len(tok), eos_token_id=tok.eos_token_id).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    adapter = save_random_adapter(tmp_path / "model", tmp_path / "adapter", lora_config(), seed=1)
    monkeypatch.setattr(peftkit.auto, "load_adapter_with_base", None)  # must not be reached
    with pytest.raises(PeftkitError, match="SentencePiece-style vocabulary .* convert_hf_to_gguf.py"):
        export_gguf(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_embedded_model_vocab_equals_its_original_gguf():
    """Built from the transformers tokenizer, the SmolLM2 vocabulary is the original GGUF's, key by key."""
    from peftkit.export.gguf_source import _read_with_reader, read_tokenizer_fields, source_gguf
    from peftkit.export.gguf_vocab import build_vocab
    from peftkit.models import load_model_and_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir("smollm2-135m-instruct")
    _, tokenizer = load_model_and_tokenizer(model_dir)
    vocab = build_vocab(tokenizer, 49152)
    fields = read_tokenizer_fields(source_gguf(model_dir))
    assert fields == _read_with_reader(source_gguf(model_dir))  # the quick KV parser reads what gguf reads
    original = {key: value for key, (_, value) in fields.items()}
    assert vocab.pre == original["tokenizer.ggml.pre"] == "smollm"  # by the check-text hash
    assert vocab.tokens == original["tokenizer.ggml.tokens"]
    assert vocab.token_types == original["tokenizer.ggml.token_type"]
    assert vocab.merges == original["tokenizer.ggml.merges"]
    for kind, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        assert vocab.special_ids[kind] == original[f"tokenizer.ggml.{key}_token_id"], kind
    assert vocab.add_bos is original["tokenizer.ggml.add_bos_token"] is False


# -- the Modelfile -----------------------------------------------------------------------------------


def test_chat_template_families_are_recognised_by_behaviour():
    from peftkit.export.modelfile import recognise

    tok = make_tiny_tokenizer()
    found = recognise(tok, add_bos=False)
    assert found.family.name == "chatml" and found.default_system is None
    tok.chat_template = tok.chat_template.replace(
        "{% for message in messages %}",
        "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nBe kind.<|im_end|>\n' }}{% endif %}"
        "{% for message in messages %}",
    )
    assert recognise(tok, add_bos=False).default_system == "Be kind."
    tok.chat_template = tok.chat_template.replace("message['content']", "message['content'] | trim")
    assert recognise(tok, add_bos=False) is None  # trims content: not exactly ChatML
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
        " + m['content'] + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    )
    tok.bos_token = "<|im_start|>"  # any token: the template writes it first
    assert recognise(tok, add_bos=True).family.name == "llama3"
    assert recognise(tok, add_bos=False) is None  # then the Go template would lack the bos text


def test_untranslatable_template_leaves_template_to_ollama(tmp_path):
    tok = make_tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    model = make_tiny_llama(vocab_size=len(tok), eos_token_id=tok.eos_token_id)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    adapter = save_random_adapter(tmp_path / "model", tmp_path / "adapter", lora_config(), seed=1)
    summary = export_gguf(adapter, tmp_path / "out")
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert "\nTEMPLATE" not in modelfile and "# TEMPLATE: not written" in modelfile
    assert any("no TEMPLATE" in note for note in summary.notes)
    assert (
        reader_values(tmp_path / "out" / summary.files["model"])["tokenizer.chat_template"]
        == tok.chat_template
    )


# -- refusals and the output directory ---------------------------------------------------------------


def test_unsupported_architecture_is_refused_up_front(tmp_path):
    from _tiny_models import make_tiny_gpt2

    tok = make_tiny_tokenizer()
    make_tiny_gpt2(vocab_size=len(tok)).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    config = peftkit.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    adapter = save_random_adapter(tmp_path / "gpt2", tmp_path / "adapter", config, seed=1)
    with pytest.raises(
        PeftkitError, match="does not support the architecture GPT2LMHeadModel: it supports Llama"
    ):
        export_gguf(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (peftkit.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]), "IA3"),
        (lora_config(use_dora=True), "DoRA"),
        (lora_config(modules_to_save=["lm_head"]), "modules_to_save"),
    ],
    ids=["ia3", "dora", "modules_to_save"],
)
def test_lora_only_refuses_what_gguf_lora_cannot_hold(config, message, tiny, tmp_path):
    model_dir, _, _ = tiny
    adapter = save_random_adapter(model_dir, tmp_path / "adapter", config, seed=1)
    with pytest.raises(
        PeftkitError, match=f"cannot export .* as a GGUF LoRA adapter: .*{message}.*merged model"
    ):
        export_gguf(adapter, tmp_path / "out", lora_only=True)
    assert not (tmp_path / "out").exists()
    export_gguf(adapter, tmp_path / "merged", outtype="q8_0")  # the merged export holds any of them


def test_output_directory_checks(tiny, tmp_path):
    _, adapter, exports = tiny
    for out, where in ((adapter, "is"), (adapter / "gguf", "is inside"), (adapter.parent, "contains")):
        with pytest.raises(ConfigError, match=f"OUT_DIR {out} {where} the input directory"):
            export_gguf(adapter, out, overwrite=True)
    before = sorted(p.name for p in exports["f16"].iterdir())
    with pytest.raises(ConfigError, match="is not empty; pass --overwrite"):
        export_gguf(adapter, exports["f16"])
    assert sorted(p.name for p in exports["f16"].iterdir()) == before
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("x")
    export_gguf(adapter, tmp_path / "out", overwrite=True, outtype="q8_0")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "Modelfile", "peftkit_export.json", "run-Q8_0.gguf"
    ]  # fmt: skip


def test_cli_command(tiny, tmp_path, capsys):
    from peftkit.cli import export as command

    _, adapter, _ = tiny
    parser = argparse.ArgumentParser(prog="peftkit export")
    command.add_arguments(parser)
    args = parser.parse_args([str(adapter), str(tmp_path / "out"), "--format", "gguf", "--outtype", "q8_0"])
    assert command.run(args) == 0
    printed = capsys.readouterr().out
    assert "merged model exported to" in printed and "run-Q8_0.gguf" in printed and "ollama create" in printed
    args = parser.parse_args([str(adapter), str(tmp_path / "out"), "--lora-only"])
    with pytest.raises(ConfigError, match="not empty"):
        command.run(args)
    with pytest.raises(SystemExit):
        parser.parse_args([str(adapter), str(tmp_path / "x"), "--outtype", "q4_k"])


# -- llama.cpp itself (llama-cpp-python) --------------------------------------------------------------

# Tolerances on the tiny random models' logits (|logits| up to ~5): (max, mean) absolute difference
# (see the module docstring for the measured values).
TOLERANCE = {"f16": (0.08, 0.01), "q8_0": (1.0, 0.15)}


OPENED: list = []  # llama.cpp models, closed at the end of the module (not at interpreter exit)


@pytest.fixture(scope="module")
def llama_cpp():
    # llama.cpp's OpenMP threads (its own libgomp, read at import) sleep between calls instead of
    # spinning: here they alternate with torch's threads on the same cores, and spinning threads
    # of one runtime starve the other (SmolLM2 comparisons: 70 s -> 14 s on 2 cores).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    module = pytest.importorskip("llama_cpp")
    yield module
    while OPENED:
        OPENED.pop().close()


def load_llama(llama_cpp, path: Path, lora: Path | None = None, n_ctx: int = 256, **options):
    options = {"logits_all": True, "seed": 0, "n_threads": 2, **options}
    llm = llama_cpp.Llama(
        model_path=str(path),
        lora_path=None if lora is None else str(lora),
        n_ctx=n_ctx,
        verbose=False,
        **options,
    )
    OPENED.append(llm)
    return llm


def cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
@pytest.mark.parametrize("arch", ["Llama", "Mistral", "Qwen2"])
def test_llama_cpp_runs_merged_tiny_exports(llama_cpp, arch, outtype, tmp_path):
    """llama.cpp's logits of the export equal transformers' merged fp32 model's, token ids fed directly
    (Llama with attention and MLP biases: the q/k bias permutation is exercised too)."""
    overrides = {"attention_bias": True, "mlp_bias": True} if arch == "Llama" else {}
    model_dir = save_arch_dir(tmp_path / "model", arch, **overrides)
    adapter = save_random_adapter(model_dir, tmp_path / "adapter", lora_config(), seed=7)
    summary = export_gguf(adapter, tmp_path / "out", outtype=outtype)
    merged, _ = merged_model(Path(adapter))
    expected = hf_logits(merged, IDS)
    got = cpp_logits(load_llama(llama_cpp, tmp_path / "out" / summary.files["model"]), IDS)
    largest, mean = TOLERANCE[outtype]
    assert np.abs(got - expected).max() < largest and np.abs(got - expected).mean() < mean


@pytest.mark.parametrize(
    "config",
    [
        peftkit.IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
        lora_config(use_dora=True),
        peftkit.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "up_proj"]),
        lora_config(target_modules=["q_proj"], modules_to_save=["lm_head"]),
    ],
    ids=["ia3", "dora", "loha", "modules_to_save"],
)
def test_llama_cpp_runs_merged_exports_of_other_methods(llama_cpp, config, tiny, tmp_path):
    """What --lora-only refuses, the merged export carries: llama.cpp gives the merged model's logits."""
    model_dir, _, _ = tiny
    adapter = save_random_adapter(model_dir, tmp_path / "adapter", config, seed=9)
    summary = export_gguf(adapter, tmp_path / "out", outtype="f16")
    expected = hf_logits(merged_model(Path(adapter))[0], IDS)
    got = cpp_logits(load_llama(llama_cpp, tmp_path / "out" / summary.files["model"]), IDS)
    largest, mean = TOLERANCE["f16"]
    assert np.abs(got - expected).max() < largest and np.abs(got - expected).mean() < mean


@pytest.mark.parametrize("arch", ["Llama", "Qwen2"])
def test_llama_cpp_lora_adapter_on_base_equals_merged(llama_cpp, arch, tmp_path):
    """--lora-only on the base's GGUF in llama.cpp == the merged export in llama.cpp (rsLoRA: folded)."""
    model_dir = save_arch_dir(tmp_path / "model", arch)
    config = lora_config(use_rslora=True, rank_pattern={"k_proj": 2})
    adapter = save_random_adapter(model_dir, tmp_path / "adapter", config, seed=8)
    merged = export_gguf(adapter, tmp_path / "merged", outtype="f16")
    lora = export_gguf(adapter, tmp_path / "lora", outtype="f16", lora_only=True, with_base=True)
    base_path = tmp_path / "lora" / lora.files["base"]
    with_lora = cpp_logits(load_llama(llama_cpp, base_path, tmp_path / "lora" / lora.files["adapter"]), IDS)
    merged_logits = cpp_logits(load_llama(llama_cpp, tmp_path / "merged" / merged.files["model"]), IDS)
    base_logits = cpp_logits(load_llama(llama_cpp, base_path), IDS)
    largest = TOLERANCE["f16"][0]
    np.testing.assert_allclose(with_lora, merged_logits, atol=largest)
    assert np.abs(with_lora - base_logits).max() > 10 * largest  # the adapter does matter
    np.testing.assert_allclose(with_lora, hf_logits(merged_model(Path(adapter))[0], IDS), atol=largest)


# -- the embedded SmolLM2 with a LoRA adapter in llama.cpp (slow) -------------------------------------

SMOL_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain what a neural network is in one sentence.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
    "I love this movie! Is this review positive or negative?",
    "Give me a tip for writing clean Python code.",
    "What is 12 times 7?",
]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """SmolLM2 with a random all-linear LoRA (B ~ N(0, 0.02), like a trained one), its merged fp32
    model, and the exports: merged F16, merged Q8_0, and the adapter alone with the base at F16."""
    from types import SimpleNamespace

    from peftkit.loading import encode_chat
    from peftkit.models import load_model_and_tokenizer

    root = tmp_path_factory.mktemp("gguf-smol")
    model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")
    peft_model = peftkit.get_peft_model(model, lora_config(r=8, lora_alpha=16, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(root / "adapter")
    summaries = {
        "f16": export_gguf(root / "adapter", root / "f16", outtype="f16"),
        "q8_0": export_gguf(root / "adapter", root / "q8_0", outtype="q8_0"),
        "lora": export_gguf(root / "adapter", root / "lora", lora_only=True, with_base=True),
    }
    return SimpleNamespace(
        root=root,
        merged=peft_model.merge_and_unload().eval(),
        tokenizer=tokenizer,
        files={
            key: root / key / s.files["model" if key != "lora" else "adapter"] for key, s in summaries.items()
        },
        base=root / "lora" / summaries["lora"].files["base"],
        summaries=summaries,
        prompts=[encode_chat(tokenizer, [{"role": "user", "content": p}]) for p in SMOL_PROMPTS],
    )


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens from transformers, past eos too (llama.cpp's loop does not stop either)."""
    config = model.generation_config
    eos, config.eos_token_id = config.eos_token_id, None
    try:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, pad_token_id=0)
    finally:
        config.eos_token_id = eos
    return out[0, len(prompt) :].tolist()


def cpp_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare_greedy(smol, llm, tolerance: float) -> dict:
    """Greedy continuations of every prompt in llama.cpp vs transformers' merged fp32 model.

    Along transformers' continuation (teacher-forced), llama.cpp's log-prob of each chosen token
    must be within ``tolerance`` of transformers'. Where the greedy continuations differ, the first
    differing step must be a near-tie for transformers (its two candidates' log-probs within
    ``tolerance``): weight rounding legitimately flips those, and nothing else may differ."""
    same, gaps, ties = 0, [], []
    for text, prompt in zip(SMOL_PROMPTS, smol.prompts):
        expected = hf_greedy(smol.merged, prompt, NEW_TOKENS)
        got = cpp_greedy(llm, prompt, NEW_TOKENS)
        sequence = prompt + expected
        ours = log_softmax(cpp_logits(llm, sequence)[len(prompt) - 1 : -1])
        theirs = log_softmax(hf_logits(smol.merged, sequence)[len(prompt) - 1 : -1])
        rows = np.arange(NEW_TOKENS)
        gaps.extend(np.abs(ours[rows, expected] - theirs[rows, expected]).tolist())
        assert max(gaps[-NEW_TOKENS:]) < tolerance, (text, max(gaps[-NEW_TOKENS:]))
        if got == expected:
            same += 1
            continue
        k = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
        ties.append(float(theirs[k, expected[k]] - theirs[k, got[k]]))
        assert ties[-1] < tolerance, (text, expected, got, k)
    return {
        "same": same,
        "max_logprob_gap": max(gaps),
        "mean_logprob_gap": float(np.mean(gaps)),
        "ties": ties,
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("outtype", "tolerance", "mean_tolerance", "min_same"), [("f16", 0.05, 0.01, 7), ("q8_0", 1.0, 0.15, 1)]
)
def test_smollm2_export_continues_like_transformers(
    llama_cpp, smol, outtype, tolerance, mean_tolerance, min_same
):
    """Measured: F16: all 8 continuations equal, chosen-token log-probs within 0.01 nat. Q8_0 (weights
    and, in llama.cpp's matmuls, activations at 8 bits): within 0.38 nat (mean 0.045); 3 to 5 of 8
    continuations equal over 16 tokens, the others part at near-ties (0.04 to 0.61 nat apart for
    transformers), which is what the comparison checks for Q8_0."""
    result = compare_greedy(smol, load_llama(llama_cpp, smol.files[outtype]), tolerance)
    assert result["same"] >= min_same and result["mean_logprob_gap"] < mean_tolerance, result


@pytest.mark.slow
def test_smollm2_lora_adapter_on_base_gguf_equals_merged_export(llama_cpp, smol):
    merged = load_llama(llama_cpp, smol.files["f16"])
    with_lora = load_llama(llama_cpp, smol.base, smol.files["lora"])
    base = load_llama(llama_cpp, smol.base)
    differs_from_base = 0
    for prompt in smol.prompts:
        got = cpp_greedy(with_lora, prompt, NEW_TOKENS)
        assert got == cpp_greedy(merged, prompt, NEW_TOKENS), SMOL_PROMPTS[smol.prompts.index(prompt)]
        differs_from_base += got != cpp_greedy(base, prompt, NEW_TOKENS)
    assert differs_from_base >= 1  # the adapter changes what the model says (3 of 8 here)
    assert compare_greedy(smol, with_lora, 0.05)["same"] >= 7
    # F16 base + F16 factors vs F16 merged weights round differently: logits (up to ~30) within 0.3,
    # while the adapter itself moves them by several units
    adapted = cpp_logits(with_lora, smol.prompts[0])
    np.testing.assert_allclose(adapted, cpp_logits(merged, smol.prompts[0]), atol=0.3)
    assert np.abs(adapted - cpp_logits(base, smol.prompts[0])).max() > 2.0


def tokenizer_strings() -> list[str]:
    """100 strings: scripts, emoji, whitespace runs, code, numbers, special tokens in and around text."""
    base = [
        "Hello world",
        "The quick brown fox jumps over the lazy dog.",
        "  two leading spaces",
        "trailing spaces   ",
        "\n\nnewlines\n\n\n",
        "\ttabs\t\tand  spaces \t mixed",
        "CRLF line\r\nending\r\n",
        "emoji 🚀🦙😶\u200d🌫️✅ and 👍🏽",
        "我想在apple工作1314151天～",
        "日本語のテキストです。",
        "한국어 문장입니다",
        "нещо на Български",
        "Ελληνικά γράμματα",
        "العربية من اليمين",
        "हिन्दी पाठ",
        "ภาษาไทย",
        "កាន់តែពិសេសអាច😁",
        "accents: café naïve Zürich façade",
        "combining e\u0301 and zero\u200bwidth",
        "math ∑∫√∞ ≤ ≥ ≠ ± × ÷",
        "3 33 333 3333 33333 333333 3.3 3..3 3...3",
        "pi is 3.14159265358979 and e is 2.71828",
        "1,000,000 and 1_000_000 and 0x1F and 1e-9",
        "phone +1 (555) 123-4567",
        "def f(x):\n    return x ** 2  # square\n",
        "for (int i = 0; i < n; ++i) { sum += a[i]; }",
        '{"json": [1, 2, 3], "nested": {"key": null}}',
        '<div class="x">HTML &amp; entities</div>',
        "SELECT * FROM users WHERE id = 42;",
        "https://example.com/path?q=1&r=two#frag",
        "mail me: first.last@example.co.uk",
        "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it",
        "We'Ve a'lL don't can't won't",
        "ALL CAPS SHOUTING!!!",
        "''''''```````\"\"\"\"......!!!!!!??????",
        "------======= ******** ________",
        "a",
        " ",
        "   ",
        "\n",
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "text<|im_end|>more text",
        "<repo_name>peftkit<file_sep>setup.py",
        "<|im_start|>system\nYou are helpful.<|im_end|>",
        "not special: <|im_start",
        "<|im_ end|> is not a token",  # fmt: skip
        "tab\tseparated\tvalues\t1\t2",
    ]
    variants = [lambda s: " " + s, lambda s: s + "\n", lambda s: s.upper()]
    strings = list(base)
    for i, text in enumerate(base):
        if len(strings) == 100:
            break
        strings.append(variants[i % len(variants)](text))
    return strings


@pytest.mark.slow
def test_smollm2_tokenizer_round_trip_in_llama_cpp(llama_cpp, smol):
    llm = load_llama(llama_cpp, smol.files["q8_0"], vocab_only=True)
    strings = tokenizer_strings()
    assert len(strings) == 100
    mismatches = []
    for text in strings:
        expected = smol.tokenizer(text)["input_ids"]
        got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        if got != expected:
            mismatches.append((text, got, expected))
    assert not mismatches, mismatches[:3]


@pytest.mark.slow
def test_smollm2_chat_template_in_llama_cpp(llama_cpp, smol):
    """The GGUF's chat template, as llama-cpp-python renders it, gives transformers' prompt tokens; so
    does llama.cpp's own (C++) template engine where it can (it knows ChatML, but not SmolLM2's
    default system prompt: conversations with a system message)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from peftkit.export.modelfile import _probes
    from peftkit.loading import encode_chat

    llm = load_llama(llama_cpp, smol.files["f16"], vocab_only=True)
    template = llm.metadata["tokenizer.chat_template"]
    formatter = Jinja2ChatFormatter(
        template=template, eos_token="<|im_end|>", bos_token="<|im_start|>", add_generation_prompt=True
    )
    for messages in _probes():
        expected = encode_chat(smol.tokenizer, messages)
        prompt = formatter(messages=messages).prompt
        assert llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) == expected, messages
        if messages[0]["role"] != "system":
            continue
        chat = (llama_cpp.llama_chat_message * len(messages))(
            *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages]
        )
        buffer = ctypes_buffer(4096)
        size = llama_cpp.llama_chat_apply_template(template.encode(), chat, len(messages), True, buffer, 4096)
        rendered = buffer.raw[:size].decode("utf-8")
        assert llm.tokenize(rendered.encode("utf-8"), add_bos=False, special=True) == expected, messages


def ctypes_buffer(size: int):
    import ctypes

    return ctypes.create_string_buffer(size)


def test_llama_cpp_tokenizes_like_the_tiny_tokenizer(llama_cpp, tiny):
    """The tiny tokenizer's vocabulary is its own (no published hash): its pre-tokenizer is recognised
    from tokenizer.json as GPT-2's, and llama.cpp then splits all 100 strings as transformers does."""
    llm = load_llama(llama_cpp, gguf_file(tiny[2]["f16"]), vocab_only=True)
    tok = make_tiny_tokenizer()
    for text in tokenizer_strings():
        assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) == tok(text)["input_ids"], text


# -- the Modelfile's Go template, rendered by Go's text/template (Ollama's engine) ---------------------

GO_RENDERER = """package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

// The fields of Ollama's api.Message that a text chat template reads.
type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	var input struct {
		Template      string      `json:"template"`
		Conversations [][]Message `json:"conversations"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&input); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("").Parse(input.Template))
	out := []string{}
	for _, messages := range input.Conversations {
		var b strings.Builder
		if err := tmpl.Execute(&b, map[string]any{"Messages": messages, "System": ""}); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


def render_go_template(template: str, conversations: list, workdir: Path) -> list[str]:
    import subprocess

    (workdir / "render.go").write_text(GO_RENDERER)
    result = subprocess.run(
        ["go", "run", str(workdir / "render.go")],
        input=json.dumps({"template": template, "conversations": conversations}),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "GOFLAGS": "-mod=mod", "GO111MODULE": "off"},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def modelfile_value(text: str, keyword: str) -> str | None:
    import re

    match = re.search(rf'^{keyword} """(.*?)"""$', text, re.S | re.M)
    return None if match is None else match.group(1)


SMOLLM2_STYLE = (  # ChatML with a default system prompt, as SmolLM2's template
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_STYLE = (
    "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content']"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.mark.parametrize(
    ("chat_template", "default_system"),
    [(None, None), (SMOLLM2_STYLE, "You are a helpful assistant."), (LLAMA3_STYLE, None)],
    ids=["chatml", "chatml-default-system", "llama3"],
)
def test_modelfile_template_renders_transformers_prompts_in_go(chat_template, default_system, tmp_path):
    """The Modelfile's TEMPLATE, run by Go's text/template with the messages Ollama passes (its SYSTEM
    first when a conversation has no system message), renders apply_chat_template's prompts."""
    import shutil

    if shutil.which("go") is None:
        pytest.skip("needs the Go toolchain (apt install golang-go) to run Ollama's template engine")
    from peftkit.export.modelfile import _probes

    tok = make_tiny_tokenizer()
    if chat_template is not None:
        tok.chat_template = chat_template
    model = make_tiny_llama(vocab_size=len(tok), eos_token_id=tok.eos_token_id)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    adapter = save_random_adapter(tmp_path / "model", tmp_path / "adapter", lora_config(), seed=1)
    export_gguf(adapter, tmp_path / "out", outtype="q8_0")
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    template, system = modelfile_value(modelfile, "TEMPLATE"), modelfile_value(modelfile, "SYSTEM")
    assert system == default_system
    conversations = [
        m if system is None or m[0]["role"] == "system" else [{"role": "system", "content": system}, *m]
        for m in _probes()
    ]
    rendered = render_go_template(template, conversations, tmp_path)
    expected = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in _probes()]
    assert rendered == expected
