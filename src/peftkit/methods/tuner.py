"""Shared model wrapper for methods that swap adapter layers into the model (LoRA, IA3, LoHa, ...).

A method subclasses :class:`InjectedAdapterModel` once and fills in three hooks:

* ``is_supported(module)``            -- can this method adapt this module?
* ``create_or_update(target, name, config, adapter_name)`` -- return the adapter layer for it
* ``default_target_modules``          -- {model_type: [names]} used when target_modules is null

and optionally ``extra_trainable_names(adapter_name)`` for base-model parameters the method also
trains and saves (LoRA's ``bias``). Everything else -- matching, ``modules_to_save``, switching
adapters, the state-dict key map, merging in place, unloading -- is here and never looks at the
method's name.
"""

from __future__ import annotations

import warnings
from typing import ClassVar

from torch import nn

from peftkit.methods.base import AdapterModule, TargetingConfig
from peftkit.methods.merging import (
    Snapshot,
    check_finite,
    merge_in_place,
    merged_in_place_layers,
    refuse_while_merged,
    unmerge,
    unwrap_atomically,
)
from peftkit.methods.modules_to_save import find_modules_to_save, wrap_modules_to_save
from peftkit.methods.targeting import (
    inject_adapter,
    replace_module,
    resolve_target_modules,
    targetable_modules,
)
from peftkit.methods.tuner_base import TunerBase


