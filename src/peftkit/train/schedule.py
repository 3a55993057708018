"""Learning-rate schedule: linear warm-up, then cosine or linear decay (or constant), over the
run's number of optimizer steps."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch

from peftkit.train.config import MANY_STEPS

if TYPE_CHECKING:
    from peftkit.train.config import TrainJobConfig


def lr_multiplier(step: int, *, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """Factor applied to the peak learning rate at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


def warmup_steps(training, total: int) -> int:
    if training.warmup_steps is not None:
        return min(training.warmup_steps, total)
    return int(training.warmup_ratio * total)


def build_scheduler(
    optimizer: torch.optim.Optimizer, training, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    if training.warmup_steps is not None and training.warmup_steps > total:
        # With max_steps set this is a config error; with epochs the total is known only now.
        warnings.warn(
            f"training.warmup_steps ({training.warmup_steps}) is more than the run's {total} optimizer "
            "steps: the learning rate warms up over the whole run and never decays; lower "
            "warmup_steps or use warmup_ratio",
            stacklevel=2,
        )
    warmup = warmup_steps(training, total)

    def factor(step: int) -> float:
        return lr_multiplier(
            step, total=total, warmup=warmup, kind=training.lr_scheduler, min_ratio=training.min_lr_ratio
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def total_optimizer_steps(job: TrainJobConfig, batches_per_epoch: int) -> int:
    """The run's optimizer steps: ``training.max_steps``, or its epochs of micro-batches."""
    t = job.training
    if t.max_steps is not None:
        return t.max_steps  # a huge max_steps was already a warning when the config was read
    total = max(1, math.ceil(t.epochs * batches_per_epoch / t.gradient_accumulation_steps))
    if total > MANY_STEPS:
        warnings.warn(
            f"training.epochs ({t.epochs:g}) of {batches_per_epoch:,} micro-batches make {total:,} optimizer "
            f"steps, more than {MANY_STEPS:,}: check training.epochs (or set training.max_steps)",
            stacklevel=2,
        )
    return total
