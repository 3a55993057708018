"""Methods that train a chosen subset of the model's own parameters: full, bitfit and partial.

PEFT has no such methods; their ``peft_type``s (FULL, BITFIT, PARTIAL) are peftkit's own. The
adapter file holds the trained tensors under their base-model names.
"""

from __future__ import annotations

from peftkit.methods import register_peft_method
from peftkit.methods.selective.config import BitFitConfig, FullFinetuneConfig, PartialFinetuneConfig
from peftkit.methods.selective.model import (
    BitFitModel,
    FullFinetuneModel,
    PartialFinetuneModel,
    SelectiveModel,
    find_blocks,
)

register_peft_method("full", config_cls=FullFinetuneConfig, model_cls=FullFinetuneModel)
register_peft_method("bitfit", config_cls=BitFitConfig, model_cls=BitFitModel)
register_peft_method("partial", config_cls=PartialFinetuneConfig, model_cls=PartialFinetuneModel)

__all__ = [
    "BitFitConfig",
    "BitFitModel",
    "FullFinetuneConfig",
    "FullFinetuneModel",
    "PartialFinetuneConfig",
    "PartialFinetuneModel",
    "SelectiveModel",
    "find_blocks",
]
