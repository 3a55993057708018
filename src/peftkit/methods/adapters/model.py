"""Bottleneck adapters' model wrapper: turns ``adapter_type`` + ``attention_modules`` /
``mlp_modules`` into the sub-layers to wrap, then lets ``InjectedAdapterModel`` do the rest."""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

from torch import nn

from peftkit.errors import PeftkitError, TargetModulesError
from peftkit.methods.adapters.config import BottleneckConfig
from peftkit.methods.adapters.layer import MERGE_ERROR, BottleneckLayer, sub_layer_features
from peftkit.methods.targeting import iter_modules_outside_adapters, layer_index
from peftkit.methods.tuner import InjectedAdapterModel

_LLAMA_LIKE = {"attention": ["self_attn"], "mlp": ["mlp"], "parallel": ["mlp"]}
# Per model_type: the sub-layers a sequential adapter follows (the output before the residual
# add, as in Houlsby et al.) and the feed-forward block a parallel adapter runs beside (whose
# input is the block's hidden state). BLOOM's blocks add the residual inside, so sequential
# adapters follow their output projections; BERT/RoBERTa split the feed-forward block in two,
# so they have no default parallel module.
DEFAULT_MODULES: dict[str, dict[str, list[str] | str]] = {
    **dict.fromkeys(
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"), _LLAMA_LIKE
    ),
    "gpt2": {"attention": ["attn"], "mlp": ["mlp"], "parallel": ["mlp"]},
    "bloom": {"attention": ["self_attention.dense"], "mlp": ["mlp.dense_4h_to_h"], "parallel": ["mlp"]},
    "t5": {
        "attention": ["SelfAttention", "EncDecAttention"],
        "mlp": ["DenseReluDense"],
        "parallel": ["DenseReluDense"],
    },
    "mt5": {
        "attention": ["SelfAttention", "EncDecAttention"],
        "mlp": ["DenseReluDense"],
        "parallel": ["DenseReluDense"],
    },
    "bert": {"attention": ["attention.output.dense"], "mlp": r".*\.layer\.\d+\.output\.dense"},
    "roberta": {"attention": ["attention.output.dense"], "mlp": r".*\.layer\.\d+\.output\.dense"},
    "vit": {"attention": ["attention"], "mlp": ["mlp"], "parallel": ["mlp"]},
}


def _matches(spec: list[str] | str, name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith(f".{entry}") for entry in spec)


def _candidates(model: nn.Module) -> str:
    """Module names inside numbered layers (the part after the layer number), deduplicated."""
    found = []
    for name, module in iter_modules_outside_adapters(model):
        match = re.search(r"(?:^|\.)\d+\.(.+)$", name)
        if match and BottleneckModel.is_supported(module):
            found.append(match[1])
    return ", ".join(dict.fromkeys(found)) or "(none)"


class BottleneckModel(InjectedAdapterModel):
    """Wraps the chosen sub-layers in :class:`BottleneckLayer` s."""

    method_name: ClassVar[str] = "bottleneck adapters"
    peft_config: dict[str, BottleneckConfig]

    @classmethod
    def is_supported(cls, module: nn.Module) -> bool:
        if isinstance(module, BottleneckLayer):
            return True
        return (
            not isinstance(module, (nn.ModuleList, nn.ModuleDict)) and sub_layer_features(module) is not None
        )

    def _spec(self, config: BottleneckConfig, role: str) -> list[str] | str:
        given = config.attention_modules if role == "attention" else config.mlp_modules
        if given is not None:
            return given
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        key = "parallel" if role == "mlp" and config.parallel else role
        default = DEFAULT_MODULES.get(model_type, {}).get(key)
        if default is None:
            field = "attention_modules" if role == "attention" else "mlp_modules"
            raise TargetModulesError(
                f"{field} is not set and peftkit has no default {config.adapter_type} adapter placement for "
                f"model_type {model_type!r} (defaults exist for: {', '.join(sorted(t for t, d in DEFAULT_MODULES.items() if key in d))}); set it "
                f"to the sub-layers to adapt. Candidates in this model: {_candidates(self.model)}"
            )
        return default

    def _wrapped_names(self, config: BottleneckConfig, spec: list[str] | str, field: str) -> list[str]:
        layers = config.layers_to_transform
        wanted = None if layers in (None, []) else ({layers} if isinstance(layers, int) else set(layers))
        names = []
        for name, _ in iter_modules_outside_adapters(self.model):
            if not _matches(spec, name):
                continue
            if config.exclude_modules and _matches(config.exclude_modules, name):
                continue
            if wanted is not None and layer_index(name, config.layers_pattern) not in wanted:
                continue
            names.append(name)
        if not names:
            raise TargetModulesError(
                f"{field}={spec!r} matched no module of {type(self.model).__name__}"
                f"{' in layers ' + str(sorted(wanted)) if wanted else ''}. "
                f"Candidates in this model: {_candidates(self.model)}"
            )
        return names

    def add_adapter(self, adapter_name: str, config: BottleneckConfig) -> None:
        mlp = self._spec(config, "mlp")
        names = self._wrapped_names(config, mlp, "mlp_modules")
        attention = None
        if config.adapter_type == "houlsby":
            attention = self._spec(config, "attention")
            names = self._wrapped_names(config, attention, "attention_modules") + names
        nested = [(a, b) for a in names for b in names if b.startswith(f"{a}.")]
        if nested:
            raise TargetModulesError(
                f"{nested[0][1]} lies inside {nested[0][0]}: bottleneck adapters wrap whole sub-layers, so "
                "choose attention_modules / mlp_modules that do not contain each other"
            )
        config = dataclasses.replace(
            config, target_modules=list(dict.fromkeys(names)), attention_modules=attention, mlp_modules=mlp
        )
        super().add_adapter(adapter_name, config)

    def create_or_update(
        self, target: nn.Module, name: str, config: BottleneckConfig, adapter_name: str
    ) -> nn.Module:
        layer = target if isinstance(target, BottleneckLayer) else BottleneckLayer(target)
        width = layer.in_features if config.parallel else layer.out_features
        if config.parallel and layer.in_features != layer.out_features:
            raise TargetModulesError(
                f"a parallel adapter needs a sub-layer whose input and output widths agree, but {name} maps "
                f"{layer.in_features} -> {layer.out_features} features; set mlp_modules to the whole "
                "feed-forward block (e.g. [mlp])"
            )
        layer.update_layer(
            adapter_name,
            bottleneck=config.bottleneck_width(width),
            parallel=config.parallel,
            scaling=config.scaling,
            non_linearity=config.non_linearity,
            init=config.init,
        )
        return layer

    def unload(self, merge: bool) -> nn.Module:
        if merge:  # before any module is swapped back
            raise PeftkitError(MERGE_ERROR)
        return super().unload(merge)
