"""P-tuning v2's configuration: prefix tuning's fields under peftkit's own ``peft_type`` P_TUNING_V2."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.methods.prefix_tuning.config import PrefixTuningConfig


@dataclass(kw_only=True)
class PTuningV2Config(PrefixTuningConfig):
    """P-tuning v2 (Liu et al., 2022): deep prompts (trained key/values) in every layer, no reparameterization.

    The same fields as :class:`PrefixTuningConfig`; ``prefix_projection`` stays false by default
    (the paper's recommendation for most tasks). PEFT has no P_TUNING_V2: the file is a prefix-tuning
    file with another ``peft_type``.
    """

    peft_type: str | None = field(
        default="P_TUNING_V2",
        metadata={"help": "Which PEFT method this config belongs to (always P_TUNING_V2)."},
    )
