"""The one registry of PEFT methods.

A method makes itself known with one line in its package ``__init__``::

    register_peft_method("lora", config_cls=LoraConfig, model_cls=LoraModel)

Config loading (``PeftConfig.from_pretrained`` dispatches on ``peft_type``), ``PeftModel``, saving
and the CLI find methods only through :func:`get_method` / :func:`list_methods`. The method's
``peft_type`` (what ``adapter_config.json`` stores) is its name upper-cased, as in PEFT.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from peftkit.configuration import closest
from peftkit.errors import PeftkitError
from peftkit.methods.base import PeftConfig, TaskType, TunerModel

if TYPE_CHECKING:
    from torch import nn

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_TUNER_HOOKS = ("add_adapter", "set_adapter", "adapter_state_keys", "unload", "targetable_modules")


class UnknownMethodError(PeftkitError, ValueError):
    """A PEFT method name or ``peft_type`` that no registered method has."""


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its name, what its configs say in ``peft_type``, and its classes."""

    name: str
    peft_type: str
    config_cls: type[PeftConfig]
    model_cls: type[TunerModel]

    def targetable_modules(self, model: nn.Module) -> list[str]:
        """Full names of the modules of ``model`` this method could adapt (``peftkit inspect``)."""
        return self.model_cls.targetable_modules(model)


_REGISTRY: dict[str, MethodSpec] = {}


def register_peft_method(name: str, config_cls: type[PeftConfig], model_cls: type) -> MethodSpec:
    """Register a method under ``name`` (lower-case identifier); rejects duplicates and malformed input."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"method name must be a lower-case identifier like 'lora' or 'ia3', got {name!r}")
    if name in _REGISTRY:
        raise ValueError(
            f"a PEFT method named {name!r} is already registered ({_REGISTRY[name].config_cls.__name__})"
        )
    peft_type = name.upper()
    if not (
        isinstance(config_cls, type)
        and issubclass(config_cls, PeftConfig)
        and dataclasses.is_dataclass(config_cls)
    ):
        raise TypeError(f"config_cls for {name!r} must be a PeftConfig dataclass, got {config_cls!r}")
    declared = config_cls._declared_peft_type()
    if declared != peft_type:
        raise ValueError(
            f"{config_cls.__name__}.peft_type defaults to {declared!r}; method {name!r} needs {peft_type!r}"
        )
    from peftkit.methods.tuner_base import TunerBase

    missing = [hook for hook in _TUNER_HOOKS if not callable(getattr(model_cls, hook, None))]
    if not isinstance(model_cls, type) or not issubclass(model_cls, TunerBase) or missing:
        raise TypeError(
            f"model_cls for {name!r} must be a TunerBase subclass with {', '.join(_TUNER_HOOKS)}; "
            f"missing: {missing}"
        )
    for spec in _REGISTRY.values():
        if spec.config_cls is config_cls:
            raise ValueError(f"{config_cls.__name__} is already registered for method {spec.name!r}")
    spec = MethodSpec(name=name, peft_type=peft_type, config_cls=config_cls, model_cls=model_cls)
    _REGISTRY[name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """The method called ``name`` (case-insensitive: "lora", "LORA" and "LoRA" all work)."""
    key = str(name).lower()
    if key in _REGISTRY:
        return _REGISTRY[key]
    near = closest(key, _REGISTRY)
    hint = f"did you mean {' or '.join(repr(n) for n in near)}? " if near else ""
    raise UnknownMethodError(
        f"unknown PEFT method {name!r}: {hint}registered methods: {', '.join(list_methods())}"
    )


def list_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_REGISTRY)


__all__ = [
    "MethodSpec",
    "PeftConfig",
    "TaskType",
    "UnknownMethodError",
    "get_method",
    "list_methods",
    "register_peft_method",
]

# Built-in methods register themselves on import.
from peftkit.methods import (  # noqa: E402, F401
    adalora,
    adapter_fusion,
    adapters,
    adaption_prompt,
    boft,
    ia3,
    loha,
    lokr,
    lora,
    mam,
    oft,
    p_tuning,
    p_tuning_v2,
    prefix_tuning,
    prompt_tuning,
    selective,
    unipelt,
)
