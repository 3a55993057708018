"""BOFT's configuration: PEFT's ``BOFTConfig`` field names and defaults.

The checks that need a layer's size (does the block size divide ``in_features``? does the
butterfly fit?) run when a layer is adapted, in :func:`peftkit.methods.boft.layer.block_layout`;
this module checks what the numbers alone can say.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peftkit.methods.base import TargetingConfig


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(kw_only=True)
class BOFTConfig(TargetingConfig):
    """Butterfly orthogonal fine-tuning (Liu et al., ICLR 2024): ``y = s ⊙ (W (x R)) + b``.

    R is a product of ``boft_n_butterfly_factor`` permuted block-diagonal orthogonal matrices of
    ``boft_block_num`` blocks of ``boft_block_size`` features each (``boft_block_size ×
    boft_block_num = in_features``; set exactly one of the two, the other 0). With one factor BOFT
    is OFT (plus the output scale ``s``).
    """

    peft_type: str | None = field(
        default="BOFT", metadata={"help": "Which PEFT method this config belongs to (always BOFT)."}
    )
    boft_block_size: int = field(
        default=4,
        metadata={
            "help": "Size of each rotation block; must divide every target's in_features. Bigger blocks: more "
            "parameters. Set either boft_block_size or boft_block_num, and the other to 0."
        },
    )
    boft_block_num: int = field(
        default=0,
        metadata={
            "help": "Number of rotation blocks per layer (0: derive it from boft_block_size); must divide every "
            "target's in_features. More blocks: fewer parameters."
        },
    )
    boft_n_butterfly_factor: int = field(
        default=1,
        metadata={
            "help": "Number of butterfly factors (1: plain OFT). Each extra factor doubles the span a rotation "
            "mixes; needs in_features divisible by boft_block_size × 2^(factors-1) and even block sizes."
        },
    )
    boft_dropout: float = field(
        default=0.0,
        metadata={
            "help": "Multiplicative dropout: in training, this fraction of the blocks of one randomly chosen "
            "butterfly factor is replaced by the identity."
        },
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={
            "help": "PEFT's flag for (in, out) weights; BOFT adapts nn.Linear / Conv2d, so it stays false."
        },
    )
    bias: Literal["none", "all", "boft_only"] = field(
        default="none",
        metadata={
            "help": "Which base-model biases to train and save: none, all (every bias in the model) or "
            "boft_only (biases of the adapted layers)."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "true: identity rotations and unit scales, so training starts from the base model (PEFT "
            "default); false: random ones (for tests only)."
        },
    )

    def validate(self) -> list[str]:
        problems = super().validate()
        size, num = self.boft_block_size, self.boft_block_num
        if not _is_int(size) or size < 0:
            problems.append(
                f"boft_block_size must be a non-negative integer (0: derive it from boft_block_num), got {size!r}"
            )
        if not _is_int(num) or num < 0:
            problems.append(
                f"boft_block_num must be a non-negative integer (0: derive it from boft_block_size), got {num!r}"
            )
        if _is_int(size) and _is_int(num) and size >= 0 and num >= 0:
            if size == 0 and num == 0:
                problems.append(
                    "either boft_block_size or boft_block_num must be non-zero (boft_block_size × "
                    "boft_block_num = in_features): set boft_block_size (e.g. 4) or boft_block_num"
                )
            elif size != 0 and num != 0:
                problems.append(
                    f"set only one of boft_block_size ({size}) and boft_block_num ({num}), because "
                    "boft_block_size × boft_block_num = in_features: to choose boft_block_num, also set "
                    "boft_block_size: 0 (its default is 4)"
                )
        factor = self.boft_n_butterfly_factor
        if not _is_int(factor) or factor < 1:
            problems.append(
                f"boft_n_butterfly_factor must be a positive integer (1: plain OFT blocks), got {factor!r}"
            )
        dropout = self.boft_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            problems.append(f"boft_dropout must be a probability in [0, 1), got {dropout!r}")
        if self.bias not in ("none", "all", "boft_only"):
            problems.append(f"bias must be 'none', 'all' or 'boft_only', got {self.bias!r}")
        if not isinstance(self.init_weights, bool):
            problems.append(f"init_weights must be true or false for BOFT, got {self.init_weights!r}")
        return problems
