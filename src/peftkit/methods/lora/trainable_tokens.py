"""Training only some rows of an embedding: LoRA's ``trainable_token_indices`` (PEFT's TrainableTokens).

    embed_tokens  ->  TrainableTokensWrapper
                        token_adapter: TrainableTokensLayer
                          base_layer                        frozen embedding (vocab, dim)
                          trainable_tokens_delta.default    (len(indices), dim), trained

    forward:  W' = W with rows ``indices`` replaced by ``trainable_tokens_delta``;  y = embedding(ids, W')

The trained tensor holds the new *values* of the rows, not a difference (PEFT's choice): rows of
a resized embedding start random, and replacing them gives the same model whatever random
values a later resize draws. When the model ties ``lm_head`` to the input embedding, the head
is wrapped too and shares the same tensor (``y = x @ W'^T``), so a new token can also be
predicted; the tied copy is not saved, as in PEFT.

State-dict and file keys are PEFT's:
``model.embed_tokens.token_adapter.trainable_tokens_delta.default`` in the model,
``...embed_tokens.token_adapter.trainable_tokens_delta`` in ``adapter_model.safetensors``.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn import functional as F

from peftkit.errors import TargetModulesError
from peftkit.methods.layers import adapter_dtype
from peftkit.methods.modules_to_save import ModulesToSaveWrapper, forward_by_row_adapter
from peftkit.methods.targeting import replace_module


class TrainableTokensLayer(nn.Module):
    """The frozen layer and, per adapter, the trained rows and their indices (shared when tied)."""

    def __init__(self, base_layer: nn.Module, tied_to: TrainableTokensLayer | None = None):
        super().__init__()
        self.base_layer = base_layer
        if tied_to is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.token_indices: dict[str, list[int]] = {}
        else:  # the same ParameterDict: both layers' state dicts show it, as in PEFT
            self.trainable_tokens_delta = tied_to.trainable_tokens_delta
            self.token_indices = tied_to.token_indices
        self.tied = tied_to is not None

    def update_layer(self, adapter_name: str, token_indices: list[int]) -> None:
        """Start the trained rows at the base rows' current values (PEFT's default init)."""
        if self.tied:
            return  # follows the layer it is tied to
        weight = self.base_layer.weight  # (vocab, dim) for embeddings and lm_head alike
        rows = weight.shape[0]
        outside = [i for i in token_indices if not 0 <= i < rows]
        if outside:
            raise ValueError(
                f"trainable_token_indices {outside} are outside the embedding's {rows} rows; add the new "
                "tokens to the tokenizer and call model.resize_token_embeddings(len(tokenizer)) before "
                "wrapping the model"
            )
        self.token_indices[adapter_name] = list(token_indices)
        index = torch.tensor(token_indices, device=weight.device)
        values = weight.detach()[index].to(adapter_dtype(weight.dtype)).clone()  # (n, dim)
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(values)

    def merged_weight(self, adapter_name: str | None) -> torch.Tensor:
        """The base weight with the adapter's rows replaced (the base itself without an adapter)."""
        weight = self.base_layer.weight
        if adapter_name is None or adapter_name not in self.trainable_tokens_delta:
            return weight
        index = torch.tensor(self.token_indices[adapter_name], device=weight.device)
        return weight.index_copy(0, index, self.trainable_tokens_delta[adapter_name].to(weight.dtype))

    def forward(self, x: torch.Tensor, adapter_name: str | None) -> torch.Tensor:
        base = self.base_layer
        if adapter_name is None or adapter_name not in self.trainable_tokens_delta:
            return base(x)
        weight = self.merged_weight(adapter_name)
        if isinstance(base, nn.Embedding):
            out = F.embedding(
                x,
                weight,
                base.padding_idx,
                base.max_norm,
                base.norm_type,
                base.scale_grad_by_freq,
                base.sparse,
            )
            embed_scale = getattr(base, "embed_scale", None)  # Gemma-style scaled embeddings
            if embed_scale is not None:
                out = out * torch.as_tensor(embed_scale, dtype=out.dtype, device=out.device)
            return out
        return F.linear(x, weight)  # a tied lm_head (no bias, as in PEFT)


