"""The attention wrapper of LLaMA-Adapter: the original attention plus gated attention to a learned prompt.

    hidden (b, s, d) ─┬─► attention (frozen, with its own mask, RoPE and KV cache) ───────► out ─┐
                      │                                                                       (+)─► y
                      └─► q = RoPE(W_q h) ──► softmax(q kᵀ/√hd) ──► × gate ──► · v ──► W_o ────┘
                                                    ▲                           ▲
        adaption_prompt P (1, L, d) ──► k = W_k P, v = W_v P   (no RoPE, no mask, no cache)

The prompt's softmax is separate from the model's own ("zero-init attention" in the paper), and
the per-layer ``adaption_gate`` starts at 0, so the wrapped model computes exactly what the base
model computes until training moves the gate. The prompt keys carry no position, so every query
sees the same L extra keys whatever its position, with or without a KV cache; like PEFT, no
attention mask is applied to them (padding positions attend to the prompt too, which cannot leak
into real positions: those never attend to padding).

Parameter names are PEFT's (``adaption_prompt``, ``adaption_gate`` directly on the wrapper, the
original attention as ``.model``), so state-dict keys are identical in both libraries. One
wrapper holds one adapter; the model class swaps wrappers in and out to switch adapters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.layers import adapter_dtype

MERGE_ERROR = (
    "adaption prompts (LLaMA-Adapter) add attention to learned tokens and cannot be merged into the "
    "weights (PEFT cannot either); use unload() to get the base model back, or keep the PeftModel"
)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _llama_query(attn: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """Llama / Mistral queries, recomputed (the attention does not return them), with RoPE."""
    embeddings = kwargs.get("position_embeddings")
    if embeddings is None:
        raise PeftkitError(
            f"{type(attn).__name__} was called without position_embeddings; adaption prompts need the "
            "rotary (cos, sin) that transformers' decoder layers pass to their attention"
        )
    cos, sin = (t.unsqueeze(1) for t in embeddings)  # (b, 1, s, hd)
    bsz, q_len, _ = hidden.shape
    query = attn.q_proj(hidden).view(bsz, q_len, -1, attn.head_dim).transpose(1, 2)  # (b, heads, s, hd)
    return query * cos + _rotate_half(query) * sin


def _llama_key_value(attn: nn.Module, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt keys and values (1, kv_heads, L, hd) through the layer's own k/v projections."""
    length = prompt.shape[1]
    key = attn.k_proj(prompt).view(1, length, -1, attn.head_dim).transpose(1, 2)
    value = attn.v_proj(prompt).view(1, length, -1, attn.head_dim).transpose(1, 2)
    return key, value


