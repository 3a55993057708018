"""The LoRA layer for ``nn.Conv1d`` / ``nn.Conv2d`` (PEFT's conv LoRA).

    x ──► base conv (frozen) ──────────────────────────────────────────────┐
    │                                                                      + ──► y
    └─► dropout ─► lora_A: conv in→r (base kernel, stride, padding) ─►
                   lora_B: conv r→out (kernel 1) ─► × scaling ─────────────┘

As in PEFT, ``lora_A`` copies the base layer's kernel size, stride and padding but not its
dilation or padding mode; grouped convolutions are not supported here. With ``use_dora`` a
magnitude per output channel, shaped (1, out, *1) as in PEFT, rescales the layer (see ``dora.py``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from peftkit.methods.layers import adapter_dtype
from peftkit.methods.lora.base import LoraLayerBase
from peftkit.methods.lora.dora import DoraMagnitude, conv_lora_weight, conv_weight_norm
from peftkit.methods.merging import add_to_weight, require_finite

CONV_TYPES = (nn.Conv1d, nn.Conv2d)


class LoraConv(LoraLayerBase):
    """A frozen ``Conv1d`` / ``Conv2d`` plus low-rank updates (an ``AdapterModule``)."""

    feature_names = ("in_channels", "out_channels")

    def __init__(self, base_layer: nn.Conv1d | nn.Conv2d):
        if base_layer.groups > 1:
            raise ValueError(
                f"LoRA on a {type(base_layer).__name__} with groups={base_layer.groups} is not supported by "
                "peftkit; leave this layer out of target_modules"
            )
        super().__init__(base_layer, base_layer.in_channels, base_layer.out_channels)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only

    def update_layer(
        self,
        adapter_name: str,
        *,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        init_lora_weights: bool | str,
        use_rslora: bool,
        use_dora: bool = False,
    ) -> None:
        """Add (or replace) the adapter ``adapter_name`` with rank ``r``."""
        kind = type(self.base_layer).__name__
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(
                f"init_lora_weights={init_lora_weights!r} does not work on {kind} layers (PEFT refuses it too); "
                "use true, 'gaussian' or false"
            )
        base = self.base_layer
        factory = {"device": base.weight.device, "dtype": adapter_dtype(base.weight.dtype)}
        ones = (1,) * (base.weight.dim() - 2)
        conv = type(base)
        self.set_rank(adapter_name, r, lora_alpha, use_rslora)
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A[adapter_name] = conv(
            self.in_features, r, base.kernel_size, base.stride, base.padding, bias=False, **factory
        )
        self.lora_B[adapter_name] = conv(r, self.out_features, ones, ones, bias=False, **factory)
        if init_lora_weights is not False:
            lora_a = self.lora_A[adapter_name].weight
            if init_lora_weights == "gaussian":
                nn.init.normal_(lora_a, std=1 / r)
            else:
                nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[adapter_name].weight)
        if adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]
        if use_dora:  # magnitude starts at the per-channel norms of W + s B A
            with torch.no_grad():
                norm = self.dora_norm(adapter_name)
            self.lora_magnitude_vector[adapter_name] = DoraMagnitude(norm.to(factory["dtype"]))

    def has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.lora_A

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, adapter: str) -> torch.Tensor:
        lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
        x = x.to(lora_A.weight.dtype)
        dropout, scaling = self.lora_dropout[adapter], self.scaling[adapter]
        if adapter not in self.lora_magnitude_vector:
            return (result + lora_B(lora_A(dropout(x))) * scaling).to(result.dtype)
        # DoRA needs W * x without bias: reuse the base output unless dropout changes x (as PEFT).
        base = self.base_layer
        if isinstance(dropout, nn.Identity) or not self.training:
            base_out = result if base.bias is None else result - base.bias.view(1, -1, *self.ones())
        else:
            x = dropout(x)
            conv_fn = F.conv1d if x.dim() == 3 else F.conv2d
            weight = base.weight.to(x.dtype)
            base_out = conv_fn(x, weight, None, base.stride, base.padding, base.dilation, base.groups)
        scale = self.lora_magnitude_vector[adapter].weight / self.dora_norm(adapter)  # (1, out, *1)
        extra = (scale - 1) * base_out + scale * lora_B(lora_A(x)) * scaling
        return (result + extra).to(result.dtype)

    def ones(self) -> tuple[int, ...]:
        """A 1 per spatial dimension, to broadcast per-channel values over (batch, out, *spatial)."""
        return (1,) * (self.base_layer.weight.dim() - 2)

    def dora_norm(self, adapter_name: str) -> torch.Tensor:
        """``||W + s B A||`` per output channel, as a constant (no gradient): (1, out, *1)."""
        weight = self.base_layer.weight
        lora_a = self.lora_A[adapter_name].weight.detach()
        lora_weight = conv_lora_weight(lora_a, self.lora_B[adapter_name].weight.detach(), weight.shape)
        return conv_weight_norm(weight.to(lora_a.dtype), self.scaling[adapter_name] * lora_weight).detach()

    def adapter_params(self, adapter_name: str) -> dict[str, str]:
        if adapter_name not in self.lora_A:
            return {}
        params = {f"{n}.weight": f"{n}.{adapter_name}.weight" for n in ("lora_A", "lora_B")}
        if adapter_name in self.lora_magnitude_vector:
            params["lora_magnitude_vector"] = f"lora_magnitude_vector.{adapter_name}.weight"
        return params

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The update as a kernel like the base weight's: B's 1x1 kernel composed with A's, in fp32."""
        weight_a = self.lora_A[adapter_name].weight.float()  # (r, in, *k)
        weight_b = self.lora_B[adapter_name].weight.float()  # (out, r, *1)
        conv_fn = F.conv1d if weight_a.dim() == 3 else F.conv2d
        # conv of A^T (in, r, *k) with B (out, r, *1) -> (in, out, *k); transposed back to (out, in, *k)
        return conv_fn(weight_a.transpose(0, 1), weight_b).transpose(0, 1) * self.scaling[adapter_name]

    def unwrap(self, merge: bool) -> nn.Module:
        adapter = self.active_adapter
        if merge and adapter is not None and adapter in self.lora_A:
            if adapter not in self.lora_magnitude_vector:
                add_to_weight(self.base_layer.weight, self.delta_weight(adapter), adapter)
                return self.base_layer
            weight = self.base_layer.weight
            with torch.no_grad():  # DoRA: W' = (m / ||W + dW||) * (W + dW), per output channel
                delta = self.delta_weight(adapter)  # (out, in, *k)
                norm = conv_weight_norm(weight.float(), delta)  # (1, out, *1)
                factor = self.lora_magnitude_vector[adapter].weight.float() / norm
                merged = factor.view(-1, 1, *self.ones()) * (weight.float() + delta)
                weight.copy_(require_finite(merged, adapter).to(weight.dtype))
        return self.base_layer

    def adapter_note(self, adapter_name: str) -> str:
        return ", dora" if adapter_name in self.lora_magnitude_vector else ""
