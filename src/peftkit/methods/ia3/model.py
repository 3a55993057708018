"""(IA)³'s model wrapper: the hooks that ``InjectedAdapterModel`` asks a method for, plus the
feed-forward choice (which targets get their input scaled rather than their output)."""

from __future__ import annotations

import copy
import re
import warnings
from typing import ClassVar

from torch import nn

from peftkit.errors import TargetModulesError
from peftkit.methods.base import TargetingConfig
from peftkit.methods.ia3.config import IA3Config
from peftkit.methods.ia3.layer import IA3Linear
from peftkit.methods.targeting import is_linear_like
from peftkit.methods.tuner import InjectedAdapterModel

# PEFT's default target and feed-forward modules per transformers model_type.
IA3_DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}
IA3_DEFAULT_FEEDFORWARD_MODULES: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}


def is_feedforward(feedforward_modules: list[str] | str, name: str) -> bool:
    """PEFT's test: a regex must match the full name; a list entry must end the name (plain suffix)."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, name) is not None
    return any(name.endswith(entry) for entry in feedforward_modules)


class IA3Model(InjectedAdapterModel):
    """Injects :class:`IA3Linear` layers into ``nn.Linear`` / ``Conv1D`` targets."""

    method_name: ClassVar[str] = "IA3"
    default_target_modules: ClassVar[dict[str, list[str]]] = IA3_DEFAULT_TARGET_MODULES
    peft_config: dict[str, IA3Config]

    @classmethod
    def is_supported(cls, module: nn.Module) -> bool:
        return isinstance(module, IA3Linear) or is_linear_like(module)

    def add_adapter(self, adapter_name: str, config: TargetingConfig) -> None:
        # The default feed-forward list goes straight to create_or_update, not into the config:
        # it need not be a subset of an explicit target list (PEFT applies it the same way).
        self._feedforward = self._feedforward_modules(config)
        super().add_adapter(adapter_name, config)
        self.peft_config[adapter_name] = self._as_saved(self.peft_config[adapter_name], adapter_name)

    def _feedforward_modules(self, config: IA3Config) -> list[str] | str:
        if config.feedforward_modules is not None:
            return config.feedforward_modules
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        if model_type not in IA3_DEFAULT_FEEDFORWARD_MODULES:
            raise TargetModulesError(
                f"feedforward_modules is not set and peftkit has no default IA3 feed-forward modules for "
                f"model_type {model_type!r} (defaults exist for: {', '.join(sorted(IA3_DEFAULT_FEEDFORWARD_MODULES))}); "
                "set it to the feed-forward layers among target_modules (e.g. [down_proj]), or [] for none"
            )
        return list(IA3_DEFAULT_FEEDFORWARD_MODULES[model_type])

    def _as_saved(self, config: IA3Config, adapter_name: str) -> IA3Config:
        """The config to store and save: the feed-forward list filled in, and readable by PEFT.

        PEFT's IA3Config has no layer filter and requires feedforward_modules to be a subset of
        target_modules as strings. When either would not hold, both lists are written out as the
        full names of the adapted modules, which both libraries match exactly.
        """
        saved = copy.copy(config)
        saved.feedforward_modules = copy.copy(self._feedforward)
        layers = [
            (name.removeprefix("model."), module)
            for name, module in self.adapter_modules()
            if isinstance(module, IA3Linear) and adapter_name in module.ia3_l
        ]
        feedforward, targets = saved.feedforward_modules, saved.target_modules
        not_subset = isinstance(feedforward, list) and (
            not isinstance(targets, list) or not set(feedforward) <= set(targets)
        )
        if saved.layers_to_transform not in (None, []) or (isinstance(targets, list) and not_subset):
            saved.target_modules = [name for name, _ in layers]
            saved.feedforward_modules = [name for name, m in layers if m.is_feedforward[adapter_name]]
            saved.layers_to_transform = None
            saved.layers_pattern = None
        return saved

    def create_or_update(
        self, target: nn.Module, name: str, config: IA3Config, adapter_name: str
    ) -> nn.Module:
        layer = target if isinstance(target, IA3Linear) else IA3Linear(target)
        if config.fan_in_fan_out != layer.fan_in_fan_out:
            warnings.warn(
                f"fan_in_fan_out={config.fan_in_fan_out} does not fit {type(layer.base_layer).__name__} layers; "
                "peftkit uses the layer's own weight layout",
                stacklevel=2,
            )
        layer.update_layer(
            adapter_name,
            is_feedforward=is_feedforward(self._feedforward, name),
            init_ia3_weights=config.init_ia3_weights,
        )
        return layer
