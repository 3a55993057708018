"""``get_peft_model``: wrap a model with a new adapter (PEFT's ``mapping_func``).

It picks the ``PeftModel`` class for the config's task type (``task_models.py``), which injects
the method's layers through the registry; ``peft_model.py`` holds the wrapper itself. Also
PEFT's ``get_peft_config`` and ``PEFT_TYPE_TO_CONFIG_MAPPING``, both read from the registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods import get_method, list_methods
from peftkit.methods.base import PeftConfig
from peftkit.peft_model import PeftModel, _model_name
from peftkit.task_models import model_class_for


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Inject the adapter described by ``peft_config`` into ``model`` (in place) and wrap it.

    ``peft_config`` itself is not modified; the model's copy records the base model's name
    (a ``base_model_name_or_path`` set in the config wins over the path the model was loaded from)
    and ``revision``, if given. The arguments are PEFT's:

    - ``autocast_adapter_dtype`` (default True): adapter weights are fp32 on an fp16/bf16 model;
      False keeps them in the model's dtype.
    - ``mixed=True`` (PEFT's ``PeftMixedModel``, adapters of several methods at once) is refused.
    - ``low_cpu_mem_usage`` is accepted and changes nothing: adapter weights are created once.
    """
    del low_cpu_mem_usage
    if mixed:
        raise PeftkitError(
            "peftkit has no mixed model (mixed=True, adapters of different methods on one model): "
            "use one method per model, or several adapters of the same method with add_adapter"
        )
    config = dataclasses.replace(peft_config)
    config.base_model_name_or_path = config.base_model_name_or_path or _model_name(model)
    if revision is not None:
        config.revision = revision
    peft_model = model_class_for(config.task_type)(model, config, adapter_name)
    if not autocast_adapter_dtype:
        peft_model._cast_adapter(adapter_name)
    return peft_model


class _ConfigClassByPeftType(Mapping[str, type[PeftConfig]]):
    """``{peft_type: config class}`` of the registered methods, read from the registry on each use
    (so methods registered later appear too). Read-only: add a method with ``register_peft_method``."""

    def __getitem__(self, peft_type: str) -> type[PeftConfig]:
        for name in list_methods():
            spec = get_method(name)
            if spec.peft_type == peft_type:
                return spec.config_cls
        raise KeyError(peft_type)

    def __iter__(self) -> Iterator[str]:
        return iter([get_method(name).peft_type for name in list_methods()])

    def __len__(self) -> int:
        return len(list_methods())

    def __setitem__(self, peft_type: str, config_cls: Any) -> None:
        raise TypeError(
            "PEFT_TYPE_TO_CONFIG_MAPPING is read from peftkit's method registry: register a new method "
            "with peftkit.methods.register_peft_method(name, config_cls=..., model_cls=...)"
        )

    def __repr__(self) -> str:
        return repr({peft_type: cls.__name__ for peft_type, cls in self.items()})


PEFT_TYPE_TO_CONFIG_MAPPING: Mapping[str, type[PeftConfig]] = _ConfigClassByPeftType()


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """The config of the method named by ``config_dict["peft_type"]``, built from the dict (PEFT's).

    Goes through ``PeftConfig.from_dict``: every problem is reported at once (``ConfigError``),
    and PEFT keys for features peftkit lacks are accepted only at their default values.
    ``peft_type`` may be a string or a ``PeftType`` member.
    """
    return PeftConfig.from_dict(config_dict)
