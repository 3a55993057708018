"""Prompt tuning's encoder: a table of virtual token embeddings (PEFT's ``PromptEmbedding``).

    embedding  (num_virtual_tokens * num_transformer_submodules, token_dim)  -- trained directly

TEXT init copies the embeddings of the init text's tokens (repeated, then cut, to fill every
row); SAMPLE_VOCAB those of random vocabulary tokens. A frozen (inference-mode) adapter skips
the init: its values come from the file.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peftkit.methods.prompt_tuning.config import PromptTuningConfig, PromptTuningInit


def init_token_ids(config: PromptTuningConfig, total: int) -> list[int]:
    """The init text's token ids, repeated and cut to exactly ``total`` entries."""
    from transformers import AutoTokenizer

    from peftkit.model_aliases import ALIASES
    from peftkit.models import resolve_model_dir

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # never run a tokenizer's remote code for an init
    name = config.tokenizer_name_or_path
    source = resolve_model_dir(name) if name in ALIASES else name  # a built-in alias works too
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ValueError(
            f"prompt_tuning_init_text {config.prompt_tuning_init_text!r} gives no tokens: use a longer text"
        )
    return (ids * math.ceil(total / len(ids)))[:total]


class PromptEmbedding(nn.Module):
    """The trained prompt table; ``table()`` is the whole prompt, ``(total, token_dim)``."""

    is_table = True  # the file's prompt_embeddings load straight into .embedding

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Embedding):
        super().__init__()
        total = config.total_virtual_tokens
        self.embedding = nn.Embedding(total, config.token_dim, device=word_embeddings.weight.device)
        init = config.prompt_tuning_init
        if config.inference_mode or init == PromptTuningInit.RANDOM:
            return
        if init == PromptTuningInit.SAMPLE_VOCAB:
            ids = torch.randint(0, word_embeddings.num_embeddings, (total,), dtype=torch.long)
        else:
            ids = torch.tensor(init_token_ids(config, total), dtype=torch.long)
        if int(ids.max()) >= word_embeddings.num_embeddings:
            raise ValueError(
                f"the tokenizer {config.tokenizer_name_or_path!r} gives token ids up to {int(ids.max())}, beyond the "
                f"model's vocabulary ({word_embeddings.num_embeddings}): use the base model's tokenizer"
            )
        with torch.no_grad():
            values = word_embeddings(ids.to(word_embeddings.weight.device)).detach().clone().float()
        self.embedding.weight = nn.Parameter(values)

    def table(self) -> torch.Tensor:
        return self.embedding.weight

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)
