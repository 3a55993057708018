"""LLaMA-Adapter (adaption prompts): config, layer, model; registered as "adaption_prompt"."""

from __future__ import annotations

from peftkit.methods import register_peft_method
from peftkit.methods.adaption_prompt.config import AdaptionPromptConfig
from peftkit.methods.adaption_prompt.layer import AdaptedAttention
from peftkit.methods.adaption_prompt.model import AdaptionPromptModel

register_peft_method("adaption_prompt", config_cls=AdaptionPromptConfig, model_cls=AdaptionPromptModel)

__all__ = ["AdaptedAttention", "AdaptionPromptConfig", "AdaptionPromptModel"]
