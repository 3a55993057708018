"""AdaLoRA's configuration: PEFT's ``AdaLoraConfig`` field names and defaults.

AdaLoRA is LoRA in SVD form with a rank budget that shrinks during training, so the config is
``LoraConfig`` plus the schedule. Three phases over ``total_step`` optimizer steps::

    step:  1 ........ tinit | tinit+1 ...................... total_step-tfinal | ... total_step
           warm-up:          budgeting: the rank budget falls   final: the masks are fixed,
           all init_r ranks   cubically from init_r to target_r  the kept ranks fine-tune
                              per module (on average), pruning
                              the least important triplets

LoRA fields AdaLoRA does not use (``r``, ``use_rslora``, ``alpha_pattern``) are kept so PEFT
files round-trip; PEFT ignores them too.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from peftkit.methods.lora.config import LoraConfig


@dataclass(kw_only=True)
class AdaLoraConfig(LoraConfig):
    """Adaptive budget allocation for LoRA (Zhang et al., ICLR 2023): ``W x + B (A * E) x * alpha / r``."""

    peft_type: str | None = field(
        default="ADALORA", metadata={"help": "Which PEFT method this config belongs to (always ADALORA)."}
    )
    target_r: int = field(
        default=8,
        metadata={"help": "Average rank per adapted module once the budget has shrunk (<= init_r)."},
    )
    init_r: int = field(
        default=12,
        metadata={"help": "Rank every adapted module starts with (A: (init_r, in), B: (out, init_r))."},
    )
    tinit: int = field(
        default=0, metadata={"help": "Warm-up steps at the full init_r budget before any rank is pruned."}
    )
    tfinal: int = field(
        default=0, metadata={"help": "Final steps with the pruned ranks fixed (masks no longer change)."}
    )
    deltaT: int = field(
        default=1, metadata={"help": "During budgeting, re-allocate the ranks every deltaT steps."}
    )
    beta1: float = field(
        default=0.85,
        metadata={"help": "EMA factor smoothing each weight's sensitivity |w * grad| (0 < beta1 < 1)."},
    )
    beta2: float = field(
        default=0.85, metadata={"help": "EMA factor of the sensitivity's uncertainty (0 < beta2 < 1)."}
    )
    orth_reg_weight: float = field(
        default=0.5,
        metadata={"help": "Weight of the regulariser keeping A's rows and B's columns orthonormal (>= 0)."},
    )
    total_step: int | None = field(
        default=None,
        metadata={
            "help": "Length of the budget schedule in optimizer steps. PEFT requires it; `peftkit train` fills "
            "it from the run's total steps when left null."
        },
    )
    rank_pattern: dict[str, list[bool]] | None = field(  # type: ignore[assignment]
        default=None,
        metadata={
            "help": "Written by training: {'<module>.lora_E': [kept, ...] per rank}. A loaded adapter uses it to "
            "size each module; leave it null when creating an adapter."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r != 8:  # PEFT warns the same way: r is LoRA's, AdaLoRA starts at init_r
            warnings.warn("AdaLoRA ignores r; set init_r for the starting rank", stacklevel=3)

    def validate(self) -> list[str]:
        # LoraConfig checks rank_pattern as {regex: int}; AdaLoRA's holds masks, checked below.
        pattern, self.rank_pattern = self.rank_pattern, {}
        try:
            problems = super().validate()
        finally:
            self.rank_pattern = pattern
        problems += self._schedule_problems()
        if self.use_dora:
            problems.append("AdaLoRA does not support DoRA (PEFT refuses it too): set use_dora to false")
        if not isinstance(self.init_lora_weights, bool):
            problems.append(
                f"init_lora_weights={self.init_lora_weights!r}: AdaLoRA supports only true (E zero, A and B "
                "normal with std 0.02) or false (all random, for tests)"
            )
        if pattern is not None:
            if not isinstance(pattern, dict) or not all(
                isinstance(v, list) and all(isinstance(b, bool) for b in v) for v in pattern.values()
            ):
                problems.append(
                    "rank_pattern must be {'<module>.lora_E': [true/false per rank]} as AdaLoRA training writes "
                    "it; remove it when creating a new adapter"
                )
        return problems

    def _schedule_problems(self) -> list[str]:
        problems = []

        def bad_int(value: Any, low: int) -> bool:
            return isinstance(value, bool) or not isinstance(value, int) or value < low

        if bad_int(self.init_r, 1):
            problems.append(f"init_r must be a positive integer (the starting rank), got {self.init_r!r}")
        if bad_int(self.target_r, 0):
            problems.append(f"target_r must be an integer >= 0, got {self.target_r!r}")
        elif not bad_int(self.init_r, 1) and self.target_r > self.init_r:
            problems.append(
                f"target_r ({self.target_r}) must not exceed init_r ({self.init_r}): the budget only shrinks"
            )
        for name in ("tinit", "tfinal"):
            if bad_int(getattr(self, name), 0):
                problems.append(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if bad_int(self.deltaT, 1):
            problems.append(f"deltaT must be an integer >= 1, got {self.deltaT!r}")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                problems.append(f"{name} must be strictly between 0 and 1, got {getattr(self, name)!r}")
        if self.orth_reg_weight < 0:
            problems.append(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if self.total_step is not None:
            if bad_int(self.total_step, 1):
                problems.append(f"total_step must be a positive integer or null, got {self.total_step!r}")
            else:
                problems += self.schedule_problem(self.total_step)
        return problems

    def schedule_problem(self, total_step: int) -> list[str]:
        """The budgeting phase must have at least one step: tinit + tfinal < total_step."""
        if (
            isinstance(self.tinit, int)
            and isinstance(self.tfinal, int)
            and self.tinit + self.tfinal >= total_step
        ):
            return [
                f"tinit ({self.tinit}) + tfinal ({self.tfinal}) must be less than total_step ({total_step}) so that "
                "there is a phase where ranks are pruned: lower tinit or tfinal, or train for more steps"
            ]
        return []
