"""Shared pieces of folding an adapter into its base layer's weights."""

from __future__ import annotations

import torch


def require_finite(update: torch.Tensor, adapter: str) -> torch.Tensor:
    """``update`` itself, or an error if it holds NaN / inf (which would silently ruin the model)."""
    if not torch.isfinite(update).all():
        raise ValueError(f"adapter {adapter!r} has NaN or inf weights; refusing to merge them into the model")
    return update


def add_to_weight(weight: torch.Tensor, delta: torch.Tensor, adapter: str) -> None:
    """``weight += delta`` in place (in the weight's dtype), after checking ``delta`` is finite."""
    require_finite(delta, adapter)
    with torch.no_grad():
        weight.add_(delta.to(weight.dtype))
