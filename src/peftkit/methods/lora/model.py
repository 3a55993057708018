"""LoRA's model wrapper: the hooks that ``InjectedAdapterModel`` asks a method for."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

from torch import nn

from peftkit.methods.lora.bnb import new_quantized_lora_layer
from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.conv import CONV_TYPES, LoraConv
from peftkit.methods.lora.embedding import LoraEmbedding
from peftkit.methods.lora.layer import LoraLinear
from peftkit.methods.lora.mixed_batch import mixed_batch, validate_adapter_names, why_not_mixed
from peftkit.methods.lora.plain_conversion import as_plain_lora
from peftkit.methods.lora.trainable_tokens import wrap_trainable_tokens
from peftkit.methods.lora.weighted import add_weighted_adapter
from peftkit.methods.targeting import is_linear_like
from peftkit.methods.tuner import InjectedAdapterModel

# PEFT's default target modules per transformers model_type (used when target_modules is null).
LORA_DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
}


def pattern_value(patterns: dict[str, float], name: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key whose regex matches the end of ``name``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


LORA_LAYER_TYPES = (LoraLinear, LoraEmbedding, LoraConv)


def _new_layer(target: nn.Module) -> nn.Module:
    """The LoRA layer type for a plain module (``is_supported`` has accepted it)."""
    quantized = new_quantized_lora_layer(target)  # bitsandbytes 4-/8-bit linear (QLoRA), see bnb.py
    if quantized is not None:
        return quantized
    if isinstance(target, nn.Embedding):
        return LoraEmbedding(target)
    if isinstance(target, CONV_TYPES):
        return LoraConv(target)
    return LoraLinear(target)


class LoraModel(InjectedAdapterModel):
    """Injects LoRA layers into ``nn.Linear`` / ``Conv1D``, ``nn.Embedding`` and ``nn.Conv1d/2d`` targets."""

    method_name: ClassVar[str] = "LoRA"
    supports_quantized_base: ClassVar[bool] = True  # bitsandbytes 4-/8-bit linear bases, see bnb.py
    supports_mixed_batches: ClassVar[bool] = True  # adapter_names=[...] per row, see mixed_batch.py
    default_target_modules: ClassVar[dict[str, list[str]]] = LORA_DEFAULT_TARGET_MODULES
    peft_config: dict[str, LoraConfig]

    def can_mix_in_one_batch(self, adapter_names: Sequence[str]) -> bool:
        return why_not_mixed(self, adapter_names) is None  # e.g. DoRA adapters cannot

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        if adapter_names is None:
            return self.model(*args, **kwargs)
        names = validate_adapter_names(self, adapter_names, args, kwargs)
        with mixed_batch(self.model, names, expandable=False):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """With ``adapter_names``: one adapter per prompt; the rows that beam search or
        ``num_return_sequences`` make from a prompt use that prompt's adapter."""
        if adapter_names is None:
            return self.model.generate(*args, **kwargs)
        names = validate_adapter_names(self, adapter_names, args, kwargs)
        with mixed_batch(self.model, names, expandable=True):
            return self.model.generate(*args, **kwargs)

    @classmethod
    def is_supported(cls, module: nn.Module) -> bool:
        return (
            isinstance(module, LORA_LAYER_TYPES)
            or is_linear_like(module)
            or isinstance(module, (nn.Embedding, *CONV_TYPES))
        )

    def create_or_update(
        self, target: nn.Module, name: str, config: LoraConfig, adapter_name: str
    ) -> nn.Module:
        layer = target if isinstance(target, LORA_LAYER_TYPES) else _new_layer(target)
        if isinstance(layer, LoraLinear) and config.fan_in_fan_out != layer.fan_in_fan_out:
            warnings.warn(
                f"fan_in_fan_out={config.fan_in_fan_out} does not fit {type(layer.base_layer).__name__} layers; "
                "peftkit uses the layer's own weight layout",
                stacklevel=2,
            )
        layer.update_layer(
            adapter_name,
            r=int(pattern_value(config.rank_pattern, name, config.r)),
            lora_alpha=pattern_value(config.alpha_pattern, name, config.lora_alpha),
            lora_dropout=config.lora_dropout,
            init_lora_weights=config.init_lora_weights,
            use_rslora=config.use_rslora,
            use_dora=config.use_dora,
        )
        return layer

    def extra_trainable_names(self, adapter_name: str) -> list[str]:
        return self.bias_names(self.peft_config[adapter_name].bias, LORA_LAYER_TYPES)

    def add_adapter(self, adapter_name: str, config: LoraConfig) -> None:
        super().add_adapter(adapter_name, config)
        if config.trainable_token_indices is not None:  # after LoRA and modules_to_save, as in PEFT
            wrap_trainable_tokens(
                self.model,
                config.trainable_token_indices,
                adapter_name,
                lora_targets={n for n, m in self.model.named_modules() if isinstance(m, LORA_LAYER_TYPES)},
            )
            self.set_adapter(self.active_adapter)

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, **kwargs
    ) -> None:
        """Add ``adapter_name`` combining ``adapters`` (PEFT's options; see ``weighted.py``)."""
        add_weighted_adapter(self, adapters, weights, adapter_name, **kwargs)

    def as_plain_adapter(
        self, tensors: dict[str, Any], config: dict[str, Any], initial: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        return as_plain_lora(tensors, config, initial)  # PiSSA / OLoRA -> LoRA, see plain_conversion.py
