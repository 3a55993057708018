"""The LoRA layer for ``nn.Embedding`` (PEFT's layout: bare tensors, not linear layers).

    ids ──► base embedding (frozen) ─────────────────────────────┐
     │                                                           + ──► (..., dim)
     └─► embed with A^T (num, r) ─► @ B^T (r, dim) ─► × scaling ─┘

``lora_embedding_A``: (r, num_embeddings), ``lora_embedding_B``: (embedding_dim, r). As in PEFT,
A starts at zero and B normal (the reverse of linear LoRA), and no dropout is applied.
With ``use_dora`` a magnitude per embedding dimension rescales base and update (see ``dora.py``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from peftkit.methods.layers import adapter_dtype
from peftkit.methods.lora.base import LoraLayerBase
from peftkit.methods.lora.dora import DoraMagnitude, embedding_weight_norm
from peftkit.methods.merging import add_to_weight, require_finite


class LoraEmbedding(LoraLayerBase):
    """A frozen embedding plus low-rank updates (an ``AdapterModule``)."""

    feature_names = ("num_embeddings", "embedding_dim")

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer, base_layer.num_embeddings, base_layer.embedding_dim)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
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
        """Add (or replace) the adapter ``adapter_name``; ``lora_dropout`` is ignored, as in PEFT."""
        self.set_rank(adapter_name, r, lora_alpha, use_rslora)
        weight = self.base_layer.weight
        factory = {"device": weight.device, "dtype": adapter_dtype(weight.dtype)}
        lora_a = torch.randn(r, self.in_features, **factory)  # (r, num)
        lora_b = torch.randn(self.out_features, r, **factory)  # (dim, r)
        if init_lora_weights is not False:  # every init PEFT accepts here means: A zero, B normal
            lora_a.zero_()
        self.lora_embedding_A[adapter_name] = nn.Parameter(lora_a)
        self.lora_embedding_B[adapter_name] = nn.Parameter(lora_b)
        if adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]
        if use_dora:  # magnitude starts at the norms of W + s (BA)^T, one per embedding dimension
            with torch.no_grad():
                norm = embedding_weight_norm(weight.float(), self.delta_weight(adapter_name))
            self.lora_magnitude_vector[adapter_name] = DoraMagnitude(norm.to(factory["dtype"]))

    def has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.lora_embedding_A

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, adapter: str) -> torch.Tensor:
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
        if adapter in self.lora_magnitude_vector:
            # DoRA: both the base output and the update are rescaled by m / ||W + dW|| (detached)
            scale = self.lora_magnitude_vector[adapter].weight / self.dora_norm(adapter)  # (dim,)
            result = scale * result
            update = scale * update
        embed_scale = getattr(base, "embed_scale", None)  # Gemma-style scaled embeddings
        if embed_scale is not None:
            update = update * torch.as_tensor(embed_scale, dtype=update.dtype, device=update.device)
        return (result + update).to(result.dtype)

    def dora_norm(self, adapter_name: str) -> torch.Tensor:
        """``||W + s (BA)^T||`` over the vocabulary per dimension, as a constant (no gradient): (dim,)."""
        weight_a = self.lora_embedding_A[adapter_name].detach()  # (r, num)
        weight_b = self.lora_embedding_B[adapter_name].detach()  # (dim, r)
        delta = (weight_a.T @ weight_b.T) * self.scaling[adapter_name]  # (num, dim), as PEFT computes it
        return embedding_weight_norm(self.base_layer.weight.to(delta.dtype), delta).detach()

    def adapter_params(self, adapter_name: str) -> dict[str, str]:
        if adapter_name not in self.lora_embedding_A:
            return {}
        params = {name: f"{name}.{adapter_name}" for name in ("lora_embedding_A", "lora_embedding_B")}
        if adapter_name in self.lora_magnitude_vector:
            params["lora_magnitude_vector"] = f"lora_magnitude_vector.{adapter_name}.weight"
        return params

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``(B @ A)^T * scaling``: (num_embeddings, embedding_dim), like the base weight, in fp32."""
        weight_a = self.lora_embedding_A[adapter_name].float()
        weight_b = self.lora_embedding_B[adapter_name].float()
        return (weight_b @ weight_a).T * self.scaling[adapter_name]

    def unwrap(self, merge: bool) -> nn.Module:
        adapter = self.active_adapter
        if merge and adapter is not None and adapter in self.lora_embedding_A:
            if adapter not in self.lora_magnitude_vector:
                add_to_weight(self.base_layer.weight, self.delta_weight(adapter), adapter)
                return self.base_layer
            weight = self.base_layer.weight
            with torch.no_grad():  # DoRA: W' = (m / ||W + dW||) * (W + dW), columns scaled per dimension
                delta = self.delta_weight(adapter)  # (num, dim)
                total = weight.float() + delta
                factor = self.lora_magnitude_vector[adapter].weight.float() / embedding_weight_norm(
                    weight.float(), delta
                )
                weight.copy_(require_finite(factor.view(1, -1) * total, adapter).to(weight.dtype))
        return self.base_layer

    def adapter_note(self, adapter_name: str) -> str:
        return ", dora" if adapter_name in self.lora_magnitude_vector else ""
