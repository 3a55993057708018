"""The BOFT layer for ``nn.Conv2d`` (PEFT's conv BOFT): rotate the filters, not the input.

    W (out, in, k, k) ─► flatten (out, in·k·k) ─► W Rᵀ ─► ⊙ s (per out channel) ─► reshape ─► conv(x) + b

A convolution is a linear map of each (in, k, k) input patch, so rotating the patch (the input
side, as for ``nn.Linear``) equals rotating every filter with the same R: the forward pass builds
the rotated weight (dense R over in·k·k features, as PEFT does) and convolves once. ``boft_s`` is
(1, out) as in PEFT. The base layer's own stride, padding, dilation and padding mode are used;
PEFT passes only ``stride[0]`` / ``padding[0]``, so the two agree on square, undilated convs.
Grouped convolutions and non-square kernels are refused, as PEFT cannot adapt them either.
"""

from __future__ import annotations

import torch
from torch import nn

from peftkit.methods.boft.layer import BOFTLayer


class BOFTConv2d(BOFTLayer):
    """A frozen ``nn.Conv2d`` whose filters are rotated by a butterfly orthogonal matrix and scaled."""

    rotated_axis = "in_channels*kernel^2"

    def __init__(self, base_layer: nn.Conv2d):
        kh, kw = base_layer.kernel_size
        if base_layer.groups > 1 or kh != kw:
            raise ValueError(
                f"BOFT adapts Conv2d layers with groups=1 and a square kernel only (this one: "
                f"groups={base_layer.groups}, kernel_size={base_layer.kernel_size}); leave it out of "
                "target_modules"
            )
        super().__init__(base_layer)
        self.in_features = base_layer.in_channels * kh * kw  # the rotated axis: a flattened filter
        self.out_features = base_layer.out_channels
        self.scale_shape = (1, base_layer.out_channels)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self.active_adapter
        if adapter is None or adapter not in self.boft_R:
            return self.base_layer(x, *args, **kwargs)
        base = self.base_layer
        weight = self.merged_weight(adapter).reshape(base.weight.shape)  # (out, in, k, k), fp32
        dtype = x.dtype
        bias = None if base.bias is None else base.bias.to(weight.dtype)
        return base._conv_forward(x.to(weight.dtype), weight, bias).to(dtype)