def _gpt2_query(attn: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """GPT-2 queries: the first third of the fused ``c_attn`` (no rotary embedding)."""
    query = attn.c_attn(hidden).split(attn.split_size, dim=2)[0]
    return query.view(*query.shape[:-1], -1, attn.head_dim).transpose(1, 2)


def _gpt2_key_value(attn: nn.Module, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _, key, value = attn.c_attn(prompt).split(attn.split_size, dim=2)
    shape = (1, prompt.shape[1], -1, attn.head_dim)
    return key.view(shape).transpose(1, 2), value.view(shape).transpose(1, 2)


@dataclass(frozen=True)
class AttentionLayout:
    """How one transformers model type's attention is read (PEFT's ``TRANSFORMERS_MODEL_CONFIG``)."""

    target_modules: str  # default name of the attention sub-module
    query: Callable[[nn.Module, torch.Tensor, dict[str, Any]], torch.Tensor]
    key_value: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    weight: str  # a projection whose weight gives the device and dtype
    out_proj: str | None  # applied to the prompt's output; PEFT applies none for GPT-2


_LLAMA = AttentionLayout("self_attn", _llama_query, _llama_key_value, "q_proj", "o_proj")
# The model types PEFT 0.21 supports: adapters for them load in PEFT and back.
LAYOUTS: dict[str, AttentionLayout] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "gpt2": AttentionLayout("attn", _gpt2_query, _gpt2_key_value, "c_attn", None),
}


class AdaptedAttention(nn.Module):
    """One adapter's prompt and gate around one attention module (an ``AdapterModule``).

    ``model`` is the wrapped attention while the wrapper sits in the model, and ``None`` while the
    model class keeps it aside for an inactive adapter (so the base weights are never registered
    twice).
    """

    def __init__(self, attention: nn.Module, layout: AttentionLayout, adapter_name: str, adapter_len: int):
        super().__init__()
        if isinstance(attention, AdaptedAttention):
            raise PeftkitError("adaption prompts cannot wrap each other; unload the first adapter")
        self.model: nn.Module | None = attention
        self.layout = layout
        self.adapter_name = adapter_name
        self.active_adapter: str | None = adapter_name
        weight = getattr(attention, layout.weight).weight
        dtype = adapter_dtype(weight.dtype) if weight.is_floating_point() else torch.float32
        hidden_size = attention.config.hidden_size
        # Standard normal prompt tokens as in the official code (an nn.Embedding); gate 0 ("zero-init").
        self.adaption_prompt = nn.Parameter(
            torch.empty(1, adapter_len, hidden_size, device=weight.device, dtype=dtype).normal_()
        )  # (1, L, hidden)
        self.adaption_gate = nn.Parameter(torch.zeros(1, device=weight.device, dtype=dtype))

    # -- AdapterModule -----------------------------------------------------------------------------

    def adapter_params(self, adapter_name: str) -> dict[str, str]:
        if adapter_name != self.adapter_name:
            return {}
        return {"adaption_prompt": "adaption_prompt", "adaption_gate": "adaption_gate"}

    def unwrap(self, merge: bool) -> nn.Module:
        if merge:
            raise PeftkitError(MERGE_ERROR)
        return self.detach()

    # -- swapping ----------------------------------------------------------------------------------

    def attach(self, attention: nn.Module) -> AdaptedAttention:
        self.model = attention
        return self

    def detach(self) -> nn.Module:
        attention, self.model = self.model, None
        return attention

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        attn = self.model
        if attn is None:
            raise RuntimeError("this adaption prompt is not attached to an attention module")
        # (b, s, hidden), then the attention's own weights, passed on as they are (as in PEFT:
        # output_attentions shows the model's attention, not the attention to the prompt)
        output, *rest = attn(*args, **kwargs)
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        bsz, q_len, _ = output.shape
        compute_dtype = getattr(attn, self.layout.weight).weight.dtype
        if not compute_dtype.is_floating_point:
            compute_dtype = hidden.dtype
        query = self.layout.query(attn, hidden, kwargs)  # (b, heads, s, hd)
        key, value = self.layout.key_value(attn, self.adaption_prompt.to(compute_dtype))  # (1, kv, L, hd)
        groups = query.shape[1] // key.shape[1]  # grouped-query attention: kv heads shared by groups
        key = key.repeat_interleave(groups, dim=1)  # (1, heads, L, hd)
        value = value.repeat_interleave(groups, dim=1)
        scores = query @ key.transpose(2, 3).to(query.dtype) / math.sqrt(attn.head_dim)  # (b, heads, s, L)
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        weights = self.adaption_gate.to(query.dtype) * weights
        prompt_out = (weights @ value.to(query.dtype)).transpose(1, 2).reshape(bsz, q_len, -1)  # (b, s, h*hd)
        if self.layout.out_proj is not None:
            prompt_out = getattr(attn, self.layout.out_proj)(prompt_out)  # (b, s, hidden)
        return ((output + prompt_out).to(output.dtype), *rest)

    def extra_repr(self) -> str:
        return f"adapter={self.adapter_name!r}, adapter_len={self.adaption_prompt.shape[1]}"
