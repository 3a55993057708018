"""MAM adapter: prefix tuning + a scaled parallel adapter (registered as "mam")."""

from __future__ import annotations

from peftkit.methods import register_peft_method
from peftkit.methods.mam.config import MAMConfig
from peftkit.methods.mam.model import MAMModel, PrefixWithLayersModel

register_peft_method("mam", config_cls=MAMConfig, model_cls=MAMModel)

__all__ = ["MAMConfig", "MAMModel", "PrefixWithLayersModel"]
