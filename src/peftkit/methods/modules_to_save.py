"""Modules trained in full next to an adapter (``modules_to_save``, e.g. ``lm_head`` or a classifier).

    lm_head  ->  ModulesToSaveWrapper
                   original_module           frozen, used when no adapter is active
                   modules_to_save.default   trainable copy, used when "default" is active

State-dict keys are exactly PEFT's (``lm_head.modules_to_save.default.weight``) and the saved
key drops the ``modules_to_save.default.`` part (``lm_head.weight``), so files interoperate.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from peftkit.errors import TargetModulesError
from peftkit.methods.targeting import module_suffixes, replace_module


class ModulesToSaveWrapper(nn.Module):
    """Keeps the original module frozen and a trainable copy per adapter (an ``AdapterModule``)."""

    def __init__(self, module: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = adapter_name
        self.add_adapter(adapter_name)

    def add_adapter(self, adapter_name: str) -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)

    def active_module(self) -> nn.Module:
        if self.active_adapter is None or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self.active_module()(*args, **kwargs)

    # Explicit delegation: code that reads ``model.lm_head.weight`` (weight tying, resizing,
    # dtype checks) sees the weights the forward pass uses.
    @property
    def weight(self) -> torch.Tensor:
        return self.active_module().weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.active_module().bias

    def adapter_params(self, adapter_name: str) -> dict[str, str]:
        if adapter_name not in self.modules_to_save:
            return {}
        prefix = f"modules_to_save.{adapter_name}."
        return {key: prefix + key for key in self.modules_to_save[adapter_name].state_dict()}

    def unwrap(self, merge: bool) -> nn.Module:
        # As PEFT: unloading keeps the trained copy, with or without merge.
        return self.active_module()


def find_modules_to_save(model: nn.Module, names: list[str]) -> list[str]:
    """Names of the modules that ``modules_to_save=names`` selects (PEFT's suffix rule).

    Raises ``TargetModulesError`` listing the model's leaf modules if nothing matches.
    """
    found = []
    for name, _ in model.named_modules(remove_duplicate=False):
        if not name or not any(name.endswith(entry) for entry in names):
            continue
        if re.search(r"(^|\.)(original_module|modules_to_save)(\.|$)", name):
            continue  # inside a wrapper we made
        found.append(name)
    if not found:
        leaves = module_suffixes(n for n, m in model.named_modules() if n and not list(m.children()))
        raise TargetModulesError(
            f"modules_to_save={names!r} matched no module of {type(model).__name__}. "
            f"Leaf modules of this model: {', '.join(leaves)}."
        )
    return found


def wrap_modules_to_save(model: nn.Module, names: list[str], adapter_name: str) -> list[str]:
    """Wrap (or add ``adapter_name`` to) every module :func:`find_modules_to_save` selects."""
    found = find_modules_to_save(model, names)
    for name in found:
        module = model.get_submodule(name)
        if isinstance(module, ModulesToSaveWrapper):
            if adapter_name not in module.modules_to_save:
                module.add_adapter(adapter_name)
        else:
            replace_module(model, name, ModulesToSaveWrapper(module, adapter_name))
    return found
