"""AdapterFusion's model wrapper: loads the bottleneck adapters to fuse (frozen), wraps every
sub-layer that holds them in a :class:`FusionLayer`, and adds the fusion's trainable weights.

    AdapterFusionModel
      └─ model                         the user's model
           └─ ...layers.3.mlp          FusionLayer          fusion_query / fusion_key / fusion_value
                └─ base_layer          BottleneckLayer      adapter_down / adapter_up .fused_0, .fused_1 (frozen)
                     └─ base_layer     the original sub-layer

With ``drop_lowest_layers=k`` the lowest k layers get neither fusion nor adapters (AdapterDrop
for AdapterFusion, Rueckle et al. 2021, section 5). Only the fusion weights (and
``modules_to_save``) are the adapter's state: saved, loaded and
trained. The fused adapters are re-read from the directories the config records, so a saved
fusion needs them at those paths (local paths are recorded as absolute paths).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from peftkit.errors import ModelLoadError, PeftkitError, TargetModulesError
from peftkit.methods.adapter_fusion.config import AdapterFusionConfig
from peftkit.methods.adapter_fusion.layer import MERGE_ERROR, FusionLayer
from peftkit.methods.adapters import BottleneckConfig, BottleneckLayer, BottleneckModel
from peftkit.methods.adapters.model import bottleneck_placement
from peftkit.methods.base import PeftConfig
from peftkit.methods.modules_to_save import find_modules_to_save, wrap_modules_to_save
from peftkit.methods.rollback import unchanged_on_error
from peftkit.methods.targeting import replace_module
from peftkit.methods.tuner import InjectedAdapterModel
from peftkit.serialization import PREFIX, load_adapter_weights, resolve_adapter_dir


def _recorded_path(source: str) -> str:
    """A local directory as an absolute path (the fusion may be loaded from elsewhere); a Hub id as is."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.is_dir() else source


def _read_bottleneck(source: str, drop: int) -> tuple[BottleneckConfig, dict[str, torch.Tensor]]:
    directory = resolve_adapter_dir(source)
    config = PeftConfig.from_pretrained(directory)
    if not isinstance(config, BottleneckConfig):
        raise ModelLoadError(
            f"{source} holds a {config.peft_type} adapter; AdapterFusion fuses bottleneck adapters "
            "(peft_type BOTTLENECK, method: bottleneck)"
        )
    # The fused adapters are frozen parts of the model; their heads are not loaded. They run
    # deterministically (no random AdapterDrop), without the layers the fusion drops.
    own_drop = 0 if config.drop_random else config.drop_lowest_layers
    config = dataclasses.replace(
        config,
        modules_to_save=None,
        inference_mode=True,
        drop_random=False,
        drop_lowest_layers=max(own_drop, drop),
    )
    return config, load_adapter_weights(directory)


