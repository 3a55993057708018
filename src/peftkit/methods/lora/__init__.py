"""LoRA: low-rank updates to linear, embedding and conv layers, with DoRA and PiSSA/OLoRA init (registered as "lora")."""

from __future__ import annotations

from peftkit.methods import register_peft_method
from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.conv import LoraConv
from peftkit.methods.lora.embedding import LoraEmbedding
from peftkit.methods.lora.layer import LoraLinear
from peftkit.methods.lora.model import LoraModel

register_peft_method("lora", config_cls=LoraConfig, model_cls=LoraModel)

__all__ = ["LoraConfig", "LoraConv", "LoraEmbedding", "LoraLinear", "LoraModel"]
