"""UniPELT's gated layers: LoRA and a sequential bottleneck adapter, each scaled by a learned gate.

    gated LoRA (on q / v):       x ─► W0 ─────────────────────────────────────────► + ─► y
                                 ├─► A (in→r) ─► B (r→out) ─► × alpha/r ─► × g_L ─┘
                                 └─► gate (in→1) ─► sigmoid ─► g_L          (one gate per token)

    gated adapter (after ffn):   h ─► down ─► f ─► up ─► × g_A ─► + h ─► h'
                                 └─► gate (hidden→1) ─► sigmoid ─► g_A      (one gate per token)

Both gates read the input of the component they scale (the paper's g = sigmoid(W_g x + b)): the
LoRA layer's input x, and the adapter's input h (the feed-forward output). Gates are fp32 like
the other adapter weights; their weight starts at N(0, 0.02) and bias at 0, so g ~ 0.5 at first.
"""

from __future__ import annotations

import torch
from torch import nn

from peftkit.methods.adapters.layer import BottleneckLayer
from peftkit.methods.lora.layer import LoraLinear

GATE_STD = 0.02


def make_gate(in_features: int, out_features: int, like: torch.Tensor) -> nn.Linear:
    """A gate projection ``in -> out`` (fp32 on half-precision models), N(0, 0.02) weight, zero bias."""
    dtype = torch.float32 if like.dtype in (torch.float16, torch.bfloat16) else like.dtype
    gate = nn.Linear(in_features, out_features, device=like.device, dtype=dtype)
    nn.init.normal_(gate.weight, std=GATE_STD)
    nn.init.zeros_(gate.bias)
    return gate


class GatedLoraLinear(LoraLinear):
    """``W0 x + g_L(x) * scaling * B A x`` with ``g_L(x) = sigmoid(W_gL x + b)``, one value per token."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_gate = nn.ModuleDict()

    def add_gate(self, adapter_name: str) -> None:
        self.lora_gate[adapter_name] = make_gate(self.in_features, 1, self.lora_A[adapter_name].weight)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self.active_adapter
        if adapter is None or adapter not in self.lora_gate:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)  # (..., out)
        lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
        x = x.to(lora_A.weight.dtype)
        gate = torch.sigmoid(self.lora_gate[adapter](x))  # (..., 1)
        update = lora_B(lora_A(self.lora_dropout[adapter](x))) * self.scaling[adapter]
        return (result + gate * update).to(result.dtype)

    def adapter_params(self, adapter_name: str) -> dict[str, str]:
        params = super().adapter_params(adapter_name)
        if adapter_name in self.lora_gate:
            params.update({f"lora_gate.{p}": f"lora_gate.{adapter_name}.{p}" for p in ("weight", "bias")})
        return params


class GatedBottleneckLayer(BottleneckLayer):
    """A sub-layer followed by ``h + g_A(h) * up(f(down(h)))``, ``g_A(h) = sigmoid(W_gA h + b)``."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.adapter_gate = nn.ModuleDict()

    def add_gate(self, adapter_name: str) -> None:
        width = self.in_features if self.parallel[adapter_name] else self.out_features
        self.adapter_gate[adapter_name] = make_gate(width, 1, self.adapter_down[adapter_name].weight)

    def delta(self, adapter_name: str, h: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        delta = super().delta(adapter_name, h, args, kwargs)  # (batch, seq, hidden)
        if adapter_name not in self.adapter_gate:
            return delta
        gate = self.adapter_gate[adapter_name]
        return torch.sigmoid(gate(h.to(gate.weight.dtype))) * delta  # (batch, seq, 1) * delta

    def adapter_params(self, adapter_name: str) -> dict[str, str]:
        params = super().adapter_params(adapter_name)
        if adapter_name in self.adapter_gate:
            params.update(
                {f"adapter_gate.{p}": f"adapter_gate.{adapter_name}.{p}" for p in ("weight", "bias")}
            )
        return params
