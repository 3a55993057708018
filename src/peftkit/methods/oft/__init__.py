"""OFT: orthogonal fine-tuning by block-diagonal rotations (config, layer, model; registered as "oft")."""

from __future__ import annotations

from peftkit.methods import register_peft_method
from peftkit.methods.oft.config import OFTConfig
from peftkit.methods.oft.layer import OFTLinear, OFTRotation
from peftkit.methods.oft.model import OFTModel

register_peft_method("oft", config_cls=OFTConfig, model_cls=OFTModel)

__all__ = ["OFTConfig", "OFTLinear", "OFTModel", "OFTRotation"]
