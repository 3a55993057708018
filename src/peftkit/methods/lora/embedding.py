"""The LoRA layer for ``nn.Embedding`` (PEFT's layout: bare tensors, not linear layers).

    ids ──► base embedding (frozen) ─────────────────────────────┐
     │                                                           + ──► (..., dim)
     └─► embed with A^T (num, r) ─► @ B^T (r, dim) ─► × scaling ─┘

``lora_embedding_A``: (r, num_embeddings), ``lora_embedding_B``: (embedding_dim, r). As in PEFT,
A starts at zero and B normal (the reverse of linear LoRA), and no dropout is applied.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from peftkit.methods.layers import adapter_dtype
from peftkit.methods.lora.base import LoraLayerBase
from peftkit.methods.merging import add_to_weight


class LoraEmbedding(LoraLayerBase):
    """A frozen embedding plus low-rank updates (an ``AdapterModule``)."""

    feature_names = ("num_embeddings", "embedding_dim")

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer, base_layer.num_embeddings, base_layer.embedding_dim)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

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
        """Add (or replace) the adapter ``adapter_name``; ``lora_dropout`` is ignored, as in PEFT."""
        if use_dora:
            raise ValueError(
                "use_dora=True is not supported by peftkit for nn.Embedding targets; "
                "exclude the embedding from target_modules or set use_dora=False"
            )
        self.set_rank(adapter_name, r, lora_alpha, use_rslora)
        weight = self.base_layer.weight
        factory = {"device": weight.device, "dtype": adapter_dtype(weight.dtype)}
        lora_a = torch.randn(r, self.in_features, **factory)  # (r, num)
        lora_b = torch.randn(self.out_features, r, **factory)  # (dim, r)
        if init_lora_weights is not False:  # every init PEFT accepts here means: A zero, B normal
            lora_a.zero_()
        self.lora_embedding_A[adapter_name] = nn.Parameter(lora_a)
        self.lora_embedding_B[adapter_name] = nn.Parameter(lora_b)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        adapter = self.active_adapter
        if adapter is None or adapter not in self.lora_embedding_A:
            return result
        base = self.base_layer
        after_a = F.embedding(  # (..., r)
            x,
            self.lora_embedding_A[adapter].T,
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )
        update = (after_a @ self.lora_embedding_B[adapter].T) * self.scaling[adapter]  # (..., dim)
        embed_scale = getattr(base, "embed_scale", None)  # Gemma-style scaled embeddings
        if embed_scale is not None:
            update = update * torch.as_tensor(embed_scale, dtype=update.dtype, device=update.device)
        return (result + update).to(result.dtype)

    def adapter_params(self, adapter_name: str) -> dict[str, str]:
        if adapter_name not in self.lora_embedding_A:
            return {}
        return {name: f"{name}.{adapter_name}" for name in ("lora_embedding_A", "lora_embedding_B")}

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``(B @ A)^T * scaling``: (num_embeddings, embedding_dim), like the base weight, in fp32."""
        weight_a = self.lora_embedding_A[adapter_name].float()
        weight_b = self.lora_embedding_B[adapter_name].float()
        return (weight_b @ weight_a).T * self.scaling[adapter_name]

    def unwrap(self, merge: bool) -> nn.Module:
        adapter = self.active_adapter
        if merge and adapter is not None and adapter in self.lora_embedding_A:
            add_to_weight(self.base_layer.weight, self.delta_weight(adapter), adapter)
        return self.base_layer
