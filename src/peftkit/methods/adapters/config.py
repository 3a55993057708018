"""Bottleneck adapters' configuration (``method: bottleneck``; PEFT has no such method)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.methods.base import TargetingConfig

ADAPTER_TYPES = ("houlsby", "pfeiffer", "parallel")
NON_LINEARITIES = ("relu", "gelu", "gelu_tanh", "silu", "swish", "tanh", "sigmoid", "identity")
INITS = ("zero", "random")


@dataclass(kw_only=True)
class BottleneckConfig(TargetingConfig):
    """Bottleneck adapters: ``h + up(f(down(h)))`` after sub-layers (Houlsby et al., 2019;
    Pfeiffer et al., 2021), or ``sub(x) + s * up(f(down(x)))`` beside the feed-forward block
    (He et al., 2022); optionally without the lowest layers' adapters (AdapterDrop, Rueckle et al.,
    2021). ``target_modules`` is filled in from ``attention_modules`` / ``mlp_modules``
    (the full names of the wrapped sub-layers) and need not be set.
    """

    NAME_LIST_FIELDS = TargetingConfig.NAME_LIST_FIELDS + ("attention_modules", "mlp_modules")

    peft_type: str | None = field(
        default="BOTTLENECK",
        metadata={"help": "Which PEFT method this config belongs to (always BOTTLENECK)."},
    )
    adapter_type: str = field(
        default="houlsby",
        metadata={
            "help": "houlsby: a sequential adapter after the attention AND the feed-forward sub-layer of every "
            "block; pfeiffer: one after the feed-forward sub-layer only; parallel: one beside the feed-forward "
            "sub-layer, reading its input and adding scaling * adapter(input) to its output."
        },
    )
    bottleneck_size: int | None = field(
        default=None,
        metadata={"help": "Width of the bottleneck (down-projection output). Set this or reduction_factor."},
    )
    reduction_factor: int | None = field(
        default=None,
        metadata={
            "help": "bottleneck_size = hidden size // reduction_factor (at least 1). Used when bottleneck_size "
            "is null; both null means reduction_factor 16."
        },
    )
    non_linearity: str = field(
        default="relu",
        metadata={"help": f"Activation between the projections: {', '.join(NON_LINEARITIES)}."},
    )
    scaling: float = field(
        default=1.0,
        metadata={"help": "s in sub(x) + s * up(f(down(x))); parallel adapters only (He et al. use 4)."},
    )
    init: str = field(
        default="zero",
        metadata={
            "help": "zero: the up-projection starts at zero, so the model's outputs are unchanged at first; "
            "random: default nn.Linear init for both projections (for tests)."
        },
    )
    attention_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Attention sub-layers whose OUTPUT a houlsby adapter follows (e.g. [self_attn]); a list "
            "matches names equal to or ending with '.' + entry, a string is a regex for the full name; null "
            "uses the default for the model architecture. Ignored by pfeiffer and parallel."
        },
    )
    drop_lowest_layers: int = field(
        default=0,
        metadata={
            "help": "AdapterDrop (Rueckle et al., 2021): no adapters in the lowest k transformer layers (layer "
            "index < k, counted per layer stack), in training and inference; those layers are not created. "
            "With drop_random: the most layers a training step may skip (see there)."
        },
    )
    drop_random: bool = field(
        default=False,
        metadata={
            "help": "Robust AdapterDrop: adapters are created in every layer, and each training forward pass "
            "skips those in the lowest n layers, n drawn uniformly from 0..drop_lowest_layers; in eval mode "
            "(inference) no adapter is skipped. Needs drop_lowest_layers >= 1."
        },
    )
    mlp_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Feed-forward sub-layers the adapter follows (houlsby, pfeiffer) or runs beside (parallel; "
            "the module's input and output must both have the hidden size, e.g. [mlp]); same matching as "
            "attention_modules; null uses the default for the model architecture."
        },
    )

    @property
    def parallel(self) -> bool:
        return self.adapter_type == "parallel"

    def validate(self) -> list[str]:
        problems = super().validate()
        if self.adapter_type not in ADAPTER_TYPES:
            problems.append(
                f"adapter_type must be one of {', '.join(ADAPTER_TYPES)}, got {self.adapter_type!r}"
            )
        if self.non_linearity not in NON_LINEARITIES:
            problems.append(
                f"non_linearity must be one of {', '.join(NON_LINEARITIES)}, got {self.non_linearity!r}"
            )
        if self.init not in INITS:
            problems.append(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.bottleneck_size is not None and self.reduction_factor is not None:
            problems.append("set bottleneck_size or reduction_factor, not both")
        for name in ("bottleneck_size", "reduction_factor"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if self.adapter_type in ("houlsby", "pfeiffer") and self.scaling != 1.0:
            problems.append(
                f"scaling={self.scaling} only applies to parallel adapters: set adapter_type: parallel or drop it"
            )
        drop = self.drop_lowest_layers
        if isinstance(drop, bool) or not isinstance(drop, int) or drop < 0:
            problems.append(f"drop_lowest_layers must be a non-negative integer, got {drop!r}")
        elif self.drop_random and drop == 0:
            problems.append(
                "drop_random needs drop_lowest_layers >= 1 (the most layers a training step may skip)"
            )
        for name in ("attention_modules", "mlp_modules"):
            value = getattr(self, name)
            if isinstance(value, list) and not value:
                problems.append(
                    f"{name} is an empty list: name at least one module, or use null for the default"
                )
        return problems

    def bottleneck_width(self, hidden_size: int) -> int:
        """The bottleneck width for sub-layers of ``hidden_size`` features."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return max(1, hidden_size // (self.reduction_factor or 16))
