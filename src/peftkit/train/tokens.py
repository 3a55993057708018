"""New tokens for a training job (the job file's ``tokens:`` section).

    tokens:
      add: ["<tool_call>", "</tool_call>"]
      special: true        # never split, dropped by skip_special_tokens
      train: rows          # rows: only the new rows train (LoRA trainable_token_indices)
                           # embeddings: the whole input/output embeddings train (modules_to_save)

Order of work (``train/loop.py`` calls these): the tokens are added to the tokenizer before the
data is tokenized; the model's embeddings grow (``resize_token_embeddings``) only if the new ids
fall outside them (some models have spare rows); the method's config learns which rows or
layers to train. The adapter is then saved with the tokenizer next to it and, because the
vocabulary grew, with the full embedding matrices (PEFT's ``save_embedding_layers="auto"``),
so ``peftkit generate --adapter`` resizes a fresh base model and reproduces the trained one.

A separate section rather than a ``data`` option: adding tokens changes the model and the
adapter file, not only how the data is read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from peftkit.errors import PeftkitError
from peftkit.saved_embeddings import resize_for_tokenizer


@dataclass
class TokensConfig:
    """Tokens to add to the vocabulary, and how their embeddings are trained."""

    add: list[str] = field(
        default_factory=list,
        metadata={"help": "Tokens to add to the tokenizer (e.g. tags your data uses); the model is resized."},
    )
    special: bool = field(
        default=False,
        metadata={
            "help": "Add them as special tokens: never split, removed when decoding with skip_special_tokens."
        },
    )
    train: Literal["rows", "embeddings"] = field(
        default="rows",
        metadata={
            "help": "rows: train only the new tokens' embedding rows (LoRA's trainable_token_indices, small "
            "adapter); embeddings: train the whole input and output embeddings (modules_to_save)."
        },
    )

    def validate(self) -> list[str]:
        problems = []
        if any(not isinstance(t, str) or not t for t in self.add):
            problems.append(f"'tokens.add' must list non-empty strings, got {self.add!r}")
        elif len(set(self.add)) != len(self.add):
            problems.append(f"'tokens.add' lists a token twice: {self.add!r}")
        return problems


def check_tokens_for_method(tokens: TokensConfig, method: str, method_config: Any) -> None:
    """Fail before loading the model if the method cannot train the new tokens the asked way."""
    if not tokens.add:
        return
    fields = {f.name for f in dataclasses.fields(method_config)}
    needed = "trainable_token_indices" if tokens.train == "rows" else "modules_to_save"
    if needed not in fields:
        other = "embeddings" if tokens.train == "rows" else "rows"
        raise PeftkitError(
            f"tokens.train: {tokens.train} needs the method's {needed} option, which method '{method}' lacks: "
            f"set tokens.train: {other}, or use method: lora"
        )


def add_tokens(tokens: TokensConfig, model: Any, tokenizer: Any) -> list[int]:
    """Add the tokens to ``tokenizer``, grow ``model``'s embeddings if needed; return the new ids."""
    if not tokens.add:
        return []
    added = tokenizer.add_tokens(list(tokens.add), special_tokens=tokens.special)
    if added != len(tokens.add):
        known = [t for t in tokens.add if t in tokenizer.get_vocab()]
        raise PeftkitError(
            f"tokens.add: only {added} of {len(tokens.add)} tokens are new; the tokenizer already has some "
            f"of {known}: list only new tokens"
        )
    ids = tokenizer.convert_tokens_to_ids(tokens.add)
    resize_for_tokenizer(model, tokenizer)
    return ids


def with_new_tokens(tokens: TokensConfig, method_config: Any, model: Any, ids: list[int]) -> Any:
    """``method_config`` set up to train the new tokens' embeddings (see :class:`TokensConfig`)."""
    if not ids:
        return method_config
    embed_name = _name_of(model, model.get_input_embeddings())
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    head_name = None if head is None else _name_of(model, head)
    if tokens.train == "rows":
        # Tied head: LoRA wraps it with the embedding's rows. Untied: list the head's rows too,
        # so the new tokens can also be predicted.
        indices: list[int] | dict[str, list[int]] = (
            list(ids) if tied or head_name is None else {embed_name: list(ids), head_name: list(ids)}
        )
        return dataclasses.replace(method_config, trainable_token_indices=indices)
    # Both layers, each a trainable copy (a tied pair is untied by this, so both can learn)
    names = [n for n in (embed_name, head_name) if n]
    existing = list(method_config.modules_to_save or [])
    return dataclasses.replace(
        method_config, modules_to_save=existing + [n for n in names if n not in existing]
    )


def _name_of(model: Any, module: Any) -> str:
    return next(name for name, m in model.named_modules() if m is module)
