"""P-tuning v2: deep prompts in every layer, built on prefix tuning (registered as "p_tuning_v2")."""

from __future__ import annotations

from peftkit.methods import register_peft_method
from peftkit.methods.p_tuning_v2.config import PTuningV2Config
from peftkit.methods.p_tuning_v2.model import PTuningV2Model

register_peft_method("p_tuning_v2", config_cls=PTuningV2Config, model_cls=PTuningV2Model)

__all__ = ["PTuningV2Config", "PTuningV2Model"]
