"""Prompt tuning: trained input embeddings in front of the input (registered as "prompt_tuning")."""

from __future__ import annotations

from peftkit.methods import register_peft_method
from peftkit.methods.prompt_tuning.config import PromptTuningConfig, PromptTuningInit
from peftkit.methods.prompt_tuning.layer import PromptEmbedding
from peftkit.methods.prompt_tuning.model import PromptTuningModel

register_peft_method("prompt_tuning", config_cls=PromptTuningConfig, model_cls=PromptTuningModel)

__all__ = ["PromptEmbedding", "PromptTuningConfig", "PromptTuningInit", "PromptTuningModel"]
