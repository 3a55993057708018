"""LoRA's configuration: PEFT's ``LoraConfig`` field names and defaults, for the parts we implement."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from peftkit.methods.base import TargetingConfig

PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def is_weight_moving_init(init_lora_weights: bool | str) -> bool:
    """True for the inits that change the base weight ("pissa", "pissa_niter_N", "olora"; see init.py)."""
    return isinstance(init_lora_weights, str) and (
        init_lora_weights in ("pissa", "olora") or PISSA_NITER.fullmatch(init_lora_weights) is not None
    )


@dataclass(kw_only=True)
class LoraConfig(TargetingConfig):
    """Low-rank adaptation (Hu et al., 2021): ``W x + (alpha / r) * B A x`` with A: (r, in), B: (out, r)."""

    peft_type: str | None = field(
        default="LORA", metadata={"help": "Which PEFT method this config belongs to (always LORA)."}
    )
    r: int = field(
        default=8, metadata={"help": "Rank of the update B @ A; more rank, more capacity and memory."}
    )
    lora_alpha: int | float = field(
        default=8,
        metadata={
            "help": "Scale of the update: it is multiplied by lora_alpha / r (or / sqrt(r) with rslora)."
        },
    )
    lora_dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the LoRA branch's input (0 <= p < 1)."}
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={
            "help": "PEFT's flag for layers storing weights as (in, out), like GPT-2's Conv1D. peftkit reads the "
            "orientation from the layer type; the flag is kept so PEFT files round-trip."
        },
    )
    bias: Literal["none", "all", "lora_only"] = field(
        default="none",
        metadata={
            "help": "Which base-model biases to train and save: none, all (every bias in the model) or "
            "lora_only (biases of the adapted layers)."
        },
    )
    use_rslora: bool = field(
        default=False,
        metadata={"help": "Rank-stabilised LoRA: scale by lora_alpha / sqrt(r) instead of lora_alpha / r."},
    )
    init_lora_weights: bool | str = field(
        default=True,
        metadata={
            "help": "true: A kaiming-uniform, B zero, so training starts from the base model (PEFT default); "
            "'gaussian': A normal with std 1/r, B zero; 'pissa' / 'pissa_niter_N' (fast SVD, N iterations): "
            "A, B from the top-r SVD of the base weight; 'olora': from its QR decomposition; false: A and B both "
            "random (for tests only). pissa and olora subtract B @ A from the base weight: save that model too."
        },
    )
    use_dora: bool = field(
        default=False,
        metadata={
            "help": "DoRA: also train a per-output magnitude vector, rescaling each row of W + BA to it "
            "(linear, Conv1D, embedding and conv layers, as in PEFT; slower than plain LoRA)."
        },
    )
    rank_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "Per-module ranks: {regex matched against the end of the module name: r}."},
    )
    alpha_pattern: dict[str, int | float] = field(
        default_factory=dict,
        metadata={
            "help": "Per-module lora_alpha: {regex matched against the end of the module name: alpha}."
        },
    )

    trainable_token_indices: list[int] | dict[str, list[int]] | None = field(
        default=None,
        metadata={
            "help": "Train only these rows of the embedding (e.g. tokens added to the vocabulary), saved as "
            "PEFT's trainable_tokens_delta. A list targets the input embedding (and a tied lm_head); "
            "{module name: [indices]} targets the named layers."
        },
    )

    PEFT_DEFAULTS_NOT_IMPLEMENTED: ClassVar[dict[str, Any]] = {
        "alora_invocation_tokens": None,
        "arrow_config": None,
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "kasa_config": None,
        "layer_replication": None,
        "loftq_config": {},
        "lora_bias": False,
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "monteclora_config": None,
        "qalora_group_size": 16,
        "target_parameters": None,
        "use_bdlora": None,
        "use_qalora": False,
        "velora_config": None,
    }
    PEFT_KEYS_SWITCHED_BY: ClassVar[dict[str, str]] = {
        "megatron_core": "megatron_config",
        "qalora_group_size": "use_qalora",
    }

    def validate(self) -> list[str]:
        problems = super().validate()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            problems.append(f"r must be a positive integer (the LoRA rank, typically 8-64), got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            problems.append(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        init = self.init_lora_weights
        if not (isinstance(init, bool) or init == "gaussian" or is_weight_moving_init(init)):
            problems.append(
                f"init_lora_weights={init!r} is not supported by peftkit; use true (default), 'gaussian', "
                "'pissa', 'pissa_niter_<iterations>', 'olora' or false"
            )
        if not isinstance(self.use_dora, bool):
            problems.append(f"use_dora must be true or false, got {self.use_dora!r}")
        problems.extend(_token_index_problems(self.trainable_token_indices))
        if self.trainable_token_indices is not None and self.peft_type != "LORA":
            # Subclasses (AdaLoRA) inherit the field; only LoraModel wraps the token rows so far.
            problems.append(
                f"trainable_token_indices is not supported by peftkit for {self.peft_type} yet: remove it, "
                "or use method lora"
            )
        for pattern, rank in self.rank_pattern.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                problems.append(f"rank_pattern[{pattern!r}] must be a positive integer rank, got {rank!r}")
        return problems


def _token_index_problems(indices: list[int] | dict[str, list[int]] | None) -> list[str]:
    """What is wrong with a ``trainable_token_indices`` value (empty list: nothing)."""
    if indices is None:
        return []
    groups = indices if isinstance(indices, dict) else {"": indices}
    problems = []
    for name, values in groups.items():
        where = f"trainable_token_indices[{name!r}]" if name else "trainable_token_indices"
        if not isinstance(values, (list, tuple)) or not values:
            problems.append(f"{where} must be a non-empty list of token ids, got {values!r}")
        elif any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
            problems.append(f"{where} must hold token ids (integers >= 0), got {values!r}")
        elif len(set(values)) != len(values):
            problems.append(f"{where} lists a token id twice: {values!r}")
    return problems
