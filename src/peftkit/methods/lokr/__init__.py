"""LoKr: Kronecker product of two small factors (config, layer, model; registered as "lokr")."""

from __future__ import annotations

from peftkit.methods import register_peft_method
from peftkit.methods.lokr.config import LoKrConfig
from peftkit.methods.lokr.layer import LoKrLinear
from peftkit.methods.lokr.model import LoKrModel

register_peft_method("lokr", config_cls=LoKrConfig, model_cls=LoKrModel)

__all__ = ["LoKrConfig", "LoKrLinear", "LoKrModel"]
