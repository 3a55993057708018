"""AdapterFusion (Pfeiffer et al., 2021): learned attention over trained, frozen bottleneck adapters;
registered as "adapter_fusion"."""

from __future__ import annotations

from peftkit.methods import register_peft_method
from peftkit.methods.adapter_fusion.config import AdapterFusionConfig
from peftkit.methods.adapter_fusion.layer import FusionLayer
from peftkit.methods.adapter_fusion.model import AdapterFusionModel

register_peft_method("adapter_fusion", config_cls=AdapterFusionConfig, model_cls=AdapterFusionModel)

__all__ = ["AdapterFusionConfig", "AdapterFusionModel", "FusionLayer"]
