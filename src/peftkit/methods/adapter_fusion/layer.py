"""The AdapterFusion layer: attention over the outputs of N frozen bottleneck adapters at one sub-layer.

    x ──► sub ──► h ──┬──────────────────────────────────────────────────────► + ──► h'
                      ├─► adapter_1 ─► d_1 ─┐                                 │
                      ├─► ...               ├─► softmax_n((Q h)·(K d_n)) ─► Σ_n s_n V d_n
                      └─► adapter_N ─► d_N ─┘

    Pfeiffer et al. 2021, eq. (1)-(3), per layer l and position t:
        s_n = softmax_n( (Q h)ᵀ (K d_n) )        Q, K: Linear(hidden, hidden) with bias
        o   = Σ_n s_n V d_n                       V: Linear(hidden, hidden) without bias
        h'  = h + o

``d_n`` is adapter n's additive output (``BottleneckLayer.delta``: ``up(f(down(h)))``), ``h``
the sub-layer's output, so with one adapter (softmax = 1) and V = I the layer computes exactly
what that adapter alone computes. The dot product is not scaled by 1/sqrt(hidden) (as in the
paper and its reference implementation). Q and K start random (N(0, 0.02)), V at the identity
plus tiny noise. Fusion weights stay fp32 on half-precision models, like the adapters.
"""

from __future__ import annotations

import torch
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.adapters.layer import BottleneckLayer

MERGE_ERROR = "AdapterFusion adds layers and cannot be merged into the weights; use unload()"
QK_INIT_STD = 0.02  # BERT's initializer range, which the reference implementation uses for Q and K


class FusionLayer(nn.Module):
    """Wraps a :class:`BottleneckLayer` holding the fused adapters (an ``AdapterModule``)."""

    def __init__(self, adapters: BottleneckLayer):
        super().__init__()
        self.base_layer = adapters
        self.fusion_query = nn.ModuleDict()
        self.fusion_key = nn.ModuleDict()
        self.fusion_value = nn.ModuleDict()
        self.fused: dict[str, list[str]] = {}  # fusion adapter -> names of the adapters it mixes
        self.active_adapter: str | None = None

    @property
    def hidden_size(self) -> int:
        return self.base_layer.out_features

    def update_layer(self, adapter_name: str, fused: list[str], value_init_std: float) -> None:
        """Add fusion ``adapter_name`` over ``fused`` (names of adapters held by the base layer)."""
        missing = [n for n in fused if n not in self.base_layer.adapter_down]
        if missing:
            raise PeftkitError(f"cannot fuse {missing}: the sub-layer holds no such adapter")
        weight = self.base_layer.adapter_up[fused[0]].weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        d = self.hidden_size
        query, key = nn.Linear(d, d, **factory), nn.Linear(d, d, **factory)
        value = nn.Linear(d, d, bias=False, **factory)
        with torch.no_grad():
            for linear in (query, key):
                linear.weight.normal_(0.0, QK_INIT_STD)
                linear.bias.zero_()
            if value_init_std > 0:
                value.weight.normal_(0.0, value_init_std)
            else:
                value.weight.zero_()
            value.weight.fill_diagonal_(1.0)
        self.fusion_query[adapter_name] = query
        self.fusion_key[adapter_name] = key
        self.fusion_value[adapter_name] = value
        self.fused[adapter_name] = list(fused)

    def fuse(self, adapter_name: str, h: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """``Σ_n softmax_n((Q h)·(K d_n)) V d_n`` for ``h`` (..., hidden) and ``deltas`` (..., N, hidden)."""
        dtype = self.fusion_query[adapter_name].weight.dtype  # fp32 even when frozen weights are bf16
        h, deltas = h.to(dtype), deltas.to(dtype)
        query = self.fusion_query[adapter_name](h)  # (..., hidden)
        keys = self.fusion_key[adapter_name](deltas)  # (..., N, hidden)
        values = self.fusion_value[adapter_name](deltas)  # (..., N, hidden)
        scores = (keys @ query.unsqueeze(-1)).squeeze(-1)  # (..., N)
        weights = scores.softmax(dim=-1)
        return (weights.unsqueeze(-2) @ values).squeeze(-2)  # (..., hidden)

    def forward(self, *args, **kwargs):
        adapters = self.base_layer
        output = adapters.base_layer(*args, **kwargs)  # the sub-layer itself, no adapter applied
        name = self.active_adapter
        if name is None or name not in self.fused:
            return output
        h = output[0] if isinstance(output, tuple) else output  # (batch, seq, hidden)
        deltas = torch.stack([adapters.delta(n, h, args, kwargs) for n in self.fused[name]], dim=-2)
        h = (h + self.fuse(name, h, deltas)).to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    def value_penalty(self, adapter_name: str) -> torch.Tensor:
        """``||I - V||²`` (squared Frobenius norm) of this layer's value matrix."""
        weight = self.fusion_value[adapter_name].weight
        return (torch.eye(weight.shape[0], device=weight.device, dtype=weight.dtype) - weight).pow(2).sum()

    def adapter_params(self, adapter_name: str) -> dict[str, str]:
        if adapter_name not in self.fused:
            return {}
        params = {
            "fusion_query": ("weight", "bias"),
            "fusion_key": ("weight", "bias"),
            "fusion_value": ("weight",),
        }
        return {
            f"{kind}.{param}": f"{kind}.{adapter_name}.{param}"
            for kind, names in params.items()
            for param in names
        }

    def unwrap(self, merge: bool) -> nn.Module:
        if merge:
            raise PeftkitError(MERGE_ERROR)
        return self.base_layer.base_layer

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, fusions=({', '.join(f'{k}: {v}' for k, v in self.fused.items())})"
