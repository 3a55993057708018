"""LLaMA-Adapter's model wrapper: puts one adapter's :class:`AdaptedAttention` wrappers around the
top ``adapter_layers`` attention modules and swaps adapters in and out.

    model.layers.0.self_attn      LlamaAttention                       (untouched)
    model.layers.1.self_attn      AdaptedAttention(adapter "default")  (top adapter_layers = 1)
                                    ├─ adaption_prompt (1, L, hidden), adaption_gate (1,)
                                    └─ model: LlamaAttention
    _cached_adapters["other"]     [AdaptedAttention(adapter "other", model=None)]  (not a submodule)

As in PEFT, one adapter at a time sits in the model, under PEFT's parameter names, and the
others are kept outside the module tree (``_cached_adapters``, PEFT's name), so
``parameters()``, ``get_nb_trainable_parameters()`` and the trainable names show only the active
adapter, exactly as in PEFT. Unlike PEFT, the inactive adapters are not lost to torch:

* ``.to()`` / ``.half()`` / ``.cuda()`` move them too (``_apply``);
* ``state_dict()`` holds them, under ``cached_adapters.<name>.<i>.adaption_prompt`` (keys PEFT's
  state dict does not have, and only while an adapter is inactive), and ``load_state_dict`` reads
  them back, so a ``load_state_dict(state_dict())`` round trip keeps every adapter; a strict load
  of a state dict without them (e.g. PEFT's) reports them as missing keys;
* ``save_pretrained`` and ``load_adapter`` reach an inactive adapter without switching to it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
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


CACHED = "cached_adapters"  # state-dict prefix (under this module) of the inactive adapters' tensors
PARAMS = ("adaption_prompt", "adaption_gate")


class AdaptionPromptModel(TunerBase):
    """Wraps the user's model as ``.model``; the active adapter's wrappers sit inside it."""

    method_name: ClassVar[str] = "adaption prompt"

    def __init__(self, model: nn.Module, config: AdaptionPromptConfig, adapter_name: str = "default"):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, AdaptionPromptConfig] = {}
        self.active_adapter: str | None = None
        # inactive adapter -> its wrappers (detached); a plain dict, so not submodules (as in PEFT)
        self._cached_adapters: dict[str, list[AdaptedAttention]] = {}
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
            self._cached_adapters[adapter_name] = wrappers
            self._targets[adapter_name] = names
            self.peft_config[adapter_name] = config
        finally:
            self.set_adapter(active)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name``; if it was active, the first remaining adapter (PEFT's rule) is put in."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; adapters: {', '.join(self.peft_config)}")
        if adapter_name == self.active_adapter:
            remaining = [name for name in self.peft_config if name != adapter_name]
            self.set_adapter(remaining[0] if remaining else None)
        del self._cached_adapters[adapter_name], self._targets[adapter_name], self.peft_config[adapter_name]

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
        wrappers = self._cached_adapters.pop(adapter_name)
        for name, wrapper in zip(self._targets[adapter_name], wrappers, strict=True):
            parent, attr = self._parent(name)
            wrapper.train(parent.training)  # it may have been parked through a train() / eval()
            setattr(parent, attr, wrapper.attach(getattr(parent, attr)))

    def _park(self, adapter_name: str) -> None:
        wrappers = []
        for name in self._targets[adapter_name]:
            parent, attr = self._parent(name)
            wrapper = getattr(parent, attr)
            setattr(parent, attr, wrapper.detach())
            wrappers.append(wrapper)
        self._cached_adapters[adapter_name] = wrappers

    def _parent(self, name: str) -> tuple[nn.Module, str]:
        parent_name, _, attr = name.rpartition(".")
        return self.model.get_submodule(parent_name), attr

    def adapter_state_keys(self, adapter_name: str) -> dict[str, str]:
        """PEFT's keys (``model.<attention>.adaption_prompt``, no adapter name) for the adapter,
        mapped to where ``state_dict()`` shows its tensors: in the model when active, else under
        ``cached_adapters``."""
        keys = {}
        for i, name in enumerate(self._targets[adapter_name]):
            where = f"model.{name}" if adapter_name == self.active_adapter else f"{CACHED}.{adapter_name}.{i}"
            for param in PARAMS:
                keys[f"model.{name}.{param}"] = f"{where}.{param}"
        return keys

    # -- the inactive adapters, outside the module tree --------------------------------------------

    def _cached_tensors(self, prefix: str) -> dict[str, nn.Parameter]:
        return {
            f"{prefix}{CACHED}.{adapter}.{i}.{param}": getattr(wrapper, param)
            for adapter, wrappers in self._cached_adapters.items()
            for i, wrapper in enumerate(wrappers)
            for param in PARAMS
        }

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> AdaptionPromptModel:
        """``.to()``, ``.half()``, ``.cuda()`` ... reach the inactive adapters too."""
        super()._apply(fn, recurse)
        for wrappers in self._cached_adapters.values():
            for wrapper in wrappers:
                wrapper._apply(fn, recurse)
        return self

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, param in self._cached_tensors(prefix).items():
            destination[key] = param if keep_vars else param.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        own = self._cached_tensors(prefix)
        cached_prefix = f"{prefix}{CACHED}."
        with torch.no_grad():
            for key, param in own.items():
                if key not in state_dict:
                    if strict:
                        missing_keys.append(key)
                    continue
                value = state_dict[key]
                if value.shape != param.shape:
                    error_msgs.append(
                        f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                        f"the shape in the current model is {tuple(param.shape)}."
                    )
                    continue
                param.copy_(value)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(cached_prefix) and k not in own)
        rest = {k: v for k, v in state_dict.items() if not k.startswith(cached_prefix)}
        super()._load_from_state_dict(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def unload(self, merge: bool) -> nn.Module:
        if merge:  # before anything is swapped back
            raise PeftkitError(MERGE_ERROR)
        self.set_adapter(None)  # puts the original attention modules back
        self._cached_adapters.clear()
        self.peft_config.clear()
        self._targets.clear()
        return self.model
