"""Bottleneck adapters' model wrapper: turns ``adapter_type`` + ``attention_modules`` /
``mlp_modules`` (minus AdapterDrop's lowest layers) into the sub-layers to wrap, then lets
``InjectedAdapterModel`` do the rest.

AdapterDrop (Rueckle et al., 2021), per config:

    drop_lowest_layers=k                    layers 0..k-1 get no adapter (not created): they compute
                                            exactly what the base model computes, in training and inference
    drop_lowest_layers=k, drop_random=True  every layer gets one; each training forward pass draws
                                            n ~ U{0..k} and skips the adapters of layers 0..n-1;
                                            eval mode skips none
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import torch
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
    merge_options = False  # cannot merge: unload(merge=True) raises
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

    def add_adapter(self, adapter_name: str, config: BottleneckConfig) -> None:
        names, attention, mlp = bottleneck_placement(self.model, config)
        config = dataclasses.replace(
            config, target_modules=names, attention_modules=attention, mlp_modules=mlp
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
        layer.layer_index = layer_index(name, config.layers_pattern)
        layer.update_layer(
            adapter_name,
            bottleneck=config.bottleneck_width(width),
            parallel=config.parallel,
            scaling=config.scaling,
            non_linearity=config.non_linearity,
            init=config.init,
        )
        return layer

    # -- robust AdapterDrop: one draw per training forward pass, shared by all layers ----------------

    def _draw_adapter_drop(self) -> None:
        """Set how many of the lowest layers skip their adapter in this pass (training mode only)."""
        if not any(c.drop_random for c in self.peft_config.values()):
            return
        config = self.peft_config.get(self.active_adapter) if self.active_adapter else None
        n = 0
        if self.training and config is not None and config.drop_random:
            n = int(torch.randint(0, config.drop_lowest_layers + 1, ()).item())
        # Kept until the next pass, so activation checkpointing recomputes the same forward.
        for module in self.model.modules():
            if isinstance(module, BottleneckLayer):
                module.skip_below = n

    def forward(self, *args, **kwargs):
        self._draw_adapter_drop()
        return super().forward(*args, **kwargs)

    def body_hidden_states(self, body, input_ids, attention_mask, position_ids=None):
        self._draw_adapter_drop()
        return super().body_hidden_states(body, input_ids, attention_mask, position_ids)

    def unload(self, merge: bool) -> nn.Module:
        if merge:  # before any module is swapped back
            raise PeftkitError(MERGE_ERROR)
        return super().unload(merge)


# -- which sub-layers an adapter wraps ---------------------------------------------------------------


def _spec(model: nn.Module, config: BottleneckConfig, role: str) -> list[str] | str:
    given = config.attention_modules if role == "attention" else config.mlp_modules
    if given is not None:
        return given
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    key = "parallel" if role == "mlp" and config.parallel else role
    default = DEFAULT_MODULES.get(model_type, {}).get(key)
    if default is None:
        field = "attention_modules" if role == "attention" else "mlp_modules"
        known = ", ".join(sorted(t for t, d in DEFAULT_MODULES.items() if key in d))
        raise TargetModulesError(
            f"{field} is not set and peftkit has no default {config.adapter_type} adapter placement for "
            f"model_type {model_type!r} (defaults exist for: {known}); set it "
            f"to the sub-layers to adapt. Candidates in this model: {_candidates(model)}"
        )
    return default


def _wrapped_names(
    model: nn.Module, config: BottleneckConfig, spec: list[str] | str, field: str
) -> list[str]:
    layers = config.layers_to_transform
    wanted = None if layers in (None, []) else ({layers} if isinstance(layers, int) else set(layers))
    dropped = 0 if config.drop_random else config.drop_lowest_layers
    names, unnumbered, all_dropped = [], [], []
    for name, _ in iter_modules_outside_adapters(model):
        if not _matches(spec, name):
            continue
        if config.exclude_modules and _matches(config.exclude_modules, name):
            continue
        index = layer_index(name, config.layers_pattern)
        if wanted is not None and index not in wanted:
            continue
        if config.drop_lowest_layers and index is None:
            unnumbered.append(name)
        elif dropped and index < dropped:
            all_dropped.append(name)
            continue
        names.append(name)
    if unnumbered:
        raise TargetModulesError(
            f"AdapterDrop (drop_lowest_layers={config.drop_lowest_layers}) drops adapters by layer number, but "
            f"{unnumbered[0]} lies in no numbered layer (like model.layers.3.mlp); use drop_lowest_layers: 0 "
            "for this model"
        )
    if not names:
        reason = f" in layers {sorted(wanted)}" if wanted else ""
        if all_dropped:
            reason += f" above the {dropped} dropped by drop_lowest_layers (lower it)"
        raise TargetModulesError(
            f"{field}={spec!r} matched no module of {type(model).__name__}{reason}. "
            f"Candidates in this model: {_candidates(model)}"
        )
    return names


def bottleneck_placement(
    model: nn.Module, config: BottleneckConfig
) -> tuple[list[str], list[str] | str | None, list[str] | str]:
    """The full names of the sub-layers ``config`` wraps in ``model`` (attention ones first), and the
    resolved ``attention_modules`` / ``mlp_modules``. Changes nothing, so callers (AdapterFusion)
    can compare placements before injecting."""
    mlp = _spec(model, config, "mlp")
    names = _wrapped_names(model, config, mlp, "mlp_modules")
    attention = None
    if config.adapter_type == "houlsby":
        attention = _spec(model, config, "attention")
        names = _wrapped_names(model, config, attention, "attention_modules") + names
    nested = [(a, b) for a in names for b in names if b.startswith(f"{a}.")]
    if nested:
        raise TargetModulesError(
            f"{nested[0][1]} lies inside {nested[0][0]}: bottleneck adapters wrap whole sub-layers, so "
            "choose attention_modules / mlp_modules that do not contain each other"
        )
    return list(dict.fromkeys(names)), attention, mlp
