"""OFT's configuration: PEFT's ``OFTConfig`` field names and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peftkit.methods.base import TargetingConfig


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(kw_only=True)
class OFTConfig(TargetingConfig):
    """Orthogonal fine-tuning (Qiu et al., 2023): ``y = W (R x) + b`` with R block-diagonal orthogonal.

    Each adapted layer's input (``in_features``) is split into ``r`` blocks of ``oft_block_size``
    features, ``r × oft_block_size = in_features``; set exactly one of the two (the other 0).
    """

    peft_type: str | None = field(
        default="OFT", metadata={"help": "Which PEFT method this config belongs to (always OFT)."}
    )
    r: int = field(
        default=0,
        metadata={
            "help": "Number of rotation blocks per layer (0: derive it from oft_block_size). Set either r or "
            "oft_block_size, and the other to 0."
        },
    )
    oft_block_size: int = field(
        default=32,
        metadata={
            "help": "Size of each rotation block; should divide every target's in_features (else PEFT's nearest "
            "divisor is used, with a warning). Bigger blocks: more parameters. 0: derive it from r."
        },
    )
    module_dropout: float = field(
        default=0.0,
        metadata={
            "help": "PEFT's multiplicative block dropout. PEFT 0.21 accepts it but never applies it to linear "
            "layers; peftkit does the same, so results match."
        },
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={"help": "PEFT's flag for (in, out) weights; OFT adapts nn.Linear only, so it stays false."},
    )
    bias: Literal["none", "all", "oft_only"] = field(
        default="none",
        metadata={
            "help": "Which base-model biases to train and save: none, all (every bias in the model) or "
            "oft_only (biases of the adapted layers)."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "true: rotations start at the identity, so training starts from the base model (PEFT "
            "default); false: random rotations (for tests only)."
        },
    )
    coft: bool = field(
        default=False,
        metadata={"help": "Constrained OFT: keep each rotation within eps of the identity."},
    )
    eps: float = field(
        default=6e-5,
        metadata={"help": "COFT's radius around the identity (only used with coft: true)."},
    )
    block_share: bool = field(
        default=False,
        metadata={"help": "Share one rotation block across all blocks of a layer (fewer parameters)."},
    )
    use_cayley_neumann: bool = field(
        default=True,
        metadata={
            "help": "true: approximate the Cayley transform by a truncated Neumann series (fast, PEFT default); "
            "false: the exact Cayley transform (a batched linear solve per forward)."
        },
    )
    num_cayley_neumann_terms: int = field(
        default=5,
        metadata={"help": "Terms of the Neumann series (more: closer to orthogonal)."},
    )

    def validate(self) -> list[str]:
        problems = super().validate()
        r, size = self.r, self.oft_block_size
        if not _is_int(r) or r < 0:
            problems.append(f"r must be a non-negative integer (0: derive it from oft_block_size), got {r!r}")
        if not _is_int(size) or size < 0:
            problems.append(
                f"oft_block_size must be a non-negative integer (0: derive it from r), got {size!r}"
            )
        if _is_int(r) and _is_int(size) and r >= 0 and size >= 0:
            if r == 0 and size == 0:
                problems.append(
                    "either r or oft_block_size must be non-zero (r × oft_block_size = in_features): "
                    "set oft_block_size (e.g. 32) or r"
                )
            elif r != 0 and size != 0:
                problems.append(
                    f"set only one of r ({r}) and oft_block_size ({size}), because r × oft_block_size = "
                    f"in_features: to choose r, also set oft_block_size: 0 (its default is 32)"
                )
        if self.bias not in ("none", "all", "oft_only"):
            problems.append(f"bias must be 'none', 'all' or 'oft_only', got {self.bias!r}")
        dropout = self.module_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            problems.append(f"module_dropout must be a probability in [0, 1), got {dropout!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or self.eps <= 0:
            problems.append(f"eps must be a positive number, got {self.eps!r}")
        terms = self.num_cayley_neumann_terms
        if not _is_int(terms) or terms < 1:
            problems.append(f"num_cayley_neumann_terms must be a positive integer, got {terms!r}")
        if not isinstance(self.init_weights, bool):
            problems.append(f"init_weights must be true or false for OFT, got {self.init_weights!r}")
        return problems
