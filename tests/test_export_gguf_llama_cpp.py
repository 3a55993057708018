"""`peftkit export --format gguf` checked by llama.cpp itself (llama-cpp-python) and by Go's
text/template (Ollama's template engine); see test_export_gguf.py for the oracles and tolerances."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import peftkit
from _gguf_helpers import (
    IDS,
    SPM_SPECIALS,
    gguf_file,
    hf_logits,
    lora_config,
    make_tiny_spm_tokenizer,
    merged_model,
    save_arch_dir,
    save_spm_llama_dir,
    tiny_exports,
)
from _serve_helpers import save_random_adapter
from conftest import make_tiny_llama, make_tiny_tokenizer
from peftkit.export import export_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama, a random all-linear LoRA adapter on it, and its F32 / F16 exports."""
    return tiny_exports(tmp_path_factory)


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
        reference={},  # prompt index -> transformers' greedy tokens and their log-probs (computed once)
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
    for i, (text, prompt) in enumerate(zip(SMOL_PROMPTS, smol.prompts)):
        if i not in smol.reference:
            greedy = hf_greedy(smol.merged, prompt, NEW_TOKENS)
            logits = hf_logits(smol.merged, prompt + greedy)[len(prompt) - 1 : -1]
            smol.reference[i] = (greedy, log_softmax(logits))
        expected, theirs = smol.reference[i]
        got = cpp_greedy(llm, prompt, NEW_TOKENS)
        sequence = prompt + expected
        ours = log_softmax(cpp_logits(llm, sequence)[len(prompt) - 1 : -1])
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


def dummy_prefix_differs(text: str, leading: bool, after_special: bool, specials=SPM_SPECIALS) -> bool:
    """Whether llama.cpp's dummy prefix makes its tokens of ``text`` differ from transformers', for a
    tokenizer that adds none to text starting with a space (``leading``) / after a special token:
    text at the start or after a special token that starts with a space, or any text after one."""
    pieces = re.split("|".join(map(re.escape, specials)), text)
    later = [piece for piece in pieces[1:] if piece]
    if leading and any(piece.startswith(" ") for piece in [pieces[0], *later]):
        return True
    return after_special and bool(later)


@pytest.mark.parametrize("scheme", ["prepend", "always", "first"])
def test_llama_cpp_tokenizes_sentencepiece_style_vocabularies(llama_cpp, scheme, tmp_path):
    """A Llama 2-style (SentencePiece) vocabulary: llama.cpp splits every string as SentencePiece's
    rule does (transformers with a Prepend normalizer: 100 of 100 identical), and as transformers'
    Metaspace tokenizers do except where the export's note says (the dummy prefix)."""
    model_dir = save_spm_llama_dir(tmp_path / "model", scheme)
    adapter = save_random_adapter(model_dir, tmp_path / "adapter", lora_config(), seed=1)
    summary = export_gguf(adapter, tmp_path / "out", outtype="f16")
    llm = load_llama(llama_cpp, gguf_file(tmp_path / "out"), vocab_only=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    sentencepiece = make_tiny_spm_tokenizer("prepend")
    strings = tokenizer_strings() + ["<s>[INST] hi [/INST]", "a</s>b", "x <s> y", "<unk>", "<s> <s>"]
    predicted = 0
    for text in strings:
        got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        assert got == sentencepiece(text)["input_ids"], text
        differs = dummy_prefix_differs(text, scheme != "prepend", scheme == "first")
        assert (got != tok(text)["input_ids"]) == differs, text
        predicted += differs
    assert predicted == {"prepend": 0, "always": 25, "first": 32}[scheme]
    assert any("llama.cpp tokenizes text that starts with a space" in n for n in summary.notes) == bool(
        predicted
    )


LLAMA_VOCAB = Path(sys.prefix) / "share" / "llama-cpp-vocab" / "ggml-vocab-llama-spm.gguf"


def test_llama2_vocabulary_gives_llama_cpp_reference_tokens(llama_cpp, tmp_path):
    """Llama 2's real vocabulary (llama.cpp's test file, read into transformers by its GGUF
    converter, saved as a model's tokenizer): llama.cpp on peftkit's export gives llama.cpp's
    published SentencePiece tokens for its 47 test strings (the scores order merges as
    SentencePiece did), and transformers' tokens on every string but those the export's note names
    (transformers 5.25 builds a Metaspace "first" tokenizer from the file, 5.17 a Prepend one that
    matches special tokens in normalized text: both add no "▁" after special tokens)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftkit.export.gguf_spm import differences_note, prefix_differences, prefix_scheme
    from peftkit.export.gguf_vocab import tokenizer_json

    if not LLAMA_VOCAB.is_file():
        pytest.skip(f"{LLAMA_VOCAB} is absent (`make install` copies it: tests/fetch_llama_cpp_vocab.py)")
    tok = AutoTokenizer.from_pretrained(LLAMA_VOCAB.parent, gguf_file=LLAMA_VOCAB.name)
    config = LlamaConfig(vocab_size=32000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, bos_token_id=1, eos_token_id=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    adapter = save_random_adapter(tmp_path / "model", tmp_path / "adapter", lora_config(r=2), seed=1)
    summary = export_gguf(adapter, tmp_path / "out", outtype="f16")
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    scheme = prefix_scheme(tokenizer_json(tok))
    normalized = any(token.normalized for token in tok.added_tokens_decoder.values())
    leading, after_special = prefix_differences(scheme, normalized)
    assert differences_note(scheme, normalized) in [None, *summary.notes]
    llm = load_llama(llama_cpp, gguf_file(tmp_path / "out"), vocab_only=True)
    inputs = LLAMA_VOCAB.with_name(LLAMA_VOCAB.name + ".inp").read_text().split("\n__ggml_vocab_test__\n")
    expected = LLAMA_VOCAB.with_name(LLAMA_VOCAB.name + ".out").read_text().split("\n")
    assert len(inputs) == len(expected) == 47
    for text, ids in zip(inputs, expected):
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == [
            int(i) for i in ids.split()
        ]
    for text in inputs + tokenizer_strings() + ["<s>[INST] hi [/INST]", "a</s>b"]:
        got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        assert (got != tok(text)["input_ids"]) == dummy_prefix_differs(
            text, leading, after_special, ["<unk>", "<s>", "</s>"]
        ), text


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
