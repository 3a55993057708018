"""Bottleneck adapters (Houlsby, Pfeiffer, parallel): config, layer, model; registered as "bottleneck"."""

from __future__ import annotations

from peftkit.methods import register_peft_method
from peftkit.methods.adapters.config import BottleneckConfig
from peftkit.methods.adapters.layer import BottleneckLayer
from peftkit.methods.adapters.model import BottleneckModel

register_peft_method("bottleneck", config_cls=BottleneckConfig, model_cls=BottleneckModel)

__all__ = ["BottleneckConfig", "BottleneckLayer", "BottleneckModel"]
