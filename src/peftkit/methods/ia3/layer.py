"""The (IA)³ layer for ``nn.Linear`` and transformers' ``Conv1D``.

    attention-style target:   x ──► base_layer ──► ⊙ l (out,) ──► y        y = l ⊙ (W x + b)
    feed-forward target:      x ──► ⊙ l (in,) ──► base_layer ──► y         y = W (l ⊙ x) + b

One layer holds any number of named adapters in ``ia3_l`` (an ``nn.ParameterDict`` keyed by
adapter name, as in PEFT, so state-dict keys match: ``k_proj.ia3_l.default``). Vectors are
stored in PEFT's shapes: (out, 1) for output scaling, (1, in) for input scaling. They stay fp32
on half-precision models; the scaled tensor is cast back to the dtype it had.
"""

from __future__ import annotations

import torch
from torch import nn

from peftkit.methods.layers import WrappedLayer, adapter_dtype
from peftkit.methods.merging import require_finite
from peftkit.methods.targeting import is_conv1d


class IA3Linear(WrappedLayer):
    """A frozen linear layer whose input or output is rescaled by a learned vector (an ``AdapterModule``)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        # Conv1D stores its weight as (in, out): merging must transpose the vector.
        self.fan_in_fan_out = is_conv1d(base_layer)
        rows, cols = base_layer.weight.shape
        self.in_features, self.out_features = (rows, cols) if self.fan_in_fan_out else (cols, rows)
        self.ia3_l = nn.ParameterDict()
        # Per adapter: scale the input (feed-forward) or the output.
        self.is_feedforward: dict[str, bool] = {}

    def update_layer(self, adapter_name: str, *, is_feedforward: bool, init_ia3_weights: bool) -> None:
        """Add (or replace) the adapter ``adapter_name``: ones (a no-op) or, for tests, random values."""
        weight = self.base_layer.weight
        factory = {"device": weight.device, "dtype": adapter_dtype(weight.dtype)}
        shape = (1, self.in_features) if is_feedforward else (self.out_features, 1)
        vector = torch.ones(shape, **factory) if init_ia3_weights else torch.randn(shape, **factory)
        self.ia3_l[adapter_name] = nn.Parameter(vector)
        self.is_feedforward[adapter_name] = is_feedforward

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self.active_adapter
        if adapter is None or adapter not in self.ia3_l:
            return self.base_layer(x, *args, **kwargs)
        scale = self.ia3_l[adapter].flatten()  # (in,) or (out,)
        if self.is_feedforward[adapter]:
            x = (x.to(scale.dtype) * scale).to(x.dtype)
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * scale).to(result.dtype)

    def adapter_params(self, adapter_name: str) -> dict[str, str]:
        return {"ia3_l": f"ia3_l.{adapter_name}"} if adapter_name in self.ia3_l else {}

    def weight_scale(self, adapter_name: str) -> torch.Tensor:
        """The vector shaped to broadcast against the base weight: scales its input or output axis."""
        vector = self.ia3_l[adapter_name].detach().float()  # (1, in) or (out, 1)
        return vector.T if self.fan_in_fan_out else vector

    def unwrap(self, merge: bool) -> nn.Module:
        adapter = self.active_adapter
        if merge and adapter is not None and adapter in self.ia3_l:
            scale = require_finite(self.weight_scale(adapter), adapter)
            base = self.base_layer
            with torch.no_grad():
                base.weight.copy_(base.weight.float() * scale)
                # y = l ⊙ (W x + b): output scaling rescales the bias too; input scaling leaves it.
                if not self.is_feedforward[adapter] and base.bias is not None:
                    base.bias.copy_(base.bias.float() * scale.reshape(base.bias.shape))
        return self.base_layer

    def extra_repr(self) -> str:
        kinds = ", ".join(
            f"{name}: {'input' if ff else 'output'}" for name, ff in self.is_feedforward.items()
        )
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=({kinds})"
