"""AdapterFusion's configuration (``method: adapter_fusion``; PEFT has no such method)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from peftkit.methods.base import PeftConfig


@dataclass(kw_only=True)
class AdapterFusionConfig(PeftConfig):
    """Fuse trained bottleneck adapters (saved directories) with a learned per-layer attention.

    The fused adapters must sit at the same sub-layers (same ``adapter_type`` and modules, in the
    layers above ``drop_lowest_layers``); their bottleneck widths and activations may differ. They stay frozen: only the
    fusion's query / key / value layers (and ``modules_to_save``) train.
    """

    peft_type: str | None = field(
        default="ADAPTER_FUSION",
        metadata={"help": "Which PEFT method this config belongs to (always ADAPTER_FUSION)."},
    )
    adapters: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Directories (or Hub ids) of saved bottleneck adapters to fuse, in order; each must have "
            "peft_type BOTTLENECK and the same placement. Local paths are recorded as absolute paths."
        },
    )
    drop_lowest_layers: int = field(
        default=0,
        metadata={
            "help": "AdapterDrop for AdapterFusion (Rueckle et al., 2021, section 5): no fusion and no adapter in "
            "the lowest k layers. Also lets adapters with different drop_lowest_layers be fused: set it to at "
            "least the largest of theirs, so only the layers they all cover are fused."
        },
    )
    regularization: float = field(
        default=0.01,
        metadata={
            "help": "lambda in the loss term lambda * sum_layers ||I - V||^2 that keeps each value matrix V "
            "near the identity (the paper's regularisation; 0 turns it off)."
        },
    )
    value_init_std: float = field(
        default=1e-6,
        metadata={
            "help": "V starts as the identity plus off-diagonal N(0, value_init_std^2) noise (the paper: 'a "
            "diagonal of ones and ... random weights having a small norm (1e-6)'); 0 gives exactly I."
        },
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules trained in full and saved with the fusion (e.g. a classifier head); matched by "
            "name suffix. The fused adapters' own modules_to_save are not loaded."
        },
    )

    def __post_init__(self) -> None:
        for name in ("adapters", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, tuple):
                setattr(self, name, list(value))
        if isinstance(self.adapters, str):
            self.adapters = [self.adapters]
        super().__post_init__()

    def validate(self) -> list[str]:
        problems = super().validate()
        if not isinstance(self.adapters, list) or not self.adapters:
            problems.append(
                "adapters is empty: list the directories of the trained bottleneck adapters to fuse"
            )
        elif not all(isinstance(a, str) and a for a in self.adapters):
            problems.append(f"adapters must be directory names (strings), got {self.adapters!r}")
        elif len(set(self.adapters)) != len(self.adapters):
            problems.append(f"adapters lists a directory twice: {self.adapters!r}")
        drop = self.drop_lowest_layers
        if isinstance(drop, bool) or not isinstance(drop, int) or drop < 0:
            problems.append(f"drop_lowest_layers must be a non-negative integer, got {drop!r}")
        for name in ("regularization", "value_init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                problems.append(f"{name} must be a number >= 0, got {value!r}")
            elif not math.isfinite(value):
                problems.append(f"{name} must be finite, got {value!r}")
        if isinstance(self.modules_to_save, list) and not self.modules_to_save:
            problems.append("modules_to_save is an empty list: use null for none")
        return problems
