"""OFT's model wrapper: inject :class:`OFTLinear` into ``nn.Linear`` targets (PEFT's defaults
are LoRA's targets), and train biases when ``bias`` asks for it."""

from __future__ import annotations

import warnings
from typing import ClassVar

from torch import nn

from peftkit.methods.lora.model import LORA_DEFAULT_TARGET_MODULES
from peftkit.methods.oft.config import OFTConfig
from peftkit.methods.oft.layer import OFTLinear
from peftkit.methods.tuner import InjectedAdapterModel


class OFTModel(InjectedAdapterModel):
    """Injects :class:`OFTLinear` layers into ``nn.Linear`` targets (PEFT's OFT skips ``Conv1D`` too)."""

    method_name: ClassVar[str] = "OFT"
    default_target_modules: ClassVar[dict[str, list[str]]] = LORA_DEFAULT_TARGET_MODULES
    peft_config: dict[str, OFTConfig]

    @classmethod
    def is_supported(cls, module: nn.Module) -> bool:
        return isinstance(module, (OFTLinear, nn.Linear))

    def create_or_update(
        self, target: nn.Module, name: str, config: OFTConfig, adapter_name: str
    ) -> nn.Module:
        layer = target if isinstance(target, OFTLinear) else OFTLinear(target)
        if config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out is true but OFT adapts nn.Linear layers, whose weights are (out, in); ignoring it",
                stacklevel=2,
            )
        layer.update_layer(adapter_name, config)
        return layer

    def extra_trainable_names(self, adapter_name: str) -> list[str]:
        return self.bias_names(self.peft_config[adapter_name].bias, OFTLinear)
