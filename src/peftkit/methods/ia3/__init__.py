"""(IA)³: learned vectors that rescale activations (config, layer, model; registered as "ia3")."""

from __future__ import annotations

from peftkit.methods import register_peft_method
from peftkit.methods.ia3.config import IA3Config
from peftkit.methods.ia3.layer import IA3Linear
from peftkit.methods.ia3.model import IA3Model

register_peft_method("ia3", config_cls=IA3Config, model_cls=IA3Model)

__all__ = ["IA3Config", "IA3Linear", "IA3Model"]