class InjectedAdapterModel(TunerBase):
    """Wraps the user's model as ``.model`` and manages the adapters injected into it."""

    method_name: ClassVar[str] = "this method"  # for error messages only
    supports_packing: ClassVar[bool] = True  # weights / per-token activations only
    supports_fsdp: ClassVar[bool] = True  # tests/test_fsdp.py
    default_target_modules: ClassVar[dict[str, list[str]]] = {}
    merge_options: ClassVar[bool] = True

    def __init__(self, model: nn.Module, config: TargetingConfig, adapter_name: str = "default"):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, TargetingConfig] = {}
        self.active_adapter: str | None = adapter_name
        self.merged_adapters: list[str] = []  # merged into the weights by merge_adapter, in order
        self._unmerged: Snapshot = []  # the base tensors before merge_adapter (CPU copies)
        self.add_adapter(adapter_name, config)

    # -- hooks ---------------------------------------------------------------------------------

    @classmethod
    def is_supported(cls, module: nn.Module) -> bool:
        raise NotImplementedError

    def create_or_update(
        self, target: nn.Module, name: str, config: TargetingConfig, adapter_name: str
    ) -> nn.Module:
        raise NotImplementedError

    def extra_trainable_names(self, adapter_name: str) -> list[str]:
        """Names (relative to this module) of base parameters trained and saved with the adapter."""
        return []

    # -- shared --------------------------------------------------------------------------------

    def bias_names(self, mode: str, layer_types: type | tuple[type, ...]) -> list[str]:
        """PEFT's ``bias`` option as parameter names: ``"all"`` trains every bias of the model,
        ``"<method>_only"`` (``lora_only``, ``oft_only``) only those of the adapted layers."""
        if mode == "all":
            return [
                n for n, _ in self.named_parameters(remove_duplicate=False) if n.rsplit(".", 1)[-1] == "bias"
            ]
        if mode.endswith("_only"):
            return [
                f"{name}.base_layer.bias"
                for name, module in self.named_modules()
                if isinstance(module, layer_types) and getattr(module.base_layer, "bias", None) is not None
            ]
        return []

    @classmethod
    def targetable_modules(cls, model: nn.Module) -> list[str]:
        return targetable_modules(model, cls.is_supported)

    def add_adapter(self, adapter_name: str, config: TargetingConfig) -> None:
        refuse_while_merged(self.merged_adapters, "add_adapter")
        self.check_new_adapter_name(adapter_name)
        if config.modules_to_save:
            find_modules_to_save(self.model, config.modules_to_save)  # fail before changing the model
        config = resolve_target_modules(
            config,
            self.model,
            defaults=self.default_target_modules,
            is_supported=self.is_supported,
            method=self.method_name,
        )
        inject_adapter(
            self.model,
            config,
            create_or_update=lambda target, name: self.create_or_update(target, name, config, adapter_name),
            is_supported=self.is_supported,
            method=self.method_name,
        )
        if config.modules_to_save:
            wrap_modules_to_save(self.model, config.modules_to_save, adapter_name)
        self.peft_config[adapter_name] = config
        self.set_adapter(self.active_adapter)  # new layers start on the currently active adapter

    def adapter_modules(self) -> list[tuple[str, AdapterModule]]:
        """The outermost adapter layers, with names relative to this module."""
        found: list[tuple[str, AdapterModule]] = []
        for name, module in self.named_modules():
            if isinstance(module, AdapterModule) and not any(
                name.startswith(f"{outer}.") for outer, _ in found[-1:]
            ):
                found.append((name, module))
        return found

    def set_adapter(self, adapter_name: str | None) -> None:
        if adapter_name is not None and adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; adapters: {', '.join(self.peft_config)}")
        if self.merged_adapters:  # PEFT's behaviour: switching adapters unmerges first
            warnings.warn(
                f"adapter(s) {', '.join(self.merged_adapters)} are merged into the weights: unmerging them "
                "before setting the adapter",
                stacklevel=2,
            )
            self.unmerge_adapter()
        self.active_adapter = adapter_name
        for _, module in self.adapter_modules():
            module.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` from every layer; if it was active, the first remaining adapter
        becomes active (PEFT's rule), or none when it was the last.

        Layers keep each adapter's state in containers keyed by its name (``lora_A["default"]``,
        ``scaling["default"]``), so removing those entries removes the adapter, whatever the method.
        """
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; adapters: {', '.join(self.peft_config)}")
        refuse_while_merged(self.merged_adapters, "delete_adapter")
        del self.peft_config[adapter_name]
        for _, layer in self.adapter_modules():
            for module in layer.modules():
                for attr, value in list(vars(module).items()) + list(module._modules.items()):
                    if attr.startswith("_") or not isinstance(value, (dict, nn.ModuleDict, nn.ParameterDict)):
                        continue
                    if adapter_name in value:
                        del value[adapter_name]
        if self.active_adapter == adapter_name:
            self.set_adapter(next(iter(self.peft_config), None))
        else:
            self.set_adapter(self.active_adapter)

    def adapter_state_keys(self, adapter_name: str) -> dict[str, str]:
        keys = {}
        for name, module in self.adapter_modules():
            for saved, own in module.adapter_params(adapter_name).items():
                keys[f"{name}.{saved}"] = f"{name}.{own}"
        keys.update({name: name for name in self.extra_trainable_names(adapter_name)})
        return keys

    # -- merging in place (merge_adapter / unmerge_adapter) ------------------------------------

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the active adapter (or each of ``adapter_names``, in turn) into the base weights,
        keeping the adapter layers (switched off) so that :meth:`unmerge_adapter` can undo it.

        All-or-nothing as ``merge_and_unload`` (see ``merging.merge_in_place``); ``safe_merge``
        also checks the merged weights are finite. Merging again while merged adds the adapters
        not merged yet on top (as PEFT; already merged ones are skipped with a warning).
        ``modules_to_save`` copies keep running the active adapter's copy while merged.
        """
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names must be a list of adapter names, got {adapter_names!r}")
        if adapter_names is None:
            if self.active_adapter is None:
                raise ValueError("no adapter is active: pass adapter_names=[...] or call set_adapter() first")
            adapter_names = [self.active_adapter]
        names = list(dict.fromkeys(adapter_names))
        if not names:
            raise ValueError("adapter_names is empty: name at least one adapter to merge")
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"no adapter(s) named {unknown}; adapters: {', '.join(self.peft_config)}")
        new = [n for n in names if n not in self.merged_adapters]
        if self.merged_adapters:
            done = ", ".join(self.merged_adapters)
            message = f"now additionally merging {', '.join(new)}" if new else "nothing to do"
            warnings.warn(f"adapter(s) {done} are already merged; {message}", stacklevel=2)
            if not new:
                return
        saved = merge_in_place(
            self.adapter_modules(), new, all_adapters=list(self.peft_config), safe_merge=safe_merge
        )
        # An additional merge adds the tensors the earlier ones left alone; for the others the
        # first snapshot holds the base values.
        held = {id(tensor) for tensor, _ in self._unmerged}
        self._unmerged += [(tensor, copy) for tensor, copy in saved if id(tensor) not in held]
        self.merged_adapters += new

    def unmerge_adapter(self) -> None:
        """Undo :meth:`merge_adapter`: the base tensors saved before merging are written back, so
        the base weights are bit-exact. (PEFT instead subtracts the update again -- or divides by
        IA3's vector, inverts DoRA's rescale -- which leaves rounding error in the weights.)"""
        if not self.merged_adapters:
            return
        unmerge(merged_in_place_layers(self.adapter_modules()), self._unmerged, self.active_adapter)
        self.merged_adapters, self._unmerged = [], []

    def unload(
        self, merge: bool, *, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Put the plain layers back; with ``merge`` all-or-nothing (see ``unwrap_atomically``).

        After ``merge_adapter``: ``merge`` keeps what is merged (adding ``adapter_names`` not merged
        yet), without merging twice; without ``merge`` the base weights are restored first.
        """
        if adapter_names is not None:
            unknown = [n for n in adapter_names if n not in self.peft_config]
            if unknown:
                raise ValueError(f"no adapter(s) named {unknown}; adapters: {', '.join(self.peft_config)}")
        if self.merged_adapters and not merge:
            self.unmerge_adapter()
        if self.merged_adapters:
            extra = [n for n in adapter_names or [] if n not in self.merged_adapters]
            if extra:
                self.merge_adapter(extra, safe_merge=safe_merge)
            elif safe_merge:
                for _, layer in merged_in_place_layers(self.adapter_modules()):
                    check_finite(layer.unwrap(False))
            merge, self.merged_adapters, self._unmerged = False, [], []  # the layers hold the merge
        unwrapped = unwrap_atomically(
            self.adapter_modules(),
            merge=merge,
            adapter_names=adapter_names,
            all_adapters=list(self.peft_config),
            safe_merge=safe_merge,
        )
        for name, module in unwrapped:
            replace_module(self, name, module)
        self.peft_config.clear()
        return self.model
