"""SentencePiece-style vocabularies in GGUF (``tokenizer.ggml.model = "llama"``): Llama 2, Mistral 7B.

transformers holds these as byte-fallback BPE over "▁"-escaped text (tokenizer.json: merges, no
scores); llama.cpp tokenizes them as SentencePiece does: split text into characters, then merge
the adjacent pair whose concatenation is the vocabulary token with the highest *score*, characters
left over as ``<0xXX>`` byte tokens. The two agree when

- every way of splitting a multi-character token into two vocabulary tokens is a merge, and every
  character of one is a token (llama.cpp merges any adjacent pair that forms a token);
- merges producing the same token are consecutive in rank, so one score per token orders them as
  the ranks do (the score written is minus the token's first merge rank). Runs of one character
  are excepted: transformers ranks the merges of Llama's equal-scored whitespace runs ("▁▁".."▁"*16)
  by piece length, interleaved, and llama.cpp still splits runs of 1-40 spaces, tabs, digits and
  punctuation as transformers does (measured on Llama 2's vocabulary, 360 strings);
- all 256 byte tokens exist (llama.cpp's byte fallback has no unknown token).

Vocabularies converted from SentencePiece (transformers' ``generate_merges``) satisfy all three;
``spm_problems`` names the first violation of a vocabulary that does not (a BPE trained directly).

The dummy prefix is the one thing llama.cpp cannot always copy. It prepends "▁" to the text and to
the text after every special token, as SentencePiece and transformers' legacy tokenizers do
(a ``Prepend("▁")`` normalizer). transformers' ``Metaspace`` pre-tokenizer does not prepend to
text that already starts with a space, and with ``prepend_scheme="first"`` (LlamaTokenizer's
default, ``legacy=False``) not after special tokens either; nor does a Prepend normalizer when
special tokens are matched in normalized text. ``prefix_differences`` says which texts llama.cpp
then tokenizes differently, and the export reports it.
"""

from __future__ import annotations

import re
from typing import Any

from peftkit.errors import PeftkitError

SPACE = "\u2581"  # "▁", SentencePiece's escaped space
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# gguf.TokenType values (written as int32)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def is_sentencepiece_style(model: dict[str, Any]) -> bool:
    """Whether tokenizer.json's model is byte-fallback BPE (SentencePiece-style)."""
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def prefix_scheme(spec: dict[str, Any]) -> str:
    """How the tokenizer adds SentencePiece's dummy prefix: "prepend" (always, as SentencePiece),
    "always" / "first" (Metaspace's schemes) or "never"; PeftkitError for any other definition."""
    normalizer, pre = spec.get("normalizer"), spec.get("pre_tokenizer")
    steps = _steps(normalizer)
    kinds = [step.get("type") for step in steps]
    replaces_spaces = any(
        step.get("type") == "Replace"
        and (step.get("pattern") or {}).get("String") == " "
        and step.get("content") == SPACE
        for step in steps
    )
    prepends = any(step.get("type") == "Prepend" and step.get("prepend") == SPACE for step in steps)
    if pre is None and replaces_spaces and set(kinds) <= {"Prepend", "Replace"} and len(kinds) <= 2:
        return "prepend" if prepends else "never"
    if normalizer is None and pre is not None and pre.get("type") == "Metaspace":
        vocab = (spec.get("model") or {}).get("vocab") or {}
        if pre.get("split") and (inner := next((t for t in vocab if SPACE in t[1:]), None)):
            raise PeftkitError(
                f"the tokenizer splits words apart before merging (Metaspace split=true) but has tokens "
                f"spanning words such as {inner!r}, which llama.cpp's SentencePiece merging would form"
            )
        if pre.get("replacement") != SPACE:
            raise PeftkitError(
                f"the tokenizer's Metaspace replacement is {pre.get('replacement')!r}, not '▁'"
            )
        scheme = pre.get("prepend_scheme") or ("always" if pre.get("add_prefix_space", True) else "never")
        if scheme not in ("always", "first", "never"):
            raise PeftkitError(f"unknown Metaspace prepend_scheme {scheme!r}")
        return scheme
    raise PeftkitError(
        "the SentencePiece-style tokenizer's text handling is not one llama.cpp reproduces "
        "(it knows '▁' for spaces plus an optional dummy prefix): normalizer "
        f"{kinds or None}, pre-tokenizer {(pre or {}).get('type')}"
    )


