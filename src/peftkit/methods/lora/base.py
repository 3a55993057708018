"""What every LoRA layer type (Linear, Embedding, Conv) shares: bookkeeping, scaling, delegation."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from peftkit.methods.layers import WrappedLayer

if TYPE_CHECKING:
    from peftkit.methods.lora.mixed_batch import RowAdapters


class LoraLayerBase(WrappedLayer):
    """A frozen ``base_layer`` plus named low-rank adapters (an ``AdapterModule``).

    Subclasses create their adapter weights in ``update_layer`` after calling
    :meth:`set_rank`, name their two feature sizes in ``feature_names`` for ``repr``, and
    implement :meth:`has_adapter` and :meth:`adapter_output` (the shared ``forward`` uses them).
    """

    feature_names: ClassVar[tuple[str, str]] = ("in_features", "out_features")
    # Set only for one call by ``mixed_batch`` (mixed_batch.py): one adapter name per batch row.
    row_adapters: RowAdapters | None = None

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int):
        super().__init__(base_layer)
        self.in_features, self.out_features = in_features, out_features
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}

    def set_rank(self, adapter_name: str, r: int, lora_alpha: float, use_rslora: bool) -> None:
        """Record rank and alpha; scaling = alpha / r, or alpha / sqrt(r) with rsLoRA."""
        if r <= 0:
            raise ValueError(f"r must be a positive integer, got {r} for adapter {adapter_name!r}")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if use_rslora else r)

    def has_adapter(self, adapter_name: str) -> bool:
        raise NotImplementedError

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``result`` (the base layer's output for ``x``) with adapter ``adapter_name`` applied."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.row_adapters is not None:
            return self.mixed_batch_forward(x, result)
        adapter = self.active_adapter
        if adapter is None or not self.has_adapter(adapter):
            return result
        return self.adapter_output(x, result, adapter)

    def mixed_batch_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Each row of the batch with its own adapter (``__base__``, or one this layer lacks: none)."""
        output = result.clone()
        for adapter, rows in self.row_adapters.groups(len(x), x.device):
            if self.has_adapter(adapter):
                output[rows] = self.adapter_output(x[rows], result[rows], adapter)
        return output

    def adapter_note(self, adapter_name: str) -> str:
        """Extra per-adapter text for ``repr`` (e.g. ", dora")."""
        return ""

    def extra_repr(self) -> str:
        first, second = self.feature_names
        ranks = ", ".join(f"{name}: r={r}{self.adapter_note(name)}" for name, r in self.r.items())
        return f"{first}={self.in_features}, {second}={self.out_features}, adapters=({ranks})"
