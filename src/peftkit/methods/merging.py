"""Shared pieces of folding an adapter into its base layer's weights."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from peftkit.errors import PeftkitError


def require_finite(update: torch.Tensor, adapter: str) -> torch.Tensor:
    """``update`` itself, or an error if it holds NaN / inf (which would silently ruin the model)."""
    if not torch.isfinite(update).all():
        raise ValueError(f"adapter {adapter!r} has NaN or inf weights; refusing to merge them into the model")
    return update


def add_to_weight(weight: torch.Tensor, delta: torch.Tensor, adapter: str) -> None:
    """``weight += delta`` in place (in the weight's dtype), after checking ``delta`` is finite."""
    require_finite(delta, adapter)
    with torch.no_grad():
        weight.add_(delta.to(weight.dtype))


def unwrap_atomically(
    modules: list[tuple[str, Any]],
    *,
    merge: bool,
    adapter_names: list[str] | None = None,
    all_adapters: Sequence[str] = (),
    safe_merge: bool = False,
) -> list[tuple[str, nn.Module]]:
    """``[(name, plain module)]`` for every adapter layer, merged all-or-nothing.

    Layers fold their adapter into their base weights in place (``unwrap(merge=True)``), so a
    NaN found in the 10th layer would otherwise leave the first nine merged. Here every base
    tensor a layer could change is copied first (to the CPU: a copy of the adapted weights),
    all layers merge, and on any error every copy is written back before the error -- now
    naming the layer -- is raised: the model is then exactly as before and still usable.
    ``safe_merge`` (PEFT's option) additionally checks each merged layer's weights are finite
    (e.g. no fp16 overflow), with the same rollback. ``adapter_names`` merges several adapters
    one after the other into the same base weights (their updates add up, as in PEFT).
    """
    if not merge:
        return [(name, module.unwrap(False)) for name, module in modules]
    names = [None] if adapter_names is None else list(adapter_names)
    saved = _snapshot(modules, list(all_adapters))
    active = [module.active_adapter for _, module in modules]
    results: list[tuple[str, nn.Module]] = []
    current = ""
    try:
        for current, module in modules:
            unwrapped = None
            for adapter in names:
                if adapter is not None:
                    module.active_adapter = adapter
                result = module.unwrap(True)
                if unwrapped is not None and result is not unwrapped:
                    raise PeftkitError(
                        f"{current} cannot merge several adapters into one layer (it builds a new layer "
                        "per merge); merge one adapter at a time"
                    )
                unwrapped = result
            if safe_merge:
                for pname, param in unwrapped.named_parameters():
                    if param.is_floating_point() and not torch.isfinite(param).all():
                        raise ValueError(f"merging gives NaN or inf in {pname} (e.g. an fp16 overflow)")
            results.append((current, unwrapped))
    except (ValueError, PeftkitError) as err:
        _restore(saved)
        for (_, module), adapter in zip(modules, active):
            module.active_adapter = adapter
        message = f"{err} [in layer {current}; nothing was merged, the model is unchanged]"
        raise (PeftkitError if isinstance(err, PeftkitError) else ValueError)(message) from err
    return results


def _snapshot(modules: list[tuple[str, Any]], adapters: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """CPU copies of every tensor of each layer that is not one of its adapters' own."""
    saved, seen = [], set()
    for _, module in modules:
        own = {key for adapter in adapters for key in module.adapter_params(adapter).values()}
        tensors = [*module.named_parameters(), *module.named_buffers()]
        for name, tensor in tensors:
            if name in own or id(tensor) in seen or tensor.device.type == "meta":
                continue
            seen.add(id(tensor))
            saved.append((tensor, tensor.detach().to("cpu", copy=True)))
    return saved


def _restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for tensor, copy in saved:
            tensor.copy_(copy.to(tensor.device))
