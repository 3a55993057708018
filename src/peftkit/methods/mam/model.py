"""MAM adapter (He et al., 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning").

    block i:   x ─► attention over [P_K,i ; K] / [P_V,i ; V] ─► (+ residual) ─► h
               h ─► ffn ─────────────────────────────────────► + ─► (+ residual)
               └──► down (hidden→512) ─► relu ─► up (512→hidden) ─► × s (=4) ┘

    prefix:   the l=30 key/value positions of prefix tuning (past key/values, see
              :mod:`peftkit.methods.prompt_learning.prefix`)
    adapter:  a parallel bottleneck adapter (:class:`~peftkit.methods.adapters.BottleneckLayer`)
              wrapping each feed-forward block, reading its input

:class:`PrefixWithLayersModel` is the shared machinery of the composite methods (MAM, UniPELT): a
:class:`PrefixModel` (prefix as past key/values, forward / generate / body_hidden_states hooks) that
also swaps adapter layers into the model. Files hold the prefix encoder's own weights (with
``prefix_projection``: the MLP), not PEFT's computed ``prompt_embeddings`` table: PEFT has no such
method to stay compatible with, and the MLP is what lets a saved adapter train on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.errors import PeftkitError, TargetModulesError
from peftkit.methods.adapters.config import BottleneckConfig
from peftkit.methods.adapters.layer import BottleneckLayer
from peftkit.methods.adapters.model import bottleneck_placement
from peftkit.methods.base import AdapterModule, TargetingConfig
from peftkit.methods.mam.config import MAMConfig
from peftkit.methods.modules_to_save import ModulesToSaveWrapper
from peftkit.methods.prefix_tuning.layer import PrefixEncoder
from peftkit.methods.prompt_learning.prefix import PrefixModel
from peftkit.methods.rollback import unchanged_on_error
from peftkit.methods.targeting import inject_adapter, iter_modules_outside_adapters, replace_module
from peftkit.methods.tuner_base import TunerBase


class PrefixWithLayersModel(PrefixModel):
    """A prefix (past key/values) plus injected adapter layers; subclasses say which layers."""

    method_name: ClassVar[str] = "a prefix with adapter layers"

    def build_encoder(self, config: Any, embeddings: nn.Embedding) -> nn.Module:
        # Always the trainable form: the file stores the encoder's weights, so loading for
        # inference or for more training builds the same modules.
        return PrefixEncoder(
            dataclasses.replace(config, inference_mode=False), device=embeddings.weight.device
        )

    def inject_layers(self, adapter_name: str, config: Any) -> None:
        """Swap this method's adapter layers for ``adapter_name`` into ``self.model``."""
        raise NotImplementedError

    def extra_state_keys(self, adapter_name: str) -> dict[str, str]:
        """More ``{saved: own}`` keys (relative to this module) than the prefix and the layers'."""
        return {}

    def add_adapter(self, adapter_name: str, config: Any) -> None:
        # The prefix, then several layer injections: if a later one fails, the user's model and
        # this one are put back exactly as they were (no half-injected layers).
        with unchanged_on_error(self):
            super().add_adapter(adapter_name, config)  # validates, fills the model fields, builds the prefix
            self.inject_layers(adapter_name, self.peft_config[adapter_name])
        self.set_adapter(self.active_adapter)  # new layers start on the currently active adapter

    def injected_layers(self) -> list[tuple[str, AdapterModule]]:
        """The outermost adapter layers in ``self.model`` (names relative to it), heads excluded."""
        return [
            (name, module)
            for name, module in iter_modules_outside_adapters(self.model)
            if isinstance(module, AdapterModule) and not isinstance(module, ModulesToSaveWrapper)
        ]

    def inject(
        self,
        names: list[str],
        create_or_update: Callable[[nn.Module, str], nn.Module],
        is_supported: Callable[[nn.Module], bool],
    ) -> None:
        """Wrap exactly the modules called ``names`` (full names in ``self.model``)."""
        inject_adapter(
            self.model,
            TargetingConfig(target_modules=list(names)),
            create_or_update=create_or_update,
            is_supported=is_supported,
            method=self.method_name,
        )

    def set_adapter(self, adapter_name: str | None) -> None:
        super().set_adapter(adapter_name)
        for _, module in self.injected_layers():
            module.active_adapter = adapter_name

    def adapter_state_keys(self, adapter_name: str) -> dict[str, str]:
        keys = super().adapter_state_keys(adapter_name)
        if adapter_name not in self.peft_config:
            return keys
        for name, module in self.injected_layers():
            for saved, own in module.adapter_params(adapter_name).items():
                keys[f"model.{name}.{saved}"] = f"model.{name}.{own}"
        keys.update(self.extra_state_keys(adapter_name))
        return keys

    # Files: the module's own tensors under their names (no prompt_embeddings conversion).
    def to_saved_tensors(
        self, adapter_name: str, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return TunerBase.to_saved_tensors(self, adapter_name, tensors)

    def from_saved_tensors(
        self, adapter_name: str, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return TunerBase.from_saved_tensors(self, adapter_name, tensors)

    def unload(self, merge: bool) -> nn.Module:
        if merge:
            raise PeftkitError(
                f"{self.method_name} cannot be merged: its prefix is extra key/value positions in every attention "
                "layer, not a change to the model's weights, so there is nothing to fold it into. Keep the "
                "PeftModel to use the adapter, or call unload() to get the base model back without it."
            )
        for name, module in self.injected_layers():
            replace_module(self.model, name, module.unwrap(False))
        return super().unload(False)


def add_bottleneck(
    target: nn.Module,
    name: str,
    adapter_name: str,
    *,
    layer_cls: type[BottleneckLayer],
    parallel: bool,
    bottleneck: int,
    scaling: float,
    non_linearity: str,
    init: str,
) -> BottleneckLayer:
    """Wrap ``target`` in ``layer_cls`` (or reuse it) and add a bottleneck adapter to it."""
    layer = target if isinstance(target, layer_cls) else layer_cls(target)
    if parallel and layer.in_features != layer.out_features:
        raise TargetModulesError(
            f"a parallel adapter needs a sub-layer whose input and output widths agree, but {name} maps "
            f"{layer.in_features} -> {layer.out_features} features; set mlp_modules to the whole "
            "feed-forward block (e.g. [mlp])"
        )
    layer.update_layer(
        adapter_name,
        bottleneck=bottleneck,
        parallel=parallel,
        scaling=scaling,
        non_linearity=non_linearity,
        init=init,
    )
    return layer


def adapter_sites(model: nn.Module, config: Any, adapter_type: str) -> list[str]:
    """Full names of the feed-forward blocks an adapter of ``adapter_type`` goes to (the bottleneck
    adapters' placement rules and per-architecture defaults)."""
    placement = BottleneckConfig(adapter_type=adapter_type, mlp_modules=config.mlp_modules)
    names, _, _ = bottleneck_placement(model, placement)
    return names


class MAMModel(PrefixWithLayersModel):
    """Prefix tuning plus a parallel adapter (scaled by s) beside every feed-forward block."""

    method_name = "MAM adapter"
    config_cls = MAMConfig

    def inject_layers(self, adapter_name: str, config: MAMConfig) -> None:
        def create_or_update(target: nn.Module, name: str) -> nn.Module:
            return add_bottleneck(
                target,
                name,
                adapter_name,
                layer_cls=BottleneckLayer,
                parallel=True,
                bottleneck=config.bottleneck_size,
                scaling=config.scaling,
                non_linearity=config.non_linearity,
                init=config.adapter_init,
            )

        def supported(module: nn.Module) -> bool:
            return isinstance(module, BottleneckLayer) or not isinstance(module, AdapterModule)

        self.inject(adapter_sites(self.model, config, "parallel"), create_or_update, supported)
