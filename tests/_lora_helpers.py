"""Inputs, configs and read-outs shared by the LoRA test modules (tiny random Llama)."""

from __future__ import annotations

import torch
from torch import nn

from conftest import make_tiny_llama
from peftkit import LoraConfig, PeftModel, TaskType
from peftkit.methods.lora import LoraLinear

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def trainable(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def wrapped(model: PeftModel) -> set[str]:
    return {name for name, m in model.get_base_model().named_modules() if isinstance(m, LoraLinear)}


def lora(**kwargs) -> LoraConfig:
    return LoraConfig(task_type=TaskType.CAUSAL_LM, **kwargs)


def biased_llama() -> nn.Module:
    return make_tiny_llama(attention_bias=True, mlp_bias=True)


def trained(model: PeftModel, seed: int = 0) -> PeftModel:
    """Stand-in for training: move every trainable tensor away from its init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    return model
