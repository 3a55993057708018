"""LoRA on bitsandbytes-quantized linear layers (QLoRA): ``Linear4bit`` and ``Linear8bitLt`` bases.

        x ──► base_layer (4-bit / 8-bit, frozen): x @ dequant(W_q).T ─┐
        │                                                            + ──► y
        └─► dropout ─► lora_A (in→r) ─► lora_B (r→out) ─► × scaling ─┘   (fp32, trained)

The forward pass is LoRA's own (``LoraLinear.forward``); what differs is only how the frozen
weight is read: a packed 4-bit weight has shape (out*in/2, 1), so the feature sizes come from the
layer, and the weight is dequantized wherever LoRA needs its values (DoRA's norms, merging).
State-dict keys are LoRA's (``q_proj.lora_A.default.weight``), as in PEFT, so an adapter trained
on a quantized base loads onto an unquantized one and vice versa.

bitsandbytes is never imported here: :func:`new_quantized_lora_layer` looks it up in
``sys.modules`` (a model holding quantized layers has necessarily imported it).
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import nn

from peftkit.methods.lora.base import LoraLayerBase
from peftkit.methods.lora.layer import LoraLinear
from peftkit.methods.merging import require_finite
from peftkit.quantization import dequantize_weight, keep_trainable_4bit_layout


class LoraQuantizedLinear(LoraLinear):
    """LoRA on a frozen bitsandbytes linear layer (4-bit or 8-bit); an ``AdapterModule``."""

    bits: int = 0

    def __init__(self, base_layer: nn.Module):
        # Not LoraLinear.__init__: it reads the feature sizes off the weight's shape, which a
        # packed 4-bit weight does not have.
        LoraLayerBase.__init__(self, base_layer, base_layer.in_features, base_layer.out_features)
        keep_trainable_4bit_layout(base_layer)  # (a no-op for 8-bit layers)
        self.fan_in_fan_out = False
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only

    def base_weight(self) -> torch.Tensor:
        """The frozen weight, dequantized to fp32 (out, in): DoRA's norms and merging read it."""
        return dequantize_weight(self.base_layer)

    def move_weight_into_adapter(self, adapter_name: str, init_lora_weights: str) -> None:
        raise ValueError(
            f"init_lora_weights={init_lora_weights!r} rewrites the base weight, which is {self.bits}-bit "
            "quantized here: load the base model unquantized (quantization: null) for PiSSA / OLoRA, "
            "or use init_lora_weights: true"
        )

    def merged_dtype(self) -> torch.dtype:
        """The dtype of the dense layer a merge produces: what the layer computes in."""
        compute = getattr(self.base_layer, "compute_dtype", None)
        bias = self.base_layer.bias
        return compute or (bias.dtype if bias is not None else torch.float32)

    def unwrap(self, merge: bool) -> nn.Module:
        """Without merging: the quantized layer. With merging: a dense ``nn.Linear`` holding
        ``dequant(W_q) + B A * scaling`` (DoRA: its rescaled form).

        Re-quantizing the sum (PEFT's choice) would round most of a LoRA update away -- it is far
        smaller than a 4-bit step -- so the merged layer is stored dequantized instead, which keeps
        exactly what the adapted model computed, at 16/32 bits per weight instead of 4/8.
        """
        adapter = self.active_adapter
        if not merge or adapter is None or adapter not in self.lora_A:
            return self.base_layer
        dtype = self.merged_dtype()
        warnings.warn(
            f"merging LoRA into a {self.bits}-bit layer: the merged layer is dequantized to a dense "
            f"{dtype} nn.Linear (re-quantizing would round the LoRA update away), so it takes "
            f"{torch.finfo(dtype).bits // self.bits}x the memory of the quantized weight. For a merged "
            "model to save and share, merge into the unquantized base model instead.",
            stacklevel=2,
        )
        with torch.no_grad():
            if adapter in self.lora_magnitude_vector:
                merged = self.merged_weight(adapter)
            else:
                merged = self.base_weight() + self.delta_weight(adapter)
            require_finite(merged, adapter)
            bias = self.base_layer.bias
            dense = nn.Linear(
                self.in_features,
                self.out_features,
                bias=bias is not None,
                device=merged.device,
                dtype=dtype,
            )
            dense.weight.copy_(merged.to(dtype))
            if bias is not None:
                dense.bias.copy_(bias.to(dtype))
        dense.requires_grad_(False)
        return dense


class LoraLinear4bit(LoraQuantizedLinear):
    """LoRA on ``bitsandbytes.nn.Linear4bit`` (NF4 / FP4 weights): QLoRA."""

    bits = 4


class LoraLinear8bitLt(LoraQuantizedLinear):
    """LoRA on ``bitsandbytes.nn.Linear8bitLt`` (LLM.int8() weights)."""

    bits = 8


def new_quantized_lora_layer(target: nn.Module) -> LoraQuantizedLinear | None:
    """The LoRA layer for a bitsandbytes linear layer, or None for any other module."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(target, bnb.nn.Linear4bit):
        return LoraLinear4bit(target)
    if isinstance(target, bnb.nn.Linear8bitLt):
        return LoraLinear8bitLt(target)
    return None
