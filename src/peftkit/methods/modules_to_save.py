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
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from peftkit.errors import TargetModulesError
from peftkit.methods.targeting import module_suffixes, replace_module

BASE = "__base__"  # PEFT's adapter name for "no adapter on this row" in mixed-adapter batches


def forward_by_row_adapter(
    x: torch.Tensor, names: list[str], run: Callable[[str | None, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Mixed-adapter batches for modules that replace the computation per adapter: run each
    adapter's rows of ``x`` together (``run(None, rows)`` for ``__base__``) and put every row's
    output back in its place."""
    output: torch.Tensor | None = None
    for adapter in dict.fromkeys(names):
        rows = torch.tensor([i for i, name in enumerate(names) if name == adapter], device=x.device)
        result = run(None if adapter == BASE else adapter, x[rows])
        if output is None:
            output = result.new_empty((len(names), *result.shape[1:]))
        output[rows] = result
    return output


class ModulesToSaveWrapper(nn.Module):
    """Keeps the original module frozen and a trainable copy per adapter (an ``AdapterModule``)."""

    # Set (to a ``RowAdapters``) only inside a mixed-adapter call: one adapter per batch row.
    row_adapters: Any = None

    def __init__(self, module: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = adapter_name
        self.add_adapter(adapter_name)

    def add_adapter(self, adapter_name: str) -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)

    def active_module(self) -> nn.Module:
        return self.module_for(self.active_adapter)

    def forward(self, *args, **kwargs):
        if self.row_adapters is not None:
            names = self.row_adapters.for_batch(len(args[0]))
            return forward_by_row_adapter(
                args[0], names, lambda a, x: self.module_for(a)(x, *args[1:], **kwargs)
            )
        return self.active_module()(*args, **kwargs)

    def module_for(self, adapter_name: str | None) -> nn.Module:
        """The copy that adapter ``adapter_name`` trained (the original for ``None`` or an adapter
        that has no copy here)."""
        if adapter_name is None or adapter_name not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[adapter_name]

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
