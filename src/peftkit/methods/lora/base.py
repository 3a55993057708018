"""What every LoRA layer type (Linear, Embedding, Conv) shares: bookkeeping, scaling, delegation."""

from __future__ import annotations

import math
from typing import ClassVar

from torch import nn

from peftkit.methods.layers import WrappedLayer


class LoraLayerBase(WrappedLayer):
    """A frozen ``base_layer`` plus named low-rank adapters (an ``AdapterModule``).

    Subclasses create their adapter weights in ``update_layer`` after calling
    :meth:`set_rank`, and name their two feature sizes in ``feature_names`` for ``repr``.
    """

    feature_names: ClassVar[tuple[str, str]] = ("in_features", "out_features")

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

    def adapter_note(self, adapter_name: str) -> str:
        """Extra per-adapter text for ``repr`` (e.g. ", dora")."""
        return ""

    def extra_repr(self) -> str:
        first, second = self.feature_names
        ranks = ", ".join(f"{name}: r={r}{self.adapter_note(name)}" for name, r in self.r.items())
        return f"{first}={self.in_features}, {second}={self.out_features}, adapters=({ranks})"
