"""LoHa's configuration: PEFT's ``LoHaConfig`` field names and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.methods.lycoris import LycorisConfig


@dataclass(kw_only=True)
class LoHaConfig(LycorisConfig):
    """Low-rank Hadamard product (FedPara, Hyeon-Woo et al., 2021):
    ``W x + (alpha / r) * ((w1_a @ w1_b) ⊙ (w2_a @ w2_b)) x``; rank up to r² for 2r(in + out) parameters.
    """

    peft_type: str | None = field(
        default="LOHA", metadata={"help": "Which PEFT method this config belongs to (always LOHA)."}
    )

    def validate(self) -> list[str]:
        problems = super().validate()
        if not isinstance(self.init_weights, bool):
            problems.append(f"init_weights must be true or false for LoHa, got {self.init_weights!r}")
        return problems
