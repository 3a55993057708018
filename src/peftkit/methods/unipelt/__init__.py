"""UniPELT: gated LoRA + gated prefix tuning + gated bottleneck adapter (registered as "unipelt")."""

from __future__ import annotations

from peftkit.methods import register_peft_method
from peftkit.methods.unipelt.config import UniPELTConfig
from peftkit.methods.unipelt.layer import GatedBottleneckLayer, GatedLoraLinear
from peftkit.methods.unipelt.model import UniPELTModel

register_peft_method("unipelt", config_cls=UniPELTConfig, model_cls=UniPELTModel)

__all__ = ["GatedBottleneckLayer", "GatedLoraLinear", "UniPELTConfig", "UniPELTModel"]
