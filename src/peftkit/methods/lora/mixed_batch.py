"""Mixed-adapter batches: a different LoRA adapter for each row of one batch (PEFT's ``adapter_names``).

    model(input_ids, adapter_names=["a", "__base__", "b", "a"])

    row 0 ─┐                  ┌─ base + LoRA "a"     (rows 0 and 3 go through A/B of "a" together)
    row 1 ─┼─► base layer ─► ─┼─ base only          ("__base__": no adapter for this row)
    row 2 ─┤   (whole batch)  ├─ base + LoRA "b"
    row 3 ─┘                  └─ base + LoRA "a"

Every row gets exactly what it would get run alone with that adapter active. As in PEFT 0.21,
this is for inference only (eval mode), and refused for DoRA adapters. ``modules_to_save`` copies
(e.g. a classifier head) and ``trainable_token_indices`` rows follow each row's adapter too.

:func:`mixed_batch` sets ``row_adapters`` on every layer that has that attribute (LoRA layers,
``ModulesToSaveWrapper``, ``TrainableTokensWrapper``) for one call and always clears it again;
each layer then splits its batch by adapter (``LoraLayerBase.mixed_batch_forward``,
``modules_to_save.forward_by_row_adapter``).
In ``generate`` the batch may grow (beam search, ``num_return_sequences``): HF repeats each row
k times in place, so the names are repeated the same way, decided per layer call from the
batch it sees (an encoder still sees the original rows).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from peftkit.methods.base import AdapterModule
from peftkit.methods.modules_to_save import BASE


class RowAdapters:
    """The adapter name of each row, as given; ``for_batch`` fits it to the batch a layer sees."""

    def __init__(self, names: Sequence[str], expandable: bool):
        self.names = list(names)
        self.expandable = expandable
        self._groups: dict[tuple[int, str], list[tuple[str, slice | torch.Tensor]]] = {}

    def groups(self, rows: int, device: torch.device) -> list[tuple[str, slice | torch.Tensor]]:
        """``[(adapter, rows)]`` for a batch of ``rows``, in first-appearance order, ``__base__``
        left out; a run of consecutive rows is a ``slice`` (a view, no gather). Computed once per
        call of the model, not once per layer."""
        key = (rows, str(device))
        if key not in self._groups:
            names = self.for_batch(rows)
            found = []
            for adapter in dict.fromkeys(names):
                if adapter == BASE:
                    continue
                where = [i for i, name in enumerate(names) if name == adapter]
                if where[-1] - where[0] + 1 == len(where):
                    found.append((adapter, slice(where[0], where[-1] + 1)))
                else:
                    found.append((adapter, torch.tensor(where, device=device)))
            self._groups[key] = found
        return self._groups[key]

    def for_batch(self, rows: int) -> list[str]:
        count = len(self.names)
        if rows == count:
            return self.names
        if self.expandable and rows % count == 0:  # generate's in-place repeat of each row
            return [name for name in self.names for _ in range(rows // count)]
        raise ValueError(
            f"adapter_names has {count} entries but the batch has {rows} rows: give exactly one adapter "
            f"name (or {BASE!r}) per row"
        )


def why_not_mixed(model: Any, adapter_names: Sequence[str]) -> str | None:
    """Why rows of these (known) adapters cannot share one batch, or None if they can."""
    dora = sorted({n for n in adapter_names if n != BASE and model.peft_config[n].use_dora})
    if dora:
        return f"adapter_names cannot use DoRA adapters ({dora}), as in PEFT: run them separately"
    others = [
        f"{name} ({type(module).__name__})"
        for name, module in model.model.named_modules()
        if isinstance(module, AdapterModule) and not hasattr(module, "row_adapters")
    ]
    if others:
        return (
            "adapter_names supports LoRA layers, modules_to_save and trainable tokens only, but the model "
            f"also holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}: run each adapter's "
            "rows separately"
        )
    return None


def validate_adapter_names(model: Any, adapter_names: Any, args: tuple, kwargs: dict) -> list[str]:
    """PEFT's checks, before anything runs; ``model`` is the ``LoraModel``."""
    if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_names must be a list of adapter names, one per row; got {adapter_names!r}")
    if model.training:
        raise ValueError(
            "adapter_names (mixed-adapter batches) works in eval mode only: call model.eval() first"
        )
    unknown = sorted({n for n in adapter_names if n != BASE and n not in model.peft_config})
    if unknown:
        raise ValueError(
            f"adapter_names names unknown adapter(s) {unknown}; adapters: {', '.join(model.peft_config)} "
            f"(or {BASE!r} for no adapter)"
        )
    problem = why_not_mixed(model, adapter_names)
    if problem:
        raise ValueError(problem)
    inputs = kwargs.get("input_ids", args[0] if args else None)
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    if isinstance(inputs, torch.Tensor) and inputs.dim() > 1 and len(inputs) != len(adapter_names):
        raise ValueError(
            f"adapter_names has {len(adapter_names)} entries but the batch has {len(inputs)} rows: "
            f"give exactly one adapter name (or {BASE!r}) per row"
        )
    return list(adapter_names)


def row_adapter_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` that can split a batch by row adapter (a walk over every module:
    callers that run many batches on an unchanged model may keep the list)."""
    return [m for m in model.modules() if isinstance(m, AdapterModule) and hasattr(m, "row_adapters")]


@contextmanager
def mixed_batch(
    model: nn.Module, names: list[str], expandable: bool, layers: list[nn.Module] | None = None
) -> Iterator[None]:
    """Make every layer of ``model`` that can split its batch use ``names`` row by row inside the
    block; ``layers``: ``row_adapter_layers(model)`` if the caller kept it."""
    rows = RowAdapters(names, expandable)
    layers = row_adapter_layers(model) if layers is None else layers
    try:
        for layer in layers:
            layer.row_adapters = rows
        yield
    finally:
        for layer in layers:
            layer.row_adapters = None
