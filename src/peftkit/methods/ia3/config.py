"""(IA)³'s configuration: PEFT's ``IA3Config`` field names and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peftkit.methods.base import TargetingConfig

# Keys of ours that PEFT's IA3Config does not have: left out of adapter_config.json while unset,
# so the files PEFT reads carry exactly its keys (IA3Model spells a layer filter out as names).
_NOT_IN_PEFT_IA3 = ("layers_to_transform", "layers_pattern")


def _covers(target: str, feedforward: str) -> bool:
    """Whether target entry ``target`` adapts the modules that feedforward entry ``feedforward`` names."""
    return target == feedforward or target.endswith(f".{feedforward}")


@dataclass(kw_only=True)
class IA3Config(TargetingConfig):
    """(IA)³ (Liu et al., 2022): learned vectors rescale activations, ``l ⊙ (W x)`` or ``W (l ⊙ x)``."""

    NAME_LIST_FIELDS = TargetingConfig.NAME_LIST_FIELDS + ("feedforward_modules",)

    peft_type: str | None = field(
        default="IA3", metadata={"help": "Which PEFT method this config belongs to (always IA3)."}
    )
    feedforward_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Target modules treated as feed-forward, as in the paper: their vector scales the layer's "
            "INPUT; other targets get their OUTPUT scaled. A list matches module names ending with an entry; a "
            "string is a regex matched against the full name; null uses the default for the model architecture. "
            "Must be a subset of target_modules."
        },
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={
            "help": "PEFT's flag for layers storing weights as (in, out), like GPT-2's Conv1D. peftkit reads the "
            "orientation from the layer type; the flag is kept so PEFT files round-trip."
        },
    )
    init_ia3_weights: bool = field(
        default=True,
        metadata={
            "help": "true: vectors start at 1, so training starts from the base model (PEFT default); "
            "false: random vectors (for tests only)."
        },
    )

    def validate(self) -> list[str]:
        problems = super().validate()
        feedforward, targets = self.feedforward_modules, self.target_modules
        if isinstance(feedforward, list) and isinstance(targets, list):
            # PEFT's rule, read as "every feed-forward entry names target modules": an entry equal
            # to a target, or a suffix of one ("down_proj" in a resolved "model.layers.0.mlp.down_proj").
            extra = [f for f in feedforward if not any(_covers(t, f) for t in targets)]
            if extra:
                problems.append(
                    f"feedforward_modules must be a subset of target_modules, but {extra} are not in "
                    f"target_modules={targets}: add them to target_modules or remove them from feedforward_modules"
                )
        return problems

    def to_peft_json(self) -> dict[str, Any]:
        data = super().to_peft_json()
        for key in _NOT_IN_PEFT_IA3:
            if data.get(key) is None:
                del data[key]
        return data
