"""Prefix tuning's configuration: PEFT's ``PrefixTuningConfig`` field names and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peftkit.methods.prompt_learning.config import PromptLearningConfig


@dataclass(kw_only=True)
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning (Li & Liang, 2021): trained key/value vectors in front of every attention layer."""

    peft_type: str | None = field(
        default="PREFIX_TUNING",
        metadata={"help": "Which PEFT method this config belongs to (always PREFIX_TUNING)."},
    )
    encoder_hidden_size: int | None = field(
        default=None,
        metadata={
            "help": "Hidden size of the reparameterization MLP (prefix_projection); null uses token_dim."
        },
    )
    prefix_projection: bool = field(
        default=False,
        metadata={
            "help": "Train n small embeddings passed through a 2-layer tanh MLP to all layers' key/values (the "
            "paper's reparameterization, more stable) instead of the key/values directly."
        },
    )
    init_weights: Literal["zero"] | None = field(
        default=None,
        metadata={
            "help": "'zero': the prefix starts at zero (the MLP's last layer with prefix_projection); null: random."
        },
    )

    def validate(self) -> list[str]:
        problems = super().validate()
        size = self.encoder_hidden_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            problems.append(
                f"encoder_hidden_size must be a positive integer or null (token_dim), got {size!r}"
            )
        if self.init_weights not in (None, "zero"):
            problems.append(f"init_weights must be 'zero' or null (random), got {self.init_weights!r}")
        return problems

    def _fill_method_fields(self, model_config: dict) -> None:
        # Grouped-query attention: the prefix has the key/value heads' shape, not the query heads' (PEFT #1901).
        kv_heads = model_config.get("num_key_value_heads")
        if kv_heads is not None:
            head_dim = model_config.get("head_dim") or self.token_dim // self.num_attention_heads
            self.token_dim = head_dim * kv_heads
            self.num_attention_heads = kv_heads
        if self.encoder_hidden_size is None:
            self.encoder_hidden_size = self.token_dim
