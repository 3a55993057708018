"""LoKr's configuration: PEFT's ``LoKrConfig`` field names and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.methods.lycoris import LycorisConfig


@dataclass(kw_only=True)
class LoKrConfig(LycorisConfig):
    """Low-rank Kronecker product (LyCORIS, Yeh et al., 2023): ``W x + (alpha / r) * kron(w1, w2) x``.

    Each side of W is split into two factors (out = a·b, in = c·d); w1 is (a, c), w2 is (b, d), and
    either may itself be a rank-r product when r is small compared to its sides.
    """

    peft_type: str | None = field(
        default="LOKR", metadata={"help": "Which PEFT method this config belongs to (always LOKR)."}
    )
    init_weights: bool | str = field(
        default=True,
        metadata={
            "help": "true: w1 starts at zero so training starts from the base model (PEFT default); "
            "'lycoris': w2 starts at zero instead (the LyCORIS repository's way); false: all random (tests)."
        },
    )
    decompose_both: bool = field(
        default=False,
        metadata={
            "help": "Also write the left factor w1 as a rank-r product (when r < its larger side / 2)."
        },
    )
    decompose_factor: int = field(
        default=-1,
        metadata={
            "help": "Split each dimension into two factors, one as close to this as possible; -1 splits near "
            "the square root."
        },
    )
    rank_dropout_scale: bool = field(
        default=False,
        metadata={"help": "Scale rows kept by rank_dropout up by 1 / (fraction kept)."},
    )

    def validate(self) -> list[str]:
        problems = super().validate()
        if not (isinstance(self.init_weights, bool) or self.init_weights == "lycoris"):
            problems.append(f"init_weights must be true, false or 'lycoris', got {self.init_weights!r}")
        factor = self.decompose_factor
        if isinstance(factor, bool) or not isinstance(factor, int) or not (factor == -1 or factor > 0):
            problems.append(f"decompose_factor must be -1 or a positive integer, got {factor!r}")
        return problems
