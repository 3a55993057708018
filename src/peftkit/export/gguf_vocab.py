"""The tokenizer in GGUF: ``tokenizer.ggml.*`` keys llama.cpp tokenizes with, and the chat template.

Two routes, both checked against the transformers tokenizer the model was trained with::

    base model converted from a GGUF (peftkit_conversion.json names it)
        └─ that file's tokenizer.ggml.* keys, copied ── only if its tokens, merges, bos/eos and
                                                        add_bos equal the transformers tokenizer's
    otherwise (or an adapter that added tokens)
        └─ built from the transformers tokenizer, as llama.cpp's converter builds a "gpt2" vocab

The pre-tokenizer (the regex that splits text before BPE) is not in the vocabulary: llama.cpp
picks it by name (``tokenizer.ggml.pre``). The converter names it from a hash of how the
tokenizer encodes a fixed check text, which identifies one published tokenizer; peftkit keeps its
entries for the families it exports and, for any other tokenizer (a retrained vocabulary, a tiny
test one), recognises the pre-tokenizer from tokenizer.json's own definition when it is exactly one
llama.cpp implements. Anything else is refused: a wrong pre-tokenizer splits text differently from
training without any error, only worse outputs.

SentencePiece-style vocabularies (byte-fallback BPE with "▁" word boundaries: Llama 2, Mistral 7B)
are written as llama.cpp's "llama" vocabulary: tokens, scores and byte tokens (``gguf_spm``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.export import gguf_spm
from peftkit.export.gguf_spm import BYTE, BYTE_TOKEN, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED

# The converter's check text (convert_hf_to_gguf.py, get_vocab_base_pre): its tokenization
# differs between pre-tokenizers (whitespace runs, digits, emoji, CJK, contractions).
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 "
    "?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? "
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? "
    "We'Ve a'lL"
)

# sha256 of str(token ids of CHECK_TEXT) -> llama.cpp pre-tokenizer, for the supported families
# (the converter's table, those entries only).
KNOWN_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Llama 3 (Smaug)
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5, Qwen2(.5)
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3 embedding
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}

# The split regexes of tokenizer.json that llama.cpp implements under these names.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")


@dataclass
class Vocab:
    """A tokenizer as GGUF keys: a "gpt2" (byte-level BPE) or "llama" (SentencePiece) vocabulary."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    how: str = ""
    model: str = "gpt2"
    scores: list[float] | None = None  # "llama" only: the merge order, as SentencePiece scores
    add_space_prefix: bool | None = None  # "llama" only: SentencePiece's dummy "▁" prefix
    differences: str | None = None  # texts llama.cpp tokenizes differently, if any


def tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise PeftkitError(
            f"the tokenizer ({type(tokenizer).__name__}) has no tokenizer.json (a 'fast' tokenizer); "
            "GGUF export builds the vocabulary from it"
        )
    return json.loads(backend.to_str())


