"""Task-vector merging helpers: prune, TIES, DARE (as PEFT's ``utils/merge_utils.py``).

Each merge takes ``n`` same-shaped task tensors and ``n`` weights and returns one tensor:

    task tensors ─► prune (magnitude: keep top-k |x|; random: Bernoulli(density) mask, / density)
                 ─► stack (n, ...) ─► × weights ─► sum                   (task arithmetic, DARE linear)
                                                 ─► sign election ─► mean of agreeing entries (TIES)

The order of random draws (one ``torch.bernoulli`` per task tensor, in the given order) is
PEFT's, so seeding torch identically gives identical DARE masks in both libraries.

Papers: TIES-Merging (https://arxiv.org/abs/2306.01708), DARE (https://arxiv.org/abs/2311.03099).
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

SignMethod = Literal["total", "frequency"]


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``stacked`` (n, ...) times ``weights`` (n,) broadcast over the trailing dimensions."""
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))


def prune(
    tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"], rescale: bool = False
) -> torch.Tensor:
    """Keep a ``density`` fraction of ``tensor``: the largest magnitudes, or a random subset."""
    if density >= 1:
        warnings.warn(
            f"The density {density} is greater than or equal to 1, no pruning will be performed.",
            stacklevel=2,
        )
        return tensor
    if density < 0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    if method == "magnitude":
        mask = torch.zeros_like(tensor).reshape(-1)
        top = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)
        mask[top[1]] = 1
        return tensor * mask.reshape(tensor.shape)
    if method == "random":
        pruned = tensor * torch.bernoulli(torch.full_like(input=tensor, fill_value=density))
        return pruned / density if rescale else pruned
    raise ValueError(f"unknown prune method {method!r}; use 'magnitude' or 'random'")


def majority_sign_mask(stacked: torch.Tensor, method: SignMethod = "total") -> torch.Tensor:
    """Where each entry agrees with the elected sign: sign of the sum ("total") or of the sign count."""
    sign = stacked.sign()
    if method == "total":
        magnitude = stacked.sum(dim=0)
    elif method == "frequency":
        magnitude = sign.sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {method!r}")
    return sign == torch.where(magnitude >= 0, 1, -1)


def disjoint_merge(stacked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tasks whose entry has the elected sign (0 where none has)."""
    return (stacked * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def task_arithmetic(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    return _weighted(torch.stack(tensors, dim=0), weights).sum(dim=0)


def magnitude_prune(tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    return task_arithmetic([prune(t, density, "magnitude") for t in tensors], weights)


def ties(
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: SignMethod = "total",
) -> torch.Tensor:
    stacked = torch.stack([prune(t, density, "magnitude") for t in tensors], dim=0)
    mask = majority_sign_mask(stacked, majority_sign_method)  # elected on the unweighted tensors, as PEFT
    return disjoint_merge(_weighted(stacked, weights), mask)


def dare_linear(tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    return task_arithmetic([prune(t, density, "random", rescale=True) for t in tensors], weights)


def dare_ties(
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: SignMethod = "total",
) -> torch.Tensor:
    stacked = torch.stack([prune(t, density, "random", rescale=True) for t in tensors], dim=0)
    mask = majority_sign_mask(stacked, majority_sign_method)
    return disjoint_merge(_weighted(stacked, weights), mask)


# combination type (without a "_svd" suffix) -> (merge function, needs density, needs sign method)
MERGES = {
    "linear": (task_arithmetic, False, False),
    "svd": (task_arithmetic, False, False),
    "ties": (ties, True, True),
    "dare_linear": (dare_linear, True, False),
    "dare_ties": (dare_ties, True, True),
    "magnitude_prune": (magnitude_prune, True, False),
}


def merge(
    kind: str,
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float | None,
    majority_sign_method: SignMethod,
) -> torch.Tensor:
    """Run the merge named ``kind`` (a key of :data:`MERGES`) with the arguments it uses."""
    function, uses_density, uses_sign = MERGES[kind]
    args: list = [tensors, weights]
    if uses_density:
        args.append(density)
    if uses_sign:
        args.append(majority_sign_method)
    return function(*args)
