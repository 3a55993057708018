"""AdaLoRA: LoRA in SVD form whose rank budget is re-allocated during training (registered as "adalora")."""

from __future__ import annotations

from peftkit.methods import register_peft_method
from peftkit.methods.adalora.allocator import RankAllocator
from peftkit.methods.adalora.config import AdaLoraConfig
from peftkit.methods.adalora.layer import AdaLoraConv2d, AdaLoraLinear
from peftkit.methods.adalora.model import AdaLoraModel

register_peft_method("adalora", config_cls=AdaLoraConfig, model_cls=AdaLoraModel)

__all__ = ["AdaLoraConfig", "AdaLoraConv2d", "AdaLoraLinear", "AdaLoraModel", "RankAllocator"]