def check_tokenizer_model(spec: dict[str, Any]) -> dict[str, Any]:
    """tokenizer.json's model if it is a BPE one (what GGUF export writes), else PeftkitError."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise PeftkitError(
            f"the tokenizer is a {model.get('type')} model; GGUF export supports BPE tokenizers: "
            "byte-level (Llama 3, SmolLM, Qwen2, Mistral Nemo) and SentencePiece-style (Llama 2, "
            "Mistral 7B)"
        )
    return model


def check_tokenizer(tokenizer: Any) -> str | None:
    """Refuse (PeftkitError) a tokenizer GGUF export cannot write; return the texts llama.cpp will
    tokenize differently from transformers, if any (a SentencePiece dummy-prefix difference)."""
    spec = tokenizer_json(tokenizer)
    model = check_tokenizer_model(spec)
    if gguf_spm.is_sentencepiece_style(model):
        return _spm_fields(tokenizer, spec, model)[2]
    pre_tokenizer_name(tokenizer, spec)
    return None


def build_vocab(tokenizer: Any, n_vocab: int) -> Vocab:
    """The vocabulary of ``tokenizer`` as llama.cpp reads it, padded to the model's ``n_vocab`` rows."""
    spec = tokenizer_json(tokenizer)
    model = check_tokenizer_model(spec)
    spm = gguf_spm.is_sentencepiece_style(model)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise PeftkitError(
            f"the tokenizer has token ids up to {max(vocab.values())} but the model only {n_vocab} "
            "embedding rows"
        )
    reverse = {i: text for text, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:  # embedding rows beyond the tokenizer (Qwen2 pads to a multiple of 128)
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        text = reverse[i]
        if spm and i == tokenizer.unk_token_id:
            types.append(UNKNOWN)
        elif text in added:
            # llama.cpp matches added tokens in raw text; the converter normalises them first.
            if not decoder[i].normalized and not spm:
                text = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
            if decoder[i].special or _looks_special(text):
                types.append(CONTROL)
            else:
                types.append(USER_DEFINED)
                text = text.replace("\u2581", " ")
        else:
            types.append(BYTE if spm and BYTE_TOKEN.fullmatch(text) else NORMAL)
        tokens.append(text)
    add_bos, add_eos = adds_special_tokens(tokenizer)
    common = dict(special_ids=special_ids(tokenizer, n_vocab), add_bos=add_bos, add_eos=add_eos)
    if spm:
        scores, prefix, differences = _spm_fields(tokenizer, spec, model)
        return Vocab(
            tokens=tokens,
            token_types=types,
            merges=[],
            pre="default",
            scores=[scores.get(text, 0.0) if kind == NORMAL else 0.0 for text, kind in zip(tokens, types)],
            add_space_prefix=prefix,
            differences=differences,
            model="llama",
            how="built from the transformers tokenizer (SentencePiece-style)",
            **common,
        )
    return Vocab(
        tokens=tokens,
        token_types=types,
        merges=_merges(model),
        pre=pre_tokenizer_name(tokenizer, spec),
        how="built from the transformers tokenizer",
        **common,
    )


def _spm_fields(
    tokenizer: Any, spec: dict[str, Any], model: dict[str, Any]
) -> tuple[dict[str, float], bool, str | None]:
    """A SentencePiece-style tokenizer's scores, dummy prefix and prefix differences (or PeftkitError)."""
    merges = gguf_spm.merge_pairs(model)
    skip = set(tokenizer.get_added_vocab())
    problem = gguf_spm.spm_problems(model.get("vocab") or {}, merges, skip)
    if problem is not None:
        raise PeftkitError(
            "llama.cpp tokenizes SentencePiece-style vocabularies by SentencePiece's rule (merge any "
            f"adjacent pair that forms a token, highest score first), and this one would split some "
            f"text differently from transformers: {problem}"
        )
    scheme = gguf_spm.prefix_scheme(spec)
    normalized = any(
        tokenizer.added_tokens_decoder[i].normalized for i in tokenizer.get_added_vocab().values()
    )
    note = gguf_spm.differences_note(scheme, normalized)
    return gguf_spm.spm_scores(merges), gguf_spm.add_space_prefix(scheme), note


def _looks_special(text: str) -> bool:
    """The converter's test for added tokens that should be control tokens though not marked special."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<｜") and text.endswith("｜>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def _merges(model: dict[str, Any]) -> list[str]:
    """tokenizer.json's merges as GGUF's "left right" strings (a space inside a part as U+0120)."""
    merges = model.get("merges") or []
    if merges and isinstance(merges[0], list):  # tokenizers >= 0.20 writes pairs
        return [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in merges]
    return list(merges)


def special_ids(tokenizer: Any, n_vocab: int) -> dict[str, int]:
    found = {}
    for kind in SPECIAL_TYPES:
        if getattr(tokenizer, f"{kind}_token", None) is None:
            continue
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < n_vocab:
            found[kind] = token_id
    return found


def adds_special_tokens(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding text adds bos / eos: observed, so it is what transformers really does."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            prefix, suffix = with_special[:start], with_special[start + len(plain) :]
            break
    else:
        return False, False
    bos = tokenizer.bos_token_id is not None and prefix == [tokenizer.bos_token_id]
    eos = tokenizer.eos_token_id is not None and suffix == [tokenizer.eos_token_id]
    return bos, eos


def pre_tokenizer_name(tokenizer: Any, spec: dict[str, Any]) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer; PeftkitError if it has none."""
    digest = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest in KNOWN_HASHES:
        return KNOWN_HASHES[digest]
    name = _pre_tokenizer_from_definition(spec)
    if name is not None:
        return name
    definition = json.dumps({key: spec.get(key) for key in ("normalizer", "pre_tokenizer")})
    raise PeftkitError(
        "the tokenizer's pre-tokenizer is not one llama.cpp is known to reproduce, so llama.cpp would "
        "split text differently from training (sha256 of the check tokenization "
        f"{digest[:16]}..., tokenizer.json {definition[:300]}). Supported: the Llama 3, SmolLM, Qwen2 "
        "and Mistral Nemo tokenizers and any GPT-2-style byte-level BPE"
    )


def _pre_tokenizer_from_definition(spec: dict[str, Any]) -> str | None:
    """The pre-tokenizer named by tokenizer.json's definition when it is exactly one llama.cpp has."""
    normalizer, pre, model = spec.get("normalizer"), spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    ignore_merges = bool(model.get("ignore_merges"))

    def byte_level(step: dict[str, Any], use_regex: bool) -> bool:
        return (
            step.get("type") == "ByteLevel"
            and not step.get("add_prefix_space", False)
            and bool(step.get("use_regex", True)) == use_regex
        )

    def split(step: dict[str, Any], regex: str) -> bool:
        return (
            step.get("type") == "Split"
            and (step.get("pattern") or {}).get("Regex") == regex
            and step.get("behavior") == "Isolated"
            and not step.get("invert", False)
        )

    if normalizer is None and not ignore_merges:
        if kinds == ["ByteLevel"] and byte_level(steps[0], True):
            return "gpt-2"
        if (
            kinds == ["Digits", "ByteLevel"]
            and steps[0].get("individual_digits")
            and byte_level(steps[1], True)
        ):
            return "smollm"  # llama.cpp: digits one by one, then GPT-2's regex (also StarCoder's)
    if kinds == ["Split", "ByteLevel"] and byte_level(steps[1], False):
        if normalizer is None and ignore_merges and split(steps[0], _LLAMA3_REGEX):
            return "llama-bpe"
        if (normalizer or {}).get("type") == "NFC" and not ignore_merges and split(steps[0], _QWEN2_REGEX):
            return "qwen2"
    return None


def write_vocab(writer: Any, vocab: Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.token_types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    for kind, token_id in vocab.special_ids.items():
        writer.add_uint32(f"tokenizer.ggml.{_SPECIAL_KEYS[kind]}_token_id", token_id)
    writer.add_bool("tokenizer.ggml.add_bos_token", vocab.add_bos)
    writer.add_bool("tokenizer.ggml.add_eos_token", vocab.add_eos)


_SPECIAL_KEYS = {
    "bos": "bos",
    "eos": "eos",
    "unk": "unknown",
    "sep": "seperator",  # sic: llama.cpp's key
    "pad": "padding",
    "cls": "cls",
    "mask": "mask",
}


def tokenizer_to_gguf(writer: Any, tokenizer: Any, n_vocab: int, model_dir: Path | None) -> str:
    """Write ``tokenizer``'s GGUF keys and chat template; return how (for the summary)."""
    vocab = build_vocab(tokenizer, n_vocab)
    how = f"{vocab.how} (pre-tokenizer {vocab.pre})"
    from peftkit.export.gguf_source import (
        copyable_fields,
        read_tokenizer_fields,
        source_gguf,
        write_copied_fields,
    )

    source = source_gguf(model_dir) if model_dir is not None else None
    if source is not None:
        fields = read_tokenizer_fields(source)
        reason = copyable_fields(fields, vocab)
        if reason is None:
            write_copied_fields(writer, fields)
            pre = fields.get("tokenizer.ggml.pre", (None, "default"))[1]
            how = f"copied from {source.name} (pre-tokenizer {pre}), the GGUF the base model came from"
        else:
            write_vocab(writer, vocab)
            how += f"; not copied from {source.name}: {reason}"
    else:
        write_vocab(writer, vocab)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
    return how
