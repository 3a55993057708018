"""P-tuning: input prompts computed by an MLP/LSTM prompt encoder (registered as "p_tuning")."""

from __future__ import annotations

from peftkit.methods import register_peft_method
from peftkit.methods.p_tuning.config import PromptEncoderConfig, PromptEncoderReparameterizationType
from peftkit.methods.p_tuning.layer import PromptEncoder
from peftkit.methods.p_tuning.model import PTuningModel

register_peft_method("p_tuning", config_cls=PromptEncoderConfig, model_cls=PTuningModel)

__all__ = ["PTuningModel", "PromptEncoder", "PromptEncoderConfig", "PromptEncoderReparameterizationType"]
