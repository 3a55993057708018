"""BOFT: orthogonal fine-tuning with butterfly-factorised rotations (registered as "boft")."""

from __future__ import annotations

from peftkit.methods import register_peft_method
from peftkit.methods.boft.config import BOFTConfig
from peftkit.methods.boft.conv import BOFTConv2d
from peftkit.methods.boft.layer import BOFTLayer, BOFTLinear
from peftkit.methods.boft.model import BOFTModel

register_peft_method("boft", config_cls=BOFTConfig, model_cls=BOFTModel)

__all__ = ["BOFTConfig", "BOFTConv2d", "BOFTLayer", "BOFTLinear", "BOFTModel"]
