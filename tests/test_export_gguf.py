"""`peftkit export --format gguf`: the GGUF files are checked by the programs that read them.

Oracles, strongest first:

* llama.cpp itself (llama-cpp-python, compiled from source; the tests that need it skip without
  it): logits / greedy continuations of the exported model equal transformers' merged fp32
  model's; the --lora-only adapter on the base model's GGUF equals the merged export; its
  tokenizer and chat template give transformers' token ids; a Llama 2 vocabulary gives llama.cpp's
  own reference tokens (its test files, copied by `make install`).
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
from pathlib import Path

import numpy as np
import pytest
import torch

import peftkit
from _gguf_helpers import (
    IDS,
    SPM_SPECIALS,
    gguf_file,
    hf_logits,
    lora_config,
    merged_model,
    reader_tensors,
    reader_values,
    save_arch_dir,
    save_spm_llama_dir,
    tiny_exports,
)
from _serve_helpers import save_random_adapter
from conftest import make_tiny_llama, make_tiny_tokenizer
from peftkit.configuration import ConfigError
from peftkit.errors import PeftkitError
from peftkit.export import export_gguf
from peftkit.export.gguf_model import permute_rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama, a random all-linear LoRA adapter on it, and its F32 / F16 exports."""
    return tiny_exports(tmp_path_factory)


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


@pytest.mark.parametrize("scheme", ["prepend", "first"])
def test_sentencepiece_style_vocabulary_keys(scheme, tmp_path):
    """A Llama 2-style tokenizer is written as llama.cpp's "llama" vocabulary: token types (byte,
    unknown, control), scores ordering the merges, the dummy prefix, and a note where llama.cpp
    will tokenize differently (see test_export_gguf_llama_cpp for llama.cpp's tokens)."""
    model_dir = save_spm_llama_dir(tmp_path / "model", scheme)
    adapter = save_random_adapter(model_dir, tmp_path / "adapter", lora_config(), seed=1)
    summary = export_gguf(adapter, tmp_path / "out", outtype="f32")
    values = reader_values(gguf_file(tmp_path / "out"))
    tokens, types, scores = (values[f"tokenizer.ggml.{key}"] for key in ("tokens", "token_type", "scores"))
    assert values["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in values
    assert tokens[:5] == SPM_SPECIALS and types[:5] == [2, 3, 3, 3, 3]  # unknown, then control
    assert tokens[5:261] == [f"<0x{b:02X}>" for b in range(256)] and set(types[5:261]) == {6}  # byte
    assert values["tokenizer.ggml.add_space_prefix"] is True
    assert values["tokenizer.ggml.add_bos_token"] is True and values["tokenizer.ggml.bos_token_id"] == 1
    merges = json.loads((model_dir / "tokenizer.json").read_text())["model"]["merges"]
    first = {}
    for rank, (left, right) in enumerate(merges):
        first.setdefault(left + right, rank)
    assert len(first) > 100 and all(scores[tokens.index(t)] == -rank for t, rank in first.items())
    differs = [note for note in summary.notes if "llama.cpp tokenizes text that starts with a space" in note]
    assert len(differs) == (scheme == "first")
    assert summary.tokenizer.startswith("built from the transformers tokenizer (SentencePiece-style)")


def test_sentencepiece_vocabulary_llama_cpp_would_merge_differently_is_refused(tmp_path, monkeypatch):
    import peftkit.auto

    model_dir = save_spm_llama_dir(tmp_path / "model", "prepend", drop_last_merge=True)
    adapter = save_random_adapter(model_dir, tmp_path / "adapter", lora_config(), seed=1)
    monkeypatch.setattr(peftkit.auto, "load_adapter_with_base", None)  # refused before the model loads
    with pytest.raises(PeftkitError, match="form the token .* but are not one of its merges; llama.cpp"):
        export_gguf(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sentencepiece_vocabulary_checks():
    from peftkit.export.gguf_spm import prefix_scheme, spm_problems

    vocab = {
        t: i for i, t in enumerate([f"<0x{b:02X}>" for b in range(256)] + ["a", "b", "c", "ab", "bc", "abc"])
    }
    assert spm_problems(vocab, [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")], {"<s>"}) is None
    assert "'a' + 'bc' form the token 'abc'" in spm_problems(
        vocab, [("a", "b"), ("b", "c"), ("ab", "c")], set()
    )
    scattered = [("a", "b"), ("ab", "c"), ("b", "c"), ("a", "bc")]
    assert "producing 'abc' are not consecutive" in spm_problems(vocab, scattered, set())
    assert "lacks 1 of the 256 byte tokens" in spm_problems(
        {k: v for k, v in vocab.items() if k != "<0x41>"}, [], set()
    )
    complete = [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]
    assert "'d', which is not a token" in spm_problems({**vocab, "ad": 999}, complete, set())
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    prepend = {"type": "Prepend", "prepend": "\u2581"}
    assert prefix_scheme({"normalizer": {"type": "Sequence", "normalizers": [prepend, replace]}}) == "prepend"
    assert prefix_scheme({"normalizer": replace}) == "never"
    metaspace = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    assert prefix_scheme({"pre_tokenizer": metaspace}) == "first"
    split = {"pre_tokenizer": {**metaspace, "split": True}, "model": {"vocab": {"a\u2581b": 0}}}
    with pytest.raises(PeftkitError, match="tokens spanning words such as 'a▁b'"):
        prefix_scheme(split)
    with pytest.raises(PeftkitError, match="text handling is not one llama.cpp reproduces"):
        prefix_scheme({"normalizer": {"type": "Sequence", "normalizers": [{"type": "NFKC"}, replace]}})


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