class TrainableTokensWrapper(nn.Module):
    """Wraps an embedding (or tied head) so that only the listed rows train (an ``AdapterModule``)."""

    def __init__(self, module: nn.Module, tied_to: TrainableTokensWrapper | None = None):
        super().__init__()
        self.token_adapter = TrainableTokensLayer(module, tied_to.token_adapter if tied_to else None)
        self.active_adapter: str | None = None
        self.row_adapters = None  # a ``RowAdapters`` inside a mixed-adapter call only

    @property
    def weight(self) -> torch.Tensor:
        """The weight the forward pass uses (code that reads ``embed_tokens.weight`` sees the new rows)."""
        return self.token_adapter.merged_weight(self.active_adapter)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_adapters is not None:
            names = self.row_adapters.for_batch(len(x))
            return forward_by_row_adapter(x, names, lambda adapter, rows: self.token_adapter(rows, adapter))
        return self.token_adapter(x, self.active_adapter)

    def adapter_params(self, adapter_name: str) -> dict[str, str]:
        if self.token_adapter.tied or adapter_name not in self.token_adapter.trainable_tokens_delta:
            return {}
        key = "token_adapter.trainable_tokens_delta"
        return {key: f"{key}.{adapter_name}"}

    def unwrap(self, merge: bool) -> nn.Module:
        base = self.token_adapter.base_layer
        if merge and self.active_adapter is not None and not self.token_adapter.tied:
            with torch.no_grad():
                base.weight.copy_(self.token_adapter.merged_weight(self.active_adapter))
        return base


def _find(model: nn.Module, suffix: str) -> list[str]:
    """Modules whose name ends with ``suffix`` (PEFT's rule), outside wrappers we made."""
    return [
        name
        for name, _ in model.named_modules()
        if name.endswith(suffix) and not re.search(r"(^|\.)(token_adapter|base_layer)(\.|$)", name)
    ]


def _name_of(model: nn.Module, module: nn.Module | None) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None) if module else None


def _ties_embeddings(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text_config, "tie_word_embeddings", False) or not hasattr(model, "get_output_embeddings"):
        return False
    head, embed = _plain(model.get_output_embeddings()), _plain(model.get_input_embeddings())
    return head is not None and getattr(head, "weight", None) is getattr(embed, "weight", None)


def _plain(module: nn.Module | None) -> nn.Module | None:
    """The layer itself, or the one a wrapper of ours holds (whose ``weight`` is a computed tensor)."""
    return module.token_adapter.base_layer if isinstance(module, TrainableTokensWrapper) else module


def wrap_trainable_tokens(
    model: nn.Module,
    indices: list[int] | dict[str, list[int]],
    adapter_name: str,
    *,
    lora_targets: set[str],
) -> None:
    """Wrap the layers ``indices`` names (a list: the input embedding) and, if tied, the output head.

    As in PEFT, a tied head listed with the embedding's indices (or not listed) shares the
    embedding's trained rows; listed with other indices it gets its own rows and the tie is dropped.
    """
    embed_name = (
        _name_of(model, model.get_input_embeddings()) if hasattr(model, "get_input_embeddings") else None
    )
    targets = indices if isinstance(indices, dict) else {embed_name or "embed_tokens": indices}
    resolved: dict[str, list[int]] = {}  # module name -> indices
    for key, token_indices in targets.items():
        found = _find(model, key)
        if not found:
            raise TargetModulesError(
                f"trainable_token_indices names {key!r}, which matches no module of the model"
            )
        resolved.update({name: list(token_indices) for name in found})
    head_name = _name_of(model, model.get_output_embeddings()) if _ties_embeddings(model) else None
    tie_head = (
        head_name is not None
        and embed_name in resolved
        and resolved.get(head_name, resolved[embed_name]) == resolved[embed_name]
    )
    if tie_head:
        resolved.pop(head_name, None)
    for name, token_indices in resolved.items():
        if name in lora_targets:
            raise ValueError(
                f"{name!r} is both a LoRA target and in trainable_token_indices; peftkit does not combine "
                "the two on one layer: remove it from target_modules"
            )
        module = model.get_submodule(name)
        if isinstance(module, ModulesToSaveWrapper):
            raise ValueError(
                f"{name!r} is in both modules_to_save (trains the whole layer) and trainable_token_indices "
                "(trains some rows): keep it in one of them"
            )
        if not isinstance(module, TrainableTokensWrapper):
            module = TrainableTokensWrapper(module)
            replace_module(model, name, module)
        module.token_adapter.update_layer(adapter_name, token_indices)
    if tie_head:
        embed, head = model.get_input_embeddings(), model.get_submodule(head_name)
        if isinstance(embed, TrainableTokensWrapper) and not isinstance(head, TrainableTokensWrapper):
            replace_module(model, head_name, TrainableTokensWrapper(head, tied_to=embed))
