"""LLaMA-Adapter's model wrapper: puts one adapter's :class:`AdaptedAttention` wrappers around the
top ``adapter_layers`` attention modules and swaps adapters in and out.

    model.layers.0.self_attn      LlamaAttention                       (untouched)
    model.layers.1.self_attn      AdaptedAttention(adapter "default")  (top adapter_layers = 1)
                                    ├─ adaption_prompt (1, L, hidden), adaption_gate (1,)
                                    └─ model: LlamaAttention
    parked_adapters.other.0       AdaptedAttention(adapter "other", model=None)

As in PEFT, one adapter at a time sits in the model, under PEFT's parameter names. Unlike PEFT,
the others stay registered under ``parked_adapters`` (without their attention module), so they
move with ``.to()``, and can be saved and loaded while inactive.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import nn

from peftkit.errors import PeftkitError, TargetModulesError
from peftkit.methods.adaption_prompt.config import AdaptionPromptConfig
from peftkit.methods.adaption_prompt.layer import LAYOUTS, MERGE_ERROR, AdaptedAttention, AttentionLayout
from peftkit.methods.tuner_base import TunerBase


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _layout(model: nn.Module) -> AttentionLayout:
    model_type = _model_type(model)
    if model_type not in LAYOUTS:
        raise TargetModulesError(
            f"adaption prompts (LLaMA-Adapter) support the transformers model types {', '.join(LAYOUTS)} "
            f"(as PEFT does), but this model is {type(model).__name__} with model_type {model_type!r}; "
            "use one of those models, or another method such as lora or prefix tuning"
        )
    return LAYOUTS[model_type]


def _attention_names(model: nn.Module, target: str) -> list[str]:
    """Full names (in ``model``) of the attention modules named ``target``, in layer order."""
    return [name for name, _ in model.named_modules() if name.endswith(f".{target}")]


class AdaptionPromptModel(TunerBase):
    """Wraps the user's model as ``.model``; the active adapter's wrappers sit inside it."""

    method_name: ClassVar[str] = "adaption prompt"

    def __init__(self, model: nn.Module, config: AdaptionPromptConfig, adapter_name: str = "default"):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, AdaptionPromptConfig] = {}
        self.active_adapter: str | None = None
        self.parked_adapters = nn.ModuleDict()  # inactive adapter -> its wrappers (detached)
        self._targets: dict[str, list[str]] = {}  # adapter -> names in .model of the attention it wraps
        self.add_adapter(adapter_name, config)
        self.set_adapter(adapter_name)

    @classmethod
    def targetable_modules(cls, model: nn.Module) -> list[str]:
        layout = LAYOUTS.get(_model_type(model))
        return [] if layout is None else _attention_names(model, layout.target_modules)

    # -- adapters ----------------------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, config: AdaptionPromptConfig) -> None:
        self.check_new_adapter_name(adapter_name)
        layout = _layout(self.model)
        config = dataclasses.replace(config, target_modules=config.target_modules or layout.target_modules)
        active = self.active_adapter
        self.set_adapter(None)  # new wrappers go around the original attention modules
        try:
            names = _attention_names(self.model, config.target_modules)
            if not names:
                raise TargetModulesError(
                    f"target_modules={config.target_modules!r} matched no module of {type(self.model).__name__}; "
                    f"use the name of its attention sub-modules (the default for model_type "
                    f"{_model_type(self.model)!r} is {layout.target_modules!r}) or null"
                )
            if config.adapter_layers > len(names):
                raise TargetModulesError(
                    f"adapter_layers={config.adapter_layers} but the model has only {len(names)} attention "
                    f"layers named {config.target_modules!r}; set adapter_layers to at most {len(names)}"
                )
            # The top layers: named_modules lists a ModuleList's layers in order.
            names = names[-config.adapter_layers :]
            modules = dict(self.model.named_modules())
            wrappers = []
            for name in names:
                wrapper = AdaptedAttention(modules[name], layout, adapter_name, config.adapter_len)
                wrapper.detach()
                wrappers.append(wrapper)
            self.parked_adapters[adapter_name] = nn.ModuleList(wrappers)
            self._targets[adapter_name] = names
            self.peft_config[adapter_name] = config
        finally:
            self.set_adapter(active)

    def set_adapter(self, adapter_name: str | None) -> None:
        if adapter_name is not None and adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; adapters: {', '.join(self.peft_config)}")
        if adapter_name == self.active_adapter:
            return
        if self.active_adapter is not None:
            self._park(self.active_adapter)
        if adapter_name is not None:
            self._install(adapter_name)
        self.active_adapter = adapter_name

    def _install(self, adapter_name: str) -> None:
        wrappers = self.parked_adapters[adapter_name]
        for name, wrapper in zip(self._targets[adapter_name], wrappers, strict=True):
            parent, attr = self._parent(name)
            setattr(parent, attr, wrapper.attach(getattr(parent, attr)))
        del self.parked_adapters[adapter_name]

    def _park(self, adapter_name: str) -> None:
        wrappers = []
        for name in self._targets[adapter_name]:
            parent, attr = self._parent(name)
            wrapper = getattr(parent, attr)
            setattr(parent, attr, wrapper.detach())
            wrappers.append(wrapper)
        self.parked_adapters[adapter_name] = nn.ModuleList(wrappers)

    def _parent(self, name: str) -> tuple[nn.Module, str]:
        parent_name, _, attr = name.rpartition(".")
        return self.model.get_submodule(parent_name), attr

    def adapter_state_keys(self, adapter_name: str) -> dict[str, str]:
        """PEFT's keys (``model.<attention>.adaption_prompt``, no adapter name) for the adapter,
        mapped to where its tensors are now: in the model when active, else in ``parked_adapters``."""
        keys = {}
        for i, name in enumerate(self._targets[adapter_name]):
            where = (
                f"model.{name}"
                if adapter_name == self.active_adapter
                else f"parked_adapters.{adapter_name}.{i}"
            )
            for param in ("adaption_prompt", "adaption_gate"):
                keys[f"model.{name}.{param}"] = f"{where}.{param}"
        return keys

    def unload(self, merge: bool) -> nn.Module:
        if merge:  # before anything is swapped back
            raise PeftkitError(MERGE_ERROR)
        self.set_adapter(None)  # puts the original attention modules back
        for name in list(self.parked_adapters):
            del self.parked_adapters[name]
        self.peft_config.clear()
        self._targets.clear()
        return self.model