def _steps(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    if node is None:
        return []
    if node.get("type") == "Sequence":
        return [step for child in node.get("normalizers", []) for step in _steps(child)]
    return [node]


def add_space_prefix(scheme: str) -> bool:
    return scheme != "never"


def prefix_differences(scheme: str, normalized_specials: bool) -> tuple[bool, bool]:
    """Where llama.cpp's dummy prefix makes its tokens differ from transformers': (text that starts
    with a space, text after a special token). ``normalized_specials``: some added token is matched
    in normalized text, so a Prepend normalizer's "▁" comes only at the start of the whole text."""
    leading = scheme in ("always", "first")
    after_special = scheme == "first" or (scheme == "prepend" and normalized_specials)
    return leading, after_special


def differences_note(scheme: str, normalized_specials: bool) -> str | None:
    """The export's note on texts llama.cpp tokenizes differently (None: it tokenizes all alike)."""
    leading, after_special = prefix_differences(scheme, normalized_specials)
    if not (leading or after_special):
        return None
    where = " or ".join(
        [
            what
            for what, differs in (
                ("starts with a space", leading),
                ("follows a special token", after_special),
            )
            if differs
        ]
    )
    why = (
        f"Metaspace prepend_scheme={scheme!r}"
        if scheme != "prepend"
        else "a Prepend normalizer, with special tokens matched in normalized text"
    )
    example = (
        "' Hi' is ['▁', '▁Hi'] in llama.cpp, ['▁Hi'] in transformers"
        if leading
        else "'<s>Hi' is ['<s>', '▁Hi'] in llama.cpp, ['<s>', 'Hi'] in transformers"
    )
    return (
        f"llama.cpp tokenizes text that {where} differently from transformers: it always adds "
        f"SentencePiece's '▁' prefix there, while this tokenizer ({why}) does not (e.g. {example}). "
        "llama.cpp has no setting for it; other texts are tokenized identically"
    )


def spm_scores(merges: list[tuple[str, str]]) -> dict[str, float]:
    """Minus the rank of each token's first merge: llama.cpp merges the highest-scoring pair first."""
    scores: dict[str, float] = {}
    for rank, (left, right) in enumerate(merges):
        scores.setdefault(left + right, -float(rank))
    return scores


def spm_problems(vocab: dict[str, int], merges: list[tuple[str, str]], skip: set[str]) -> str | None:
    """Why llama.cpp's SentencePiece merging would split some text differently (None: it will not).

    ``skip``: added and special tokens (matched whole, before merging, by both)."""
    missing_bytes = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in vocab]
    if missing_bytes:
        return (
            f"it lacks {len(missing_bytes)} of the 256 byte tokens (e.g. {missing_bytes[0]}) llama.cpp "
            "falls back to for characters outside the vocabulary"
        )
    if token := _scattered_merges(merges):
        return (
            f"the merges producing {token!r} are not consecutive in rank, so no one score per token "
            "orders them as the merges do"
        )
    pairs = set(merges)
    for token in vocab:
        if token in skip or len(token) < 2 or BYTE_TOKEN.fullmatch(token):
            continue
        for char in token:
            if char not in vocab:
                return f"the token {token!r} contains {char!r}, which is not a token of its own"
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab and left not in skip and right not in skip:
                if (left, right) not in pairs:
                    return (
                        f"{left!r} + {right!r} form the token {token!r} but are not one of its merges; "
                        "llama.cpp would merge them"
                    )
    return None


def _scattered_merges(merges: list[tuple[str, str]]) -> str | None:
    """A token whose merges are not consecutive in rank, if any (runs of one character excepted)."""
    seen: set[str] = set()
    previous = None
    for left, right in merges:
        merged = left + right
        if merged != previous:
            if merged in seen and len(set(merged)) > 1:
                return merged
            seen.add(merged)
            previous = merged
    return None


def merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    """tokenizer.json's merges as (left, right) pairs (both the "a b" and the pair formats)."""
    pairs = []
    for merge in model.get("merges") or []:
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        pairs.append((left, right))
    return pairs


def spm_token_type(text: str, token_id: int, unk_id: int | None) -> int:
    if token_id == unk_id:
        return UNKNOWN
    if BYTE_TOKEN.fullmatch(text):
        return BYTE
    return NORMAL
