"""LoHa: Hadamard product of two low-rank updates (config, layer, model; registered as "loha")."""

from __future__ import annotations

from peftkit.methods import register_peft_method
from peftkit.methods.loha.config import LoHaConfig
from peftkit.methods.loha.layer import LoHaLinear
from peftkit.methods.loha.model import LoHaModel

register_peft_method("loha", config_cls=LoHaConfig, model_cls=LoHaModel)

__all__ = ["LoHaConfig", "LoHaLinear", "LoHaModel"]
