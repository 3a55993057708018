"""UniPELT's configuration (``method: unipelt``; PEFT has no such method).

One flat config for the three gated parts: the prefix fields are prefix tuning's (inherited from
:class:`PrefixTuningConfig`), the LoRA fields LoRA's (``target_modules``, ``r``, ``lora_alpha``,
``lora_dropout``), the adapter fields a sequential bottleneck adapter's. Defaults follow Mao et
al. (2022) and AdapterHub's UniPELT: a prefix of 10 positions (MLP of width 512 while training),
LoRA of rank 8 on the attention query and value, an adapter of hidden size / 16 after every
feed-forward block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.methods.adapters.config import INITS, NON_LINEARITIES
from peftkit.methods.prefix_tuning.config import PrefixTuningConfig


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(kw_only=True)
class UniPELTConfig(PrefixTuningConfig):
    """UniPELT (Mao et al., 2022): gated LoRA + gated prefix tuning + gated sequential adapter."""

    NAME_LIST_FIELDS = PrefixTuningConfig.NAME_LIST_FIELDS + ("target_modules", "mlp_modules")

    peft_type: str | None = field(
        default="UNIPELT", metadata={"help": "Which PEFT method this config belongs to (always UNIPELT)."}
    )
    num_virtual_tokens: int | None = field(
        default=10, metadata={"help": "Prefix length: key/value positions added to every attention layer."}
    )
    prefix_projection: bool = field(
        default=True,
        metadata={
            "help": "Compute the prefix with a 2-layer tanh MLP from n embeddings while training (Li & Liang's "
            "reparameterization); false trains the key/values directly."
        },
    )
    encoder_hidden_size: int | None = field(
        default=512,
        metadata={"help": "Width of the prefix MLP (prefix_projection); null uses token_dim."},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Linear layers that get gated LoRA: a list matches names equal to or ending with '.' + "
            "entry, a string is a regex for the full name; null uses LoRA's default for the architecture "
            "(the attention query and value, e.g. [q_proj, v_proj])."
        },
    )
    r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha: the update is scaled by alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on LoRA's input (0 to 1)."})
    bottleneck_size: int | None = field(
        default=None,
        metadata={"help": "Width of the adapter's bottleneck; null: hidden size // reduction_factor."},
    )
    reduction_factor: int = field(
        default=16,
        metadata={"help": "bottleneck_size = hidden size // reduction_factor when bottleneck_size is null."},
    )
    non_linearity: str = field(
        default="relu",
        metadata={"help": f"The adapter's activation between its projections: {', '.join(NON_LINEARITIES)}."},
    )
    adapter_init: str = field(
        default="zero",
        metadata={
            "help": "zero: LoRA's B and the adapter's up-projection start at zero (at first only the gated "
            "prefix changes the model); random: both start random (for tests)."
        },
    )
    mlp_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Feed-forward sub-layers the adapter follows (same matching as target_modules); null uses "
            "the bottleneck adapters' sequential (pfeiffer) default for the architecture, e.g. [mlp]."
        },
    )

    def validate(self) -> list[str]:
        problems = super().validate()
        if not _positive_int(self.r):
            problems.append(f"r (LoRA rank) must be a positive integer, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
            problems.append(f"lora_alpha must be a number, got {self.lora_alpha!r}")
        dropout = self.lora_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            problems.append(f"lora_dropout must be a number in [0, 1), got {dropout!r}")
        if self.bottleneck_size is not None and not _positive_int(self.bottleneck_size):
            problems.append(
                f"bottleneck_size must be a positive integer or null, got {self.bottleneck_size!r}"
            )
        if not _positive_int(self.reduction_factor):
            problems.append(f"reduction_factor must be a positive integer, got {self.reduction_factor!r}")
        if self.non_linearity not in NON_LINEARITIES:
            problems.append(
                f"non_linearity must be one of {', '.join(NON_LINEARITIES)}, got {self.non_linearity!r}"
            )
        if self.adapter_init not in INITS:
            problems.append(f"adapter_init must be one of {', '.join(INITS)}, got {self.adapter_init!r}")
        for name in ("target_modules", "mlp_modules"):
            if isinstance(getattr(self, name), list) and not getattr(self, name):
                problems.append(
                    f"{name} is an empty list: name at least one module, or use null for the default"
                )
        return problems

    def bottleneck_width(self, hidden_size: int) -> int:
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return max(1, hidden_size // self.reduction_factor)
