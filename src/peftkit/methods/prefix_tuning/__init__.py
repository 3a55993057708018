"""Prefix tuning: trained key/values in every attention layer (registered as "prefix_tuning")."""

from __future__ import annotations

from peftkit.methods import register_peft_method
from peftkit.methods.prefix_tuning.config import PrefixTuningConfig
from peftkit.methods.prefix_tuning.layer import PrefixEncoder
from peftkit.methods.prefix_tuning.model import PrefixTuningModel

register_peft_method("prefix_tuning", config_cls=PrefixTuningConfig, model_cls=PrefixTuningModel)

__all__ = ["PrefixEncoder", "PrefixTuningConfig", "PrefixTuningModel"]
