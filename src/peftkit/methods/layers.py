"""What every adapter layer that wraps a frozen ``base_layer`` shares, whatever the method."""

from __future__ import annotations

import torch
from torch import nn


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapter weights stay fp32 on half-precision models (stable training), else follow the base."""
    return base_dtype if base_dtype == torch.float64 else torch.float32


class WrappedLayer(nn.Module):
    """A frozen ``base_layer`` plus named adapters, of which ``active_adapter`` is used in forward."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.active_adapter: str | None = None

    # Explicit delegation of what model code reads off the wrapped layer (dtype checks, tying).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)
