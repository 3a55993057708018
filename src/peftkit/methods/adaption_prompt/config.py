"""LLaMA-Adapter's configuration: PEFT's ``AdaptionPromptConfig`` field names and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.methods.base import PeftConfig


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(kw_only=True)
class AdaptionPromptConfig(PeftConfig):
    """LLaMA-Adapter (Zhang et al., 2023): ``adapter_len`` learned prompt tokens that the top
    ``adapter_layers`` attention layers also attend to, through a zero-initialised gate.

    Not a ``TargetingConfig``: ``target_modules`` is PEFT's single attention-module *name*
    (e.g. ``self_attn``), matched as a suffix of full module names, not a list or regex.
    """

    peft_type: str | None = field(
        default="ADAPTION_PROMPT",
        metadata={"help": "Which PEFT method this config belongs to (always ADAPTION_PROMPT)."},
    )
    target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Name of the attention sub-modules that get adaption prompts (a module matches when its "
            "full name ends with '.' + this name); null uses the model type's default (self_attn for "
            "llama / mistral, attn for gpt2)."
        },
    )
    adapter_len: int | None = field(
        default=None,
        metadata={"help": "Number of learned prompt tokens per adapted layer (the paper uses 10)."},
    )
    adapter_layers: int | None = field(
        default=None,
        metadata={
            "help": "How many attention layers, counted from the top of the model, get adaption prompts "
            "(the paper uses 30 of LLaMA-7B's 32); at most the model's number of layers."
        },
    )

    def validate(self) -> list[str]:
        problems = super().validate()
        if not _positive_int(self.adapter_len):
            problems.append(
                f"adapter_len must be a positive integer (the number of prompt tokens, e.g. 10), "
                f"got {self.adapter_len!r}"
            )
        if not _positive_int(self.adapter_layers):
            problems.append(
                "adapter_layers must be a positive integer (how many of the top attention layers to adapt, "
                f"at most the model's number of layers), got {self.adapter_layers!r}"
            )
        if self.target_modules is not None and (
            not isinstance(self.target_modules, str) or not self.target_modules
        ):
            problems.append(
                "target_modules must be the name of the attention sub-module (e.g. 'self_attn') or null "
                f"for the model type's default, got {self.target_modules!r}"
            )
        return problems
