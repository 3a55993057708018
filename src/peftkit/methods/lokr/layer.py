"""The LoKr layer for ``nn.Linear``: ΔW = kron(w1, w2) · alpha / r.

    out = a·b, in = c·d  (factorization: a <= b, c <= d, near the square root or decompose_factor)
    w1: (a, c)  or  w1_a (a, r) @ w1_b (r, c)   when decompose_both and r < max(a, c) / 2
    w2: (b, d)  or  w2_a (b, r) @ w2_b (r, d)   when r < max(b, d) / 2
    ΔW = kron(w1, w2): (a·b, c·d) = (out, in)

PEFT's init: w1 (or w1_a) zero and the rest kaiming-uniform, so ΔW starts at zero; with
init_weights="lycoris" w2 (or w2_b) is the zero one instead.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peftkit.methods.lokr.config import LoKrConfig
from peftkit.methods.lycoris import LycorisConfig, LycorisLinear


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's split of ``dimension`` into m * n with m <= n: m == factor if it divides, else the
    divisor pair with the smallest sum whose smaller part does not exceed ``factor``."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


class LoKrLinear(LycorisLinear):
    """A frozen linear layer plus a Kronecker-product update."""

    adapter_layer_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")

    def parameter_shapes(self, r: int, config: LoKrConfig) -> dict[str, tuple[int, int]]:
        out_a, out_b = factorization(self.out_features, config.decompose_factor)
        in_c, in_d = factorization(self.in_features, config.decompose_factor)
        shapes: dict[str, tuple[int, int]] = {}
        if config.decompose_both and r < max(out_a, in_c) / 2:
            shapes.update(lokr_w1_a=(out_a, r), lokr_w1_b=(r, in_c))
        else:
            shapes.update(lokr_w1=(out_a, in_c))
        if r < max(out_b, in_d) / 2:
            shapes.update(lokr_w2_a=(out_b, r), lokr_w2_b=(r, in_d))
        else:
            shapes.update(lokr_w2=(out_b, in_d))
        return shapes

    @classmethod
    def rescales_rank_dropout(cls, config: LycorisConfig) -> bool:
        return bool(getattr(config, "rank_dropout_scale", False))

    def reset_parameters(self, adapter_name: str, init_weights: bool | str) -> None:
        for name in self.adapter_layer_names:
            param = self.factor(name, adapter_name)
            if param is not None:
                nn.init.kaiming_uniform_(param, a=math.sqrt(5))
        if init_weights is False:
            return
        zeroed = ("lokr_w2", "lokr_w2_b") if init_weights == "lycoris" else ("lokr_w1", "lokr_w1_a")
        for name in zeroed:
            param = self.factor(name, adapter_name)
            if param is not None:
                nn.init.zeros_(param)

    def _side(self, side: str, adapter_name: str) -> torch.Tensor:
        full = self.factor(f"lokr_{side}", adapter_name)
        if full is not None:
            return full
        return self.factor(f"lokr_{side}_a", adapter_name) @ self.factor(f"lokr_{side}_b", adapter_name)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        w1 = self._side("w1", adapter_name)  # (a, c)
        w2 = self._side("w2", adapter_name)  # (b, d)
        return torch.kron(w1, w2.contiguous()) * self.scaling[adapter_name]  # (a·b, c·d) = (out, in)
