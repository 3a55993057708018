"""Shared pieces of folding an adapter into its base layer's weights.

Two ways to merge, both all-or-nothing (a snapshot of the base tensors is written back on any error):

    merge_and_unload():  layer ──unwrap(True)──> plain module put back; the wrapper is gone
    merge_adapter():     layer ──unwrap(True)──> base_layer holds W'; the wrapper stays, off
                         (active_adapter None: forward = base_layer(x) = W' x)
    unmerge_adapter():   snapshot ──copy_──> base_layer (bit-exact W), wrapper back on
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.modules_to_save import ModulesToSaveWrapper

# (tensor of the model, its CPU copy) for every base tensor a merge may change
Snapshot = list[tuple[torch.Tensor, torch.Tensor]]


def require_finite(update: torch.Tensor, adapter: str) -> torch.Tensor:
    """``update`` itself, or an error if it holds NaN / inf (which would silently ruin the model)."""
    if not torch.isfinite(update).all():
        raise ValueError(f"adapter {adapter!r} has NaN or inf weights; refusing to merge them into the model")
    return update


def add_to_weight(weight: torch.Tensor, delta: torch.Tensor, adapter: str) -> None:
    """``weight += delta`` in place, after checking ``delta`` is finite.

    The sum is taken in fp32 and rounded to the weight's dtype once: adding a delta already
    rounded to bf16 would round twice (up to 1 ulp more error in every merged bf16 weight)."""
    require_finite(delta, adapter)
    with torch.no_grad():
        weight.copy_((weight.float() + delta.float()).to(weight.dtype))


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
                check_finite(unwrapped)
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


def merged_in_place_layers(modules: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The layers ``merge_adapter`` folds into their base weights: all but ``modules_to_save`` copies.

    A ``ModulesToSaveWrapper``'s adapter is a whole trained copy of the module, not an update to
    the original, so there is nothing to fold in: while merged it keeps running the active
    adapter's copy (merging means "compute what the adapter computed").
    """
    return [(name, module) for name, module in modules if not isinstance(module, ModulesToSaveWrapper)]


def merge_in_place(
    modules: list[tuple[str, Any]],
    adapter_names: list[str],
    *,
    all_adapters: Sequence[str],
    safe_merge: bool = False,
) -> Snapshot:
    """Fold ``adapter_names`` (one after another) into every layer's base weights, keeping the layers.

    Each layer's ``unwrap(True)`` must merge in place, i.e. return the very module its
    ``unwrap(False)`` returns -- the module the layer runs when its ``active_adapter`` is None.
    Afterwards every layer is switched off (``active_adapter = None``), so its forward runs only
    the base layer, which now holds the merged weights. Returns CPU copies, from before, of the
    base tensors merging changed, which ``unmerge`` writes back for a bit-exact restore. On any
    error (NaN/inf, a layer that cannot merge in place) the snapshot is written back and every
    layer's ``active_adapter`` restored before the error -- naming the layer -- is raised.
    """
    layers = merged_in_place_layers(modules)
    saved = _snapshot(layers, list(all_adapters))
    active = [module.active_adapter for _, module in layers]
    current = ""
    try:
        for name, module in layers:
            current = name
            plain = module.unwrap(False)  # no side effects: the module the layer runs when off
            for adapter in adapter_names:
                module.active_adapter = adapter
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    result = module.unwrap(True)
                if result is not plain:  # e.g. a bitsandbytes layer builds a dense nn.Linear
                    raise PeftkitError(
                        f"merge_adapter cannot merge into this {type(module).__name__} in place: merging it "
                        f"builds a new {type(result).__name__} (a quantized base is dequantized). Use "
                        "merge_and_unload(), which puts the dequantized merged layer in (with a warning)"
                    )
                for warning in caught:  # raised only for merges that went ahead
                    warnings.warn_explicit(
                        warning.message, warning.category, warning.filename, warning.lineno
                    )
            if safe_merge:
                check_finite(plain)
            module.active_adapter = None
    except (ValueError, PeftkitError) as err:
        _restore(saved)
        for (_, module), adapter in zip(layers, active):
            module.active_adapter = adapter
        message = f"{err} [in layer {current}; nothing was merged, the model is unchanged]"
        raise (PeftkitError if isinstance(err, PeftkitError) else ValueError)(message) from err
    # Only what merging changed is written back at unmerge: a base tensor it left alone (a bias
    # trained with bias="all", say) keeps any value it is given while merged.
    return [(tensor, copy) for tensor, copy in saved if not torch.equal(tensor.detach().to("cpu"), copy)]


def unmerge(modules: list[tuple[str, Any]], saved: Snapshot, active_adapter: str | None) -> None:
    """Write ``saved`` (from :func:`merge_in_place`) back and switch the layers on again."""
    _restore(saved)
    for _, module in modules:
        module.active_adapter = active_adapter


def check_finite(module: nn.Module) -> None:
    """Every floating-point parameter of ``module`` is finite (``safe_merge``), else ValueError."""
    for pname, param in module.named_parameters():
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise ValueError(f"merging gives NaN or inf in {pname} (e.g. an fp16 overflow)")


def refuse_while_merged(merged_adapters: Sequence[str], action: str) -> None:
    """PeftkitError if adapters are merged: ``action`` would act on layers that are switched off."""
    if merged_adapters:
        raise PeftkitError(
            f"{action} is not possible while adapter(s) {', '.join(merged_adapters)} are merged into the "
            "weights: call unmerge_adapter() first"
        )
