"""The LoHa layer for ``nn.Linear``: ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / r.

    w1_a, w2_a: (out, r)     w1_b, w2_b: (r, in)     ΔW: (out, in)

PEFT's init: w1_a, w1_b, w2_a kaiming-uniform and w2_b zero, so ΔW starts at zero.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peftkit.methods.lycoris import LycorisConfig, LycorisLinear


class LoHaLinear(LycorisLinear):
    """A frozen linear layer plus a low-rank Hadamard-product update."""

    adapter_layer_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def parameter_shapes(self, r: int, config: LycorisConfig) -> dict[str, tuple[int, int]]:
        out, in_ = self.out_features, self.in_features
        return {"hada_w1_a": (out, r), "hada_w1_b": (r, in_), "hada_w2_a": (out, r), "hada_w2_b": (r, in_)}

    def reset_parameters(self, adapter_name: str, init_weights: bool | str) -> None:
        for name in self.adapter_layer_names:
            nn.init.kaiming_uniform_(self.factor(name, adapter_name), a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.factor("hada_w2_b", adapter_name))

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        w1 = self.hada_w1_a[adapter_name] @ self.hada_w1_b[adapter_name]  # (out, in)
        w2 = self.hada_w2_a[adapter_name] @ self.hada_w2_b[adapter_name]  # (out, in)
        return (w1 * w2) * self.scaling[adapter_name]
