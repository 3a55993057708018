"""Combine LoRA adapters into a new one (PEFT's ``LoraModel.add_weighted_adapter``).

Per adapted layer, with adapters i = 1..n, weights w_i and scalings s_i:

    cat      A = [w_1 s_1 A_1; ...; w_n s_n A_n]   B = [B_1 | ... | B_n]     rank = sum r_i, exact
    linear   A = merge(sign_i sqrt|w_i s_i| A_i)   B = merge(sqrt|w_i s_i| B_i)   same rank needed
             (also ties / dare_linear / dare_ties / magnitude_prune as the merge, see merge_utils)
    *svd     dW = merge(w_i B_i A_i s_i)  ─► SVD ─► B = U[:, :k] diag(S[:k]),  A = Vh[:k]   rank k

The new adapter's config is the first adapter's with ``r = lora_alpha = rank`` (so scaling 1,
or sqrt(rank) with rsLoRA, as PEFT) and the union of the adapters' targets. It is added, not
made active. Layers of the new adapter that no source adapter touches stay zero.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch

from peftkit.errors import PeftkitError
from peftkit.methods.lora.base import LoraLayerBase
from peftkit.methods.lora.config import is_weight_moving_init
from peftkit.methods.lora.embedding import LoraEmbedding
from peftkit.methods.merge_utils import MERGES, SignMethod, merge
from peftkit.methods.modules_to_save import ModulesToSaveWrapper

if TYPE_CHECKING:
    from torch import nn

    from peftkit.methods.lora.model import LoraModel

COMBINATION_TYPES = (
    "svd",
    "linear",
    "cat",
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_linear",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
SAME_RANK_TYPES = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")


class WeightedAdapterError(PeftkitError, ValueError):
    """The adapters cannot be combined as asked; the message says what to change."""


def _factors(layer: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, B) parameters of ``adapter`` in a LoRA layer, or None if the layer lacks it."""
    if isinstance(layer, LoraEmbedding):
        if adapter in layer.lora_embedding_A:
            return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]  # (r, num), (dim, r)
        return None
    if adapter in layer.lora_A:
        return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight  # (r, in[, k..]), (out, r[, 1..])
    return None


def check_weighted_adapter(
    model: LoraModel,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str,
    svd_rank: int | None,
    density: float | None,
    majority_sign_method: str,
) -> tuple[str, int, list[str] | str]:
    """PEFT's ``_check_add_weighted_adapter`` plus checks PEFT leaves to a crash later on.

    Returns the combination type actually used (``linear`` for a single adapter, as PEFT), the
    new rank and the new ``target_modules``.
    """
    configs = model.peft_config
    if adapter_name in configs:
        raise WeightedAdapterError(
            f"an adapter named {adapter_name!r} already exists; pick another adapter_name"
        )
    if not adapters:
        raise WeightedAdapterError("give at least one adapter to combine")
    missing = [a for a in adapters if a not in configs]
    if missing:
        raise WeightedAdapterError(f"no adapter(s) named {missing}; adapters: {', '.join(configs)}")
    if len(weights) != len(adapters):
        raise WeightedAdapterError(
            f"got {len(weights)} weight(s) for {len(adapters)} adapter(s); give one weight per adapter"
        )
    if combination_type not in COMBINATION_TYPES:
        raise WeightedAdapterError(
            f"unknown combination_type {combination_type!r}; use one of {', '.join(COMBINATION_TYPES)}"
        )
    dora = [a for a in adapters if configs[a].use_dora]
    if dora:
        raise WeightedAdapterError(
            f"adapter(s) {dora} use DoRA, whose magnitude vectors cannot be combined; combine plain LoRA adapters"
        )
    shared = sum(
        1
        for m in model.modules()
        if isinstance(m, ModulesToSaveWrapper) and sum(a in m.modules_to_save for a in adapters) > 1
    )
    if shared:
        raise WeightedAdapterError(
            "Cannot add weighted adapters if they target the same module with modules_to_save, but found "
            f"{shared} such instance(s); retrain all but one of them without modules_to_save"
        )

    combination_type = "linear" if len(adapters) == 1 else combination_type
    # the largest rank any layer has, so the new tensors fit every layer (as PEFT)
    ranks = [max([configs[a].r, *configs[a].rank_pattern.values()]) for a in adapters]
    if combination_type in SAME_RANK_TYPES:
        if len(set(ranks)) != 1:
            raise WeightedAdapterError(
                f"All adapters must have the same r value when using combination_type {combination_type} "
                f"(got r={ranks}); use 'cat' or an '*_svd' type, which accept different ranks"
            )
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        if svd_rank is not None and svd_rank < 0:
            raise WeightedAdapterError(f"svd_rank must be a positive number, got {svd_rank}")
        new_rank = svd_rank or max(ranks)
        _check_svd_rank(model, adapters, new_rank, svd_rank is not None)

    kind = combination_type.removesuffix("_svd")
    if MERGES.get(kind, (None, False))[1]:
        if density is None or not 0 <= density <= 1:
            raise WeightedAdapterError(
                f"combination_type {combination_type} needs density in [0, 1] (the fraction of values kept), "
                f"got {density}"
            )
    if majority_sign_method not in ("total", "frequency"):
        raise WeightedAdapterError(
            f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}"
        )

    targets = [configs[a].target_modules for a in adapters]
    if len({isinstance(t, str) for t in targets}) > 1:
        raise WeightedAdapterError(
            "all adapter configs should follow the same target modules type. Combining adapters with "
            "`target_modules` type being a mix of list/set and string is not supported; save them with "
            "the same kind (all lists or all regexes)"
        )
    if isinstance(targets[0], str):
        new_targets: list[str] | str = "|".join(f"({t})" for t in targets)
    else:
        new_targets = list(dict.fromkeys(name for t in targets for name in t))  # ordered union
    return combination_type, new_rank, new_targets


