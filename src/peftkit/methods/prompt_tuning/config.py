"""Prompt tuning's configuration: PEFT's ``PromptTuningConfig`` field names and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from peftkit.methods.prompt_learning.config import PromptLearningConfig


class PromptTuningInit(str, Enum):
    """How the virtual token embeddings start (PEFT's values)."""

    RANDOM = "RANDOM"  # N(0, 1), nn.Embedding's default
    TEXT = "TEXT"  # the embeddings of prompt_tuning_init_text's tokens, repeated/cut to fit
    SAMPLE_VOCAB = "SAMPLE_VOCAB"  # embeddings of tokens drawn at random from the vocabulary


@dataclass(kw_only=True)
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (Lester et al., 2021): learn the embeddings of ``num_virtual_tokens`` input tokens."""

    peft_type: str | None = field(
        default="PROMPT_TUNING",
        metadata={"help": "Which PEFT method this config belongs to (always PROMPT_TUNING)."},
    )
    prompt_tuning_init: PromptTuningInit = field(
        default=PromptTuningInit.RANDOM,
        metadata={
            "help": "How the prompt starts: RANDOM, TEXT (the embeddings of prompt_tuning_init_text) or "
            "SAMPLE_VOCAB (embeddings of random vocabulary tokens)."
        },
    )
    prompt_tuning_init_text: str | None = field(
        default=None, metadata={"help": "The text whose token embeddings start the prompt (TEXT init)."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Tokenizer (Hub id or directory) for prompt_tuning_init_text (TEXT init)."},
    )
    tokenizer_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Extra keyword arguments for AutoTokenizer.from_pretrained (TEXT init)."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.prompt_tuning_init, str) and not isinstance(
            self.prompt_tuning_init, PromptTuningInit
        ):
            try:
                self.prompt_tuning_init = PromptTuningInit(self.prompt_tuning_init.upper())
            except ValueError:
                pass  # reported by validate()
        super().__post_init__()

    def validate(self) -> list[str]:
        problems = super().validate()
        init = self.prompt_tuning_init
        if not isinstance(init, PromptTuningInit):
            valid = ", ".join(i.value for i in PromptTuningInit)
            problems.append(f"prompt_tuning_init must be one of {valid}, got {init!r}")
        if init == PromptTuningInit.TEXT:
            if not self.tokenizer_name_or_path:
                problems.append(
                    "prompt_tuning_init is TEXT but tokenizer_name_or_path is not set: name the tokenizer that "
                    "turns prompt_tuning_init_text into tokens (usually the base model's)"
                )
            if not self.prompt_tuning_init_text:
                problems.append(
                    "prompt_tuning_init is TEXT but prompt_tuning_init_text is empty: give the text to start "
                    "from (e.g. 'Classify the sentiment of this tweet:') or use RANDOM / SAMPLE_VOCAB"
                )
        elif self.tokenizer_kwargs:
            problems.append(
                "tokenizer_kwargs is only used with prompt_tuning_init TEXT: remove it or use TEXT"
            )
        return problems