class AdapterFusionModel(InjectedAdapterModel):
    merge_options = False  # cannot merge: unload(merge=True) raises
    """Fuses saved bottleneck adapters; one set of fused adapters per model."""

    method_name: ClassVar[str] = "AdapterFusion"
    supports_fsdp: ClassVar[bool] = (
        False  # not yet tested with sharded parameters (tests/test_distributed.py)
    )
    peft_config: dict[str, AdapterFusionConfig]

    def __init__(self, model: nn.Module, config: AdapterFusionConfig, adapter_name: str = "default"):
        # Before the base class adds the first adapter: which directory each fused adapter came from.
        nn.Module.__init__(self)
        self.fused_sources: dict[str, str] = {}  # internal adapter name (fused_0, ...) -> recorded path
        super().__init__(model, config, adapter_name)

    @classmethod
    def is_supported(cls, module: nn.Module) -> bool:
        return BottleneckModel.is_supported(module)

    def fusion_layers(self) -> list[FusionLayer]:
        return [m for m in self.model.modules() if isinstance(m, FusionLayer)]

    def add_adapter(self, adapter_name: str, config: AdapterFusionConfig) -> None:
        self.check_new_adapter_name(adapter_name)
        # Several steps can fail half-way (a fused adapter that does not fit, a layer that cannot
        # take one): then the user's model, and this one, are put back as they were.
        with unchanged_on_error(self):
            self._add_fusion(adapter_name, config)

    def _add_fusion(self, adapter_name: str, config: AdapterFusionConfig) -> None:
        if config.modules_to_save:
            find_modules_to_save(self.model, config.modules_to_save)  # fail before changing the model
        sources = [_recorded_path(a) for a in config.adapters]
        if self.fused_sources:
            first = next(iter(self.peft_config.values()))
            if config.drop_lowest_layers != first.drop_lowest_layers:
                raise PeftkitError(
                    f"this model's fusion layers start above layer {first.drop_lowest_layers}; another fusion "
                    f"adapter must use the same drop_lowest_layers, not {config.drop_lowest_layers}"
                )
            fused = self._already_loaded(sources)
        else:
            fused = self._load_fused_adapters(sources, config.drop_lowest_layers)
        for layer in self.fusion_layers():
            layer.update_layer(adapter_name, fused, config.value_init_std)
        if config.modules_to_save:
            wrap_modules_to_save(self.model, config.modules_to_save, adapter_name)
        self.peft_config[adapter_name] = dataclasses.replace(config, adapters=sources)
        self.set_adapter(self.active_adapter)

    def _already_loaded(self, sources: list[str]) -> list[str]:
        by_source = {source: name for name, source in self.fused_sources.items()}
        new = [s for s in sources if s not in by_source]
        if new:
            raise PeftkitError(
                f"this model already fuses {list(by_source)}; another fusion adapter can only mix those "
                f"(not {new}). Fuse other adapters on a fresh base model."
            )
        return [by_source[s] for s in sources]

    def _load_fused_adapters(self, sources: list[str], drop: int) -> list[str]:
        """Inject the bottleneck adapters at ``sources`` (frozen), then wrap their sub-layers."""
        read = [_read_bottleneck(source, drop) for source in sources]
        placements = [bottleneck_placement(self.model, config)[0] for config, _ in read]
        for source, placement in zip(sources[1:], placements[1:], strict=True):
            if set(placement) != set(placements[0]):
                only_first = sorted(set(placements[0]) - set(placement))
                only_this = sorted(set(placement) - set(placements[0]))
                raise TargetModulesError(
                    "AdapterFusion mixes adapters sub-layer by sub-layer, so all fused adapters must sit at "
                    f"the same sub-layers (same adapter_type and modules); {sources[0]} and {source} differ: "
                    f"only in the first {only_first[:4]}, only in the second {only_this[:4]}. If they differ "
                    "only by their drop_lowest_layers, set the fusion's drop_lowest_layers to the largest"
                )
        names = [f"fused_{i}" for i in range(len(sources))]
        helper = None  # a throwaway BottleneckModel: its injection logic, not its module tree
        for name, (config, weights) in zip(names, read, strict=True):
            if helper is None:
                helper = BottleneckModel(self.model, config, name)
            else:
                helper.add_adapter(name, config)
            self._copy_weights(helper, name, weights, sources[names.index(name)])
        for name, module in list(self.model.named_modules()):
            if isinstance(module, BottleneckLayer):
                module.active_adapter = None  # the FusionLayer calls the adapters itself
                module.requires_grad_(False)
                replace_module(self.model, name, FusionLayer(module))
        self.fused_sources = dict(zip(names, sources, strict=True))
        return names

    @staticmethod
    def _copy_weights(
        helper: BottleneckModel, name: str, weights: dict[str, torch.Tensor], source: str
    ) -> None:
        params = dict(helper.named_parameters(remove_duplicate=False))
        keys = {PREFIX + saved: own for saved, own in helper.adapter_state_keys(name).items()}
        missing = [k for k in keys if k not in weights]
        wrong = [
            f"{k} (file {tuple(weights[k].shape)}, model {tuple(params[own].shape)})"
            for k, own in keys.items()
            if k in weights and weights[k].shape != params[own].shape
        ]
        if missing or wrong:
            raise ModelLoadError(
                f"the bottleneck adapter in {source} does not fit this model: "
                f"{'missing ' + ', '.join(missing[:3]) if missing else ''}"
                f"{'wrong shape ' + ', '.join(wrong[:3]) if wrong else ''}. "
                "Was it trained for this base model (same hidden size and layers)?"
            )
        with torch.no_grad():
            for key, own in keys.items():
                params[own].copy_(weights[key])

    def regularization_loss(self) -> torch.Tensor | None:
        """``λ Σ_layers ||I - V||²`` for the active fusion while training (the paper's value regulariser)."""
        config = self.peft_config.get(self.active_adapter) if self.active_adapter else None
        if not self.training or config is None or config.regularization == 0:
            return None
        return config.regularization * sum(
            layer.value_penalty(self.active_adapter) for layer in self.fusion_layers()
        )

    def unload(self, merge: bool) -> nn.Module:
        if merge:  # before any module is swapped back
            raise PeftkitError(MERGE_ERROR)
        model = super().unload(merge)
        self.fused_sources.clear()
        return model
