"""BOFT's model wrapper: inject :class:`BOFTLinear` / :class:`BOFTConv2d` into ``nn.Linear`` /
``nn.Conv2d`` targets (PEFT's defaults are LoRA's targets), and train biases when ``bias`` asks."""

from __future__ import annotations

import warnings
from typing import ClassVar

from torch import nn

from peftkit.methods.boft.config import BOFTConfig
from peftkit.methods.boft.conv import BOFTConv2d
from peftkit.methods.boft.layer import BOFTLayer, BOFTLinear
from peftkit.methods.lora.model import LORA_DEFAULT_TARGET_MODULES
from peftkit.methods.tuner import InjectedAdapterModel


class BOFTModel(InjectedAdapterModel):
    """Injects BOFT layers into ``nn.Linear`` and ``nn.Conv2d`` targets (PEFT's BOFT refuses ``Conv1D``)."""

    method_name: ClassVar[str] = "BOFT"
    default_target_modules: ClassVar[dict[str, list[str]]] = LORA_DEFAULT_TARGET_MODULES
    peft_config: dict[str, BOFTConfig]

    @classmethod
    def is_supported(cls, module: nn.Module) -> bool:
        return isinstance(module, (BOFTLayer, nn.Linear, nn.Conv2d))

    def create_or_update(
        self, target: nn.Module, name: str, config: BOFTConfig, adapter_name: str
    ) -> nn.Module:
        if config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out is true but BOFT adapts nn.Linear / Conv2d layers, whose weights are "
                "(out, in, ...); ignoring it",
                stacklevel=2,
            )
        try:  # name the layer: sizes differ between layers
            if isinstance(target, BOFTLayer):
                layer = target
            else:
                layer = BOFTConv2d(target) if isinstance(target, nn.Conv2d) else BOFTLinear(target)
            layer.update_layer(adapter_name, config)
        except ValueError as error:
            raise ValueError(f"cannot adapt {name!r}: {error}") from None
        return layer

    def extra_trainable_names(self, adapter_name: str) -> list[str]:
        return self.bias_names(self.peft_config[adapter_name].bias, BOFTLayer)
