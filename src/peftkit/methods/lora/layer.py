"""The LoRA layer for ``nn.Linear`` and transformers' ``Conv1D``.

        x ──► base_layer (frozen) ─────────────────────────┐
        │                                                  + ──► y
        └─► dropout ─► lora_A (in→r) ─► lora_B (r→out) ─► × scaling

    scaling = lora_alpha / r, or lora_alpha / sqrt(r) with rslora.

One layer holds any number of named adapters (``nn.ModuleDict`` keyed by adapter name, as in
PEFT, so state-dict keys match: ``q_proj.lora_A.default.weight``); ``active_adapter`` picks the
one used in forward. LoRA weights may have a different dtype than the frozen base weight (fp32
adapters on a bf16 model): the input is cast to the LoRA dtype and the sum back to the output's.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peftkit.methods.targeting import is_conv1d

ADAPTER_LAYER_NAMES = ("lora_A", "lora_B")


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapter weights stay fp32 on half-precision models (stable training), else follow the base."""
    return base_dtype if base_dtype == torch.float64 else torch.float32


class LoraLinear(nn.Module):
    """A frozen linear layer plus low-rank updates (an ``AdapterModule``)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        # Conv1D stores its weight as (in, out): merging must transpose the update.
        self.fan_in_fan_out = is_conv1d(base_layer)
        rows, cols = base_layer.weight.shape
        self.in_features, self.out_features = (rows, cols) if self.fan_in_fan_out else (cols, rows)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapter: str | None = None

    # Explicit delegation of what model code reads off a linear layer (dtype checks, tying).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def update_layer(
        self,
        adapter_name: str,
        *,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        init_lora_weights: bool | str,
        use_rslora: bool,
    ) -> None:
        """Add (or replace) the adapter ``adapter_name`` with rank ``r``."""
        if r <= 0:
            raise ValueError(f"r must be a positive integer, got {r} for adapter {adapter_name!r}")
        weight = self.base_layer.weight
        factory = {"device": weight.device, "dtype": adapter_dtype(weight.dtype)}
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, **factory)  # (r, in)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, **factory)  # (out, r)
        self.reset_lora_parameters(adapter_name, init_lora_weights)

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: bool | str) -> None:
        """True: PEFT's default (A as nn.Linear's init, B zero) so the adapter starts as a no-op."""
        if init_lora_weights is False:
            return  # both keep nn.Linear's random init: a non-zero update, for tests
        lora_a = self.lora_A[adapter_name].weight
        if init_lora_weights == "gaussian":
            nn.init.normal_(lora_a, std=1 / self.r[adapter_name])
        else:
            nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[adapter_name].weight)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        adapter = self.active_adapter
        if adapter is None or adapter not in self.lora_A:
            return result
        lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
        result_dtype = result.dtype
        if not torch.is_autocast_enabled(x.device.type):
            # Under autocast the matmuls run in the autocast dtype anyway: casting to fp32 first
            # would only add two copies per layer (6% of a CPU training step, measured).
            x = x.to(lora_A.weight.dtype)
        result = result + lora_B(lora_A(self.lora_dropout[adapter](x))) * self.scaling[adapter]
        return result.to(result_dtype)

    def adapter_params(self, adapter_name: str) -> dict[str, str]:
        params = {}
        for layer_name in ADAPTER_LAYER_NAMES:
            layers = getattr(self, layer_name)
            if adapter_name in layers:
                for key in layers[adapter_name].state_dict():
                    params[f"{layer_name}.{key}"] = f"{layer_name}.{adapter_name}.{key}"
        return params

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``B @ A * scaling`` in the base weight's layout, computed in fp32 (CPU bf16 matmul is slow)."""
        weight_a = self.lora_A[adapter_name].weight.float()  # (r, in)
        weight_b = self.lora_B[adapter_name].weight.float()  # (out, r)
        delta = (weight_b @ weight_a) * self.scaling[adapter_name]  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def unwrap(self, merge: bool) -> nn.Module:
        adapter = self.active_adapter
        if merge and adapter is not None and adapter in self.lora_A:
            delta = self.delta_weight(adapter)
            if not torch.isfinite(delta).all():
                raise ValueError(
                    f"adapter {adapter!r} has NaN or inf weights; refusing to merge them into the model"
                )
            with torch.no_grad():
                self.base_layer.weight.add_(delta.to(self.base_layer.weight.dtype))
        return self.base_layer

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{name}: r={r}" for name, r in self.r.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=({ranks})"
