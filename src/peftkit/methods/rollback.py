"""All-or-nothing changes to a module tree: if a block that injects adapter layers raises, every
module it could have touched is put back exactly as it was.

    with unchanged_on_error(self):        snapshot: every module's __dict__ (children, parameters,
        inject part 1 ...                 buffers, hooks, plain attributes such as peft_config),
        inject part 2 ... raises  ──────► the contents of its dicts / lists / sets, and every
                                          parameter's requires_grad; restored, then re-raised

Methods whose injection has several steps that can each fail (AdapterFusion loads and injects
N saved adapters, then wraps them; UniPELT injects LoRA, then adapters, then prefix gates) would
otherwise raise with part of the layers already in the user's model. Restoring the module
objects' own attributes, instead of undoing each step, keeps this independent of the steps: the
user's modules stay the same objects (no copies), with the same children and tensors.

Containers are restored *in place* (same dict object, old contents), so handles that point at
them (e.g. a ``RemovableHandle`` of a hook registered before) keep working. Tensor values are not
snapshotted: injection creates new tensors and never writes into existing ones.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

from torch import nn

_Snapshot = tuple[nn.Module, dict[str, Any], dict[str, Any]]


def _snapshot(module: nn.Module) -> _Snapshot:
    attrs = dict(module.__dict__)
    contents = {k: copy.copy(v) for k, v in attrs.items() if isinstance(v, (dict, list, set))}
    return module, attrs, contents


def _restore(module: nn.Module, attrs: dict[str, Any], contents: dict[str, Any]) -> None:
    module.__dict__.clear()
    module.__dict__.update(attrs)
    for key, saved in contents.items():
        container = attrs[key]
        if isinstance(container, list):
            container[:] = saved
        else:  # dict (OrderedDict keeps the saved order) or set
            container.clear()
            container.update(saved)


@contextlib.contextmanager
def unchanged_on_error(*roots: nn.Module) -> Iterator[None]:
    """Run the block; if it raises, restore every module under ``roots`` and re-raise."""
    modules = {id(m): m for root in roots for m in root.modules()}
    saved = [_snapshot(m) for m in modules.values()]
    grads = [(p, p.requires_grad) for m in modules.values() for p in m.parameters(recurse=False)]
    try:
        yield
    except BaseException:
        for module, attrs, contents in saved:
            _restore(module, attrs, contents)
        for param, flag in grads:
            param.requires_grad_(flag)
        raise
