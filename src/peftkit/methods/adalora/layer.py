"""The AdaLoRA layers for ``nn.Linear``, transformers' ``Conv1D`` and ``nn.Conv2d``: LoRA in SVD form.

        x ──► base_layer (frozen) ────────────────────────────────────┐
        │                                                             + ──► y
        └─► dropout ─► A (in→r) ─► × E (r singular values) ─► B (r→out) ─► × alpha / (ranknum + 1e-5)

    A: (r, in)  "right singular vectors"     E: (r, 1)  "singular values"     B: (out, r)

Pruning a rank zeroes its entry of E (the rank allocator's mask), so ranks can be dropped and
re-grown during training without reshaping anything. ``ranknum`` is the rank the adapter was
created with (init_r) and stays so even when a saved, pruned adapter is loaded at a smaller
size: the scale never changes. As in PEFT the parameters live in ``nn.ParameterDict``s keyed by
adapter name, so state-dict keys read ``q_proj.lora_A.default`` (no ``.weight``) and the file
keys ``q_proj.lora_A``; ``ranknum`` is a frozen parameter that is never saved.
"""

from __future__ import annotations

import torch
from torch import nn

from peftkit.methods.layers import adapter_dtype
from peftkit.methods.lora.base import LoraLayerBase
from peftkit.methods.merging import add_to_weight
from peftkit.methods.targeting import is_conv1d

SAVED_NAMES = ("lora_A", "lora_B", "lora_E")


class AdaLoraLinear(LoraLayerBase):
    """A frozen linear layer plus SVD-form low-rank updates (an ``AdapterModule``)."""

    def __init__(self, base_layer: nn.Module):
        fan_in_fan_out = is_conv1d(base_layer)  # Conv1D stores (in, out): merging transposes
        rows, cols = base_layer.weight.shape[:2]
        super().__init__(base_layer, *((rows, cols) if fan_in_fan_out else (cols, rows)))
        self.fan_in_fan_out = fan_in_fan_out
        self.a_columns = self.in_features  # A's width: in (linear) or in * kh * kw (conv)
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.ranknum = nn.ParameterDict()

    def update_layer(
        self,
        adapter_name: str,
        *,
        r: int,
        ranknum: int,
        lora_alpha: float,
        lora_dropout: float,
        init_lora_weights: bool,
    ) -> None:
        """Add (or replace) adapter ``adapter_name`` with ``r`` ranks, scaled as if it had ``ranknum``.

        r == 0 is allowed (a module whose every rank was pruned): its update is zero.
        """
        if r < 0:
            raise ValueError(f"AdaLoRA rank must be >= 0, got {r} for adapter {adapter_name!r}")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha if lora_alpha > 0 else float(r)  # PEFT's rule
        weight = self.base_layer.weight
        factory = {"device": weight.device, "dtype": adapter_dtype(weight.dtype)}
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A[adapter_name] = nn.Parameter(torch.randn(r, self.a_columns, **factory))  # (r, in)
        self.lora_E[adapter_name] = nn.Parameter(torch.randn(r, 1, **factory))  # (r, 1)
        self.lora_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r, **factory))  # (out, r)
        # randn, then filled: draws from the RNG exactly as PEFT does, so a seed gives PEFT's init
        self.ranknum[adapter_name] = nn.Parameter(torch.randn(1, **factory), requires_grad=False)
        with torch.no_grad():
            self.ranknum[adapter_name].fill_(float(ranknum))
        if init_lora_weights:  # E = 0: the adapter starts as a no-op
            nn.init.zeros_(self.lora_E[adapter_name])
            nn.init.normal_(self.lora_A[adapter_name], mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B[adapter_name], mean=0.0, std=0.02)

    def has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.lora_A

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, adapter: str) -> torch.Tensor:
        lora_A, lora_B, lora_E = self.lora_A[adapter], self.lora_B[adapter], self.lora_E[adapter]
        ranknum = self.ranknum[adapter] + 1e-5
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(lora_A.dtype)
        # Same operation order as PEFT, so both give bit-identical outputs and gradients.
        update = (
            (self.lora_dropout[adapter](x) @ (lora_A * lora_E).T @ lora_B.T) * self.scaling[adapter] / ranknum
        )
        return (result + update).to(result.dtype)  # one rounding, as PEFT's in-place add

    def adapter_params(self, adapter_name: str) -> dict[str, str]:
        return {name: f"{name}.{adapter_name}" for name in SAVED_NAMES if adapter_name in getattr(self, name)}

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``B @ (A * E) * scaling / (ranknum + 1e-5)`` in the base weight's layout, fp32."""
        weight_a = self.lora_A[adapter_name].float()  # (r, in)
        weight_e = self.lora_E[adapter_name].float()  # (r, 1)
        weight_b = self.lora_B[adapter_name].float()  # (out, r)
        delta = weight_b @ (weight_a * weight_e) * self.scaling[adapter_name]  # (out, in)
        delta = delta / (self.ranknum[adapter_name].float() + 1e-5)
        if self.base_layer.weight.dim() > 2:  # conv: (out, in * kh * kw) -> the kernel's shape
            return delta.reshape(self.base_layer.weight.shape)
        return delta.T if self.fan_in_fan_out else delta

    def unwrap(self, merge: bool) -> nn.Module:
        adapter = self.active_adapter
        if merge and adapter is not None and adapter in self.lora_A:
            add_to_weight(self.base_layer.weight, self.delta_weight(adapter), adapter)
        return self.base_layer


class AdaLoraConv2d(AdaLoraLinear):
    """A frozen ``nn.Conv2d`` plus an SVD-form update of its kernel (PEFT's ``SVDConv2d``).

    A: (r, in * kh * kw), B: (out, r); ``B @ (A * E)`` reshaped to the kernel is applied as a
    second convolution with the base layer's stride, padding and dilation.
    """

    def __init__(self, base_layer: nn.Conv2d):
        if base_layer.groups != 1:
            raise ValueError(
                f"AdaLoRA adapts Conv2d layers with groups=1 only (this one has groups={base_layer.groups}): "
                "exclude it with exclude_modules"
            )
        super().__init__(base_layer)
        kernel_h, kernel_w = base_layer.kernel_size
        self.a_columns = self.in_features * kernel_h * kernel_w

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, adapter: str) -> torch.Tensor:
        lora_A, lora_B, lora_E = self.lora_A[adapter], self.lora_B[adapter], self.lora_E[adapter]
        ranknum = self.ranknum[adapter] + 1e-5
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(lora_A.dtype)
        base = self.base_layer
        kernel = (lora_B @ (lora_A * lora_E) * self.scaling[adapter] / ranknum).reshape(base.weight.shape)
        update = nn.functional.conv2d(
            self.lora_dropout[adapter](x),
            kernel,
            stride=base.stride,
            padding=base.padding,
            dilation=base.dilation,
            groups=base.groups,
        )
        return (result + update).to(result.dtype)  # one rounding, as PEFT's in-place add