def _check_svd_rank(model: LoraModel, adapters: list[str], rank: int, asked: bool) -> None:
    """An SVD of a layer's (out, in) update has at most min(out, in) components: refuse more
    (PEFT builds mismatched A and B factors or fails with a reshape error)."""
    smallest = None
    for name, layer in model.model.named_modules():
        if not isinstance(layer, LoraLayerBase):
            continue
        for adapter in adapters:
            if (factors := _factors(layer, adapter)) is not None:
                lora_a, lora_b = factors
                dims = (lora_b.shape[0], lora_a.flatten(1).shape[1])
                if smallest is None or min(dims) < min(smallest[1]):
                    smallest = (name, dims)
                break
    if smallest is not None and rank > min(smallest[1]):
        name, (out, inp) = smallest
        what = f"svd_rank={rank}" if asked else f"the default svd_rank (the largest adapter rank, {rank})"
        raise WeightedAdapterError(
            f"{what} is more than the SVD of layer {name}'s {out} x {inp} update has; "
            f"use svd_rank <= {min(out, inp)}"
        )


def add_weighted_adapter(
    model: LoraModel,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: SignMethod = "total",
) -> None:
    """Add ``adapter_name``, the weighted combination of ``adapters`` (see the module docstring)."""
    combination_type, new_rank, new_targets = check_weighted_adapter(
        model, adapters, weights, adapter_name, combination_type, svd_rank, density, majority_sign_method
    )
    config = dataclasses.replace(
        model.peft_config[adapters[0]],
        r=new_rank,
        lora_alpha=new_rank,
        target_modules=new_targets,
        alpha_pattern={},
        rank_pattern={},
    )
    init = config.init_lora_weights
    # PiSSA / OLoRA init would move base weight into the (about to be overwritten) adapter.
    model.add_adapter(
        adapter_name,
        dataclasses.replace(config, init_lora_weights=True) if is_weight_moving_init(init) else config,
    )
    model.peft_config[adapter_name] = dataclasses.replace(
        model.peft_config[adapter_name], init_lora_weights=init
    )

    for name, layer in model.model.named_modules():
        new = _factors(layer, adapter_name) if isinstance(layer, LoraLayerBase) else None
        if new is None:
            continue
        sources = [(a, w, f) for a, w in zip(adapters, weights) if (f := _factors(layer, a)) is not None]
        if not sources:
            raise WeightedAdapterError(f"no adapter to combine in layer {name}")
        new_a, new_b = new
        with torch.no_grad():
            if combination_type == "cat":
                a, b = _cat(layer, sources)
                new_a.zero_()
                new_b.zero_()
                new_a[: a.shape[0]] = a
                new_b[:, : b.shape[1]] = b
            elif combination_type.endswith("svd"):
                a, b = _svd(
                    layer,
                    sources,
                    combination_type,
                    new_rank,
                    density,
                    majority_sign_method,
                    svd_clamp,
                    svd_full_matrices,
                    svd_driver,
                )
                new_a.copy_(a.reshape(new_a.shape))
                new_b.copy_(b.reshape(new_b.shape))
            else:
                a, b = _factorwise(layer, sources, combination_type, density, majority_sign_method)
                new_a.copy_(a)
                new_b.copy_(b)


Source = tuple[str, float, tuple[torch.Tensor, torch.Tensor]]


def _cat(layer: nn.Module, sources: list[Source]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked factors: exact, the weights and scalings folded into A."""
    loras_a = [f[0] * w * layer.scaling[a] for a, w, f in sources]
    return torch.cat(loras_a, dim=0), torch.cat([f[1] for _, _, f in sources], dim=1)


def _factorwise(
    layer: nn.Module, sources: list[Source], kind: str, density: float | None, sign_method: SignMethod
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the A's and the B's separately, each with sqrt|w s| (the sign only on A's side)."""
    weights_a, weights_b = [], []
    for adapter, weight, _ in sources:
        scaled = weight * layer.scaling[adapter]
        root = math.sqrt(abs(scaled))
        weights_a.append(root if scaled >= 0 else -root)
        weights_b.append(root)
    dtype = sources[0][2][0].dtype
    merged = []
    for side, side_weights in ((0, weights_a), (1, weights_b)):  # A first, then B: PEFT's RNG order
        tensors = [f[side] for _, _, f in sources]
        merged.append(merge(kind, tensors, torch.tensor(side_weights), density, sign_method).to(dtype))
    return merged[0], merged[1]


def _svd(
    layer: nn.Module,
    sources: list[Source],
    kind: str,
    rank: int,
    density: float | None,
    sign_method: SignMethod,
    clamp: float | None,
    full_matrices: bool,
    driver: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the full updates ``s B A`` (out, in[*k]), then truncate their SVD to ``rank``."""
    deltas = [(f[1].float().flatten(1) @ f[0].float().flatten(1)) * layer.scaling[a] for a, _, f in sources]
    # Merge embeddings' updates as (num, dim), the base weight's layout: DARE's random masks are
    # drawn in that layout in PEFT, so the same seed gives the same masks.
    embedding = isinstance(layer, LoraEmbedding)
    deltas = [d.T for d in deltas] if embedding else deltas
    weights = torch.tensor([w for _, w, _ in sources])
    delta = merge(kind.removesuffix("_svd"), deltas, weights, density, sign_method)
    delta = delta.T if embedding else delta  # (out, in)
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)  # driver: CUDA only
    u = u[:, :rank] @ torch.diag(s[:rank])  # (out, rank)
    vh = vh[:rank, :]  # (rank, in)
    if clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    return vh, u
