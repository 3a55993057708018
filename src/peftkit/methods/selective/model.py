"""One model wrapper for the methods that train the model's own parameters (FULL, BITFIT, PARTIAL).

    SelectiveModel
      └─ model            the user's model, nothing injected; chosen parameters are trained in place
         _originals       frozen CPU copies of the chosen parameters' base values

Each method is a subclass filling in one hook, ``select_parameters(model, config)``: the names
of the parameters to train. ``adapter_state_keys`` maps those names to themselves, so
``PeftModel`` marks exactly them trainable and ``save_pretrained`` writes exactly them (under
``base_model.model.<name>``). Turning the adapter off (``set_adapter(None)``, as
``disable_adapter()`` does) swaps the originals in and keeps the trained values aside on CPU;
turning it on swaps them back, in place, so optimizers keep their parameters. A model holds one
such adapter: two would need two copies of the same weights.

Merging (``merge_adapter`` / ``unmerge_adapter``) changes no tensor: the trained values already
are the model's weights, so the merged model is the adapted model. They only record the state
(``merged_adapters``), so that the API is the same for every method; ``disable_adapter()``
still gives the base model (via the CPU copies), and ``safe_merge`` checks the trained values.

BitFit's ``add_missing_biases`` is the one case that adds parameters: a zero bias on bias-free
linear layers (``nn.Linear(bias=False)`` -> ``y = x W^T + b``, b starts at 0), removed again
by ``unload()`` and detached while the adapter is off.
"""

from __future__ import annotations

import re
import warnings
from typing import ClassVar

import torch
from torch import nn

from peftkit.errors import PeftkitError, TargetModulesError
from peftkit.methods.merging import refuse_while_merged
from peftkit.methods.modules_to_save import find_modules_to_save
from peftkit.methods.selective.config import (
    BitFitConfig,
    FullFinetuneConfig,
    PartialFinetuneConfig,
    SelectiveConfig,
)
from peftkit.methods.tuner_base import TunerBase, check_adapter_name


def _snapshot(tensor: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``tensor`` on CPU (a meta tensor stays meta: it has no values)."""
    if tensor.is_meta:
        return torch.empty_like(tensor, device="meta")
    return tensor.detach().to("cpu", copy=True)


def canonical_names(model: nn.Module) -> dict[str, str]:
    """``{every parameter name: the name it is saved under}``; tied weights map to their first name."""
    first: dict[int, str] = {}
    names = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names[name] = first.setdefault(id(param), name)
    return names


def _sample(names: list[str], limit: int = 6) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class SelectiveModel(TunerBase):
    """Wraps the user's model as ``.model`` and trains the parameters a subclass selects."""

    method_name: ClassVar[str] = "this method"  # for error messages only
    supports_packing: ClassVar[bool] = True  # weights / per-token activations only
    supports_fsdp: ClassVar[bool] = True  # tests/test_fsdp.py

    def __init__(self, model: nn.Module, config: SelectiveConfig, adapter_name: str = "default"):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, SelectiveConfig] = {}
        self.active_adapter: str | None = adapter_name
        self._trained: list[str] = []  # parameter names relative to .model
        self._originals: dict[str, torch.Tensor] = {}  # base values (plain attributes: not in state_dict)
        self._stash: dict[str, torch.Tensor] = {}  # trained values while the adapter is off
        self.merged_adapters: list[str] = []  # recorded by merge_adapter (no tensor changes)
        self.add_adapter(adapter_name, config)

    # -- hooks ---------------------------------------------------------------------------------

    @classmethod
    def select_parameters(cls, model: nn.Module, config: SelectiveConfig) -> list[str]:
        """Names (as ``model.named_parameters`` gives them) of the parameters to train."""
        raise NotImplementedError

    @classmethod
    def targetable_modules(cls, model: nn.Module) -> list[str]:
        """Modules that own parameters directly (what ``peftkit inspect`` lists)."""
        return [name for name, m in model.named_modules() if name and any(True for _ in m.parameters(False))]

    # -- shared --------------------------------------------------------------------------------

    def _params(self) -> dict[str, nn.Parameter]:
        return dict(self.model.named_parameters())

    def add_adapter(self, adapter_name: str, config: SelectiveConfig) -> None:
        refuse_while_merged(self.merged_adapters, "add_adapter")
        check_adapter_name(adapter_name)
        if self.peft_config:
            raise PeftkitError(
                f"{self.method_name} trains the model's own weights, so a model holds one such adapter "
                f"(it has {', '.join(self.peft_config)!s}); load {adapter_name!r} into a fresh base model instead"
            )
        selected = self.select_parameters(self.model, config)
        if config.modules_to_save:
            prefixes = tuple(f"{m}." for m in find_modules_to_save(self.model, config.modules_to_save))
            selected += [
                n for n, _ in self.model.named_parameters(remove_duplicate=False) if n.startswith(prefixes)
            ]
        canonical = canonical_names(self.model)
        trained = list(dict.fromkeys(canonical[name] for name in selected))
        if not trained:
            raise TargetModulesError(
                f"{self.method_name} selected no parameter of {type(self.model).__name__}"
            )
        params = self._params()
        self._trained = trained
        self._originals = {name: _snapshot(params[name]) for name in trained}
        self.peft_config[adapter_name] = config

    @torch.no_grad()
    def set_adapter(self, adapter_name: str | None) -> None:
        if adapter_name is not None and adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; adapters: {', '.join(self.peft_config)}")
        if self.merged_adapters:  # as PEFT: switching adapters unmerges first (a record only here)
            warnings.warn(
                f"adapter {self.merged_adapters[0]} is merged into the weights: unmerging it before "
                "setting the adapter",
                stacklevel=2,
            )
            self.unmerge_adapter()
        if adapter_name == self.active_adapter:
            return
        params = self._params()
        if adapter_name is None:  # off: keep the trained values aside, put the base values in
            self._stash = {name: _snapshot(params[name]) for name in self._trained}
            for name in self._trained:
                params[name].copy_(self._originals[name])
        else:
            for name in self._trained:
                params[name].copy_(self._stash.pop(name))
        self.active_adapter = adapter_name

    def adapter_state_keys(self, adapter_name: str) -> dict[str, str]:
        if adapter_name not in self.peft_config:
            return {}
        return {f"model.{name}": f"model.{name}" for name in self._trained}

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Record the active adapter as merged: its trained values already are the model's weights,
        so no tensor changes (``safe_merge`` checks they are finite). Only the active adapter can
        be merged -- the model holds one, and its values are in the weights only while active."""
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names must be a list of adapter names, got {adapter_names!r}")
        names = [self.active_adapter] if adapter_names is None else list(dict.fromkeys(adapter_names))
        if self.active_adapter is None or names != [self.active_adapter]:
            raise PeftkitError(
                f"{self.method_name} trains the model's own weights, so merge_adapter merges the active "
                f"adapter only (active: {self.active_adapter}, asked for: {names}); call set_adapter(name) first"
            )
        if self.merged_adapters:
            warnings.warn(f"adapter {self.active_adapter} is already merged; nothing to do", stacklevel=2)
            return
        params = self._params()
        bad = [name for name in self._trained if safe_merge and not params[name].isfinite().all()]
        if bad:
            raise ValueError(
                f"adapter {self.active_adapter!r} has NaN or inf in {_sample(bad)}; nothing was merged"
            )
        self.merged_adapters = names

    def unmerge_adapter(self) -> None:
        """Forget the merge record; no tensor changes (see :meth:`merge_adapter`)."""
        self.merged_adapters = []

    @torch.no_grad()
    def unload(self, merge: bool) -> nn.Module:
        """``merge`` keeps the active adapter's trained values; otherwise the base values come back."""
        self.merged_adapters = []
        if not merge and self.active_adapter is not None:
            params = self._params()
            for name in self._trained:
                params[name].copy_(self._originals[name])
        self.peft_config.clear()
        self._trained, self._originals, self._stash = [], {}, {}
        return self.model


class FullFinetuneModel(SelectiveModel):
    """Trains every parameter."""

    method_name: ClassVar[str] = "full fine-tuning"

    @classmethod
    def select_parameters(cls, model: nn.Module, config: FullFinetuneConfig) -> list[str]:
        return [name for name, _ in model.named_parameters()]


class BitFitModel(SelectiveModel):
    """Trains the bias terms (every parameter named ``bias``), optionally after adding zero biases.

    With ``add_missing_biases`` the chosen bias-free ``nn.Linear`` layers get a zero bias first
    (``y = x W^T + b``, b = 0: the output is unchanged). Turning the adapter off detaches these
    biases (the layers run bias-free, exactly as the base model); ``unload()`` removes them and
    ``merge_and_unload()`` keeps them.
    """

    method_name: ClassVar[str] = "BitFit"

    def __init__(self, model: nn.Module, config: BitFitConfig, adapter_name: str = "default"):
        self._added: dict[str, nn.Linear] = {}  # module name -> the layer given a bias
        self._detached: dict[str, nn.Parameter] = {}  # the added biases while the adapter is off
        super().__init__(model, config, adapter_name)

    @classmethod
    def select_parameters(cls, model: nn.Module, config: BitFitConfig) -> list[str]:
        biases = [name for name, _ in model.named_parameters() if name.rsplit(".", 1)[-1] == "bias"]
        if not biases:
            raise TargetModulesError(
                f"BitFit trains bias parameters, and {type(model).__name__} has none (Llama-style models use no "
                "biases). Set add_missing_biases: true to train zero-initialised biases added to its linear "
                "layers, or use method 'partial' (e.g. train_top_n_layers: 2), 'lora' or 'full' instead."
            )
        return biases

    @classmethod
    def targetable_modules(cls, model: nn.Module) -> list[str]:
        """Modules with a bias, and the bias-free ``nn.Linear`` layers add_missing_biases can give one."""
        return [
            name
            for name, m in model.named_modules()
            if isinstance(getattr(m, "bias", None), nn.Parameter) or isinstance(m, nn.Linear)
        ]

    def add_adapter(self, adapter_name: str, config: BitFitConfig) -> None:
        if config.add_missing_biases and not self.peft_config:  # a second adapter is refused below
            self._added = add_zero_biases(self.model, config.missing_bias_modules)
        try:
            super().add_adapter(adapter_name, config)
        except Exception:
            if not self.peft_config:  # refused: leave the user's model as it was
                for layer in self._added.values():
                    layer.register_parameter("bias", None)
                self._added = {}
            raise

    def _detach_added(self) -> None:
        for name, layer in self._added.items():
            if layer.bias is not None:
                self._detached[name] = layer.bias
                layer.register_parameter("bias", None)

    def _attach_added(self) -> None:
        for name, layer in self._added.items():
            if name in self._detached:
                layer.register_parameter("bias", self._detached.pop(name))  # the same Parameter object

    def set_adapter(self, adapter_name: str | None) -> None:
        if adapter_name in self.peft_config and self.active_adapter is None:
            self._attach_added()  # before the base class copies the trained values back in
        super().set_adapter(adapter_name)
        if adapter_name is None:
            self._detach_added()

    @torch.no_grad()
    def unload(self, merge: bool) -> nn.Module:
        """``merge`` keeps the added biases with their trained values; otherwise they are removed."""
        keep = merge and self.active_adapter is not None
        self._attach_added()
        model = super().unload(merge)
        if not keep:
            for layer in self._added.values():
                layer.register_parameter("bias", None)
        self._added, self._detached = {}, {}
        return model


def _matches(spec: list[str] | str, name: str) -> bool:
    """PEFT's target_modules rule: a list matches a name or name suffix, a string is a full-match regex."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith(f".{entry}") for entry in spec)


def add_zero_biases(model: nn.Module, modules: list[str] | str | None) -> dict[str, nn.Linear]:
    """Give bias-free ``nn.Linear`` layers a zero bias (``out_features``, the weight's dtype/device).

    ``modules`` None: every such layer inside the transformer blocks (each ``nn.ModuleList`` of
    identical modules, so an encoder-decoder's encoder and decoder blocks both count); the output
    layer, embeddings and heads outside the blocks keep no bias. Returns ``{name: layer}`` of the
    layers given one.
    """
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if modules is None:
        block_lists = [
            name
            for name, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and len(m) and len({type(child) for child in m}) == 1
        ]
        prefixes = tuple(f"{name}." for name in block_lists if name)
        chosen = [name for name in linears if prefixes and name.startswith(prefixes)]
        has_biases = any(name.rsplit(".", 1)[-1] == "bias" for name, _ in model.named_parameters())
        if not chosen and not has_biases:
            raise TargetModulesError(
                f"add_missing_biases found no nn.Linear inside transformer blocks of {type(model).__name__}; "
                f"name the layers in missing_bias_modules (its linear layers: {_sample(list(linears)) or 'none'})"
            )
    else:
        chosen = [name for name in linears if _matches(modules, name)]
        if not chosen:
            raise TargetModulesError(
                f"missing_bias_modules={modules!r} matches no nn.Linear of {type(model).__name__}; "
                f"its linear layers are named like: {_sample(list(linears)) or 'none'}"
            )
    added = {}
    for name in chosen:
        layer = linears[name]
        if layer.bias is None:
            weight = layer.weight
            layer.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
            added[name] = layer
    return added


def find_blocks(model: nn.Module, layers_pattern: str | None = None) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the ``nn.ModuleList`` of same-type modules holding the most parameters
    (or the one named ``layers_pattern``: its name equals it or ends with ``.`` + it)."""
    lists = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) and len({type(child) for child in m}) == 1
    ]
    if layers_pattern:
        named = [(n, m) for n, m in lists if n == layers_pattern or n.endswith(f".{layers_pattern}")]
        if not named:
            raise TargetModulesError(
                f"layers_pattern={layers_pattern!r} names no list of blocks in {type(model).__name__}; "
                f"its module lists: {_sample([n for n, _ in lists]) or 'none'}"
            )
        lists = named
    lists = [(n, m) for n, m in lists if any(True for _ in m.parameters())]
    if not lists:
        raise TargetModulesError(
            f"found no list of repeated blocks (nn.ModuleList) in {type(model).__name__}; use trainable_patterns"
        )
    return max(lists, key=lambda item: (sum(p.numel() for p in item[1].parameters()), len(item[1])))


class PartialFinetuneModel(SelectiveModel):
    """Trains the top N blocks, parameters matching regexes, and optionally embeddings/norms/head."""

    method_name: ClassVar[str] = "partial fine-tuning"

    @classmethod
    def select_parameters(cls, model: nn.Module, config: PartialFinetuneConfig) -> list[str]:
        all_names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
        selected: list[str] = []
        needs_blocks = config.train_top_n_layers is not None or {"embeddings", "norms"} & set(
            config.also_train
        )
        blocks_name, blocks = find_blocks(model, config.layers_pattern) if needs_blocks else ("", None)
        if config.train_top_n_layers is not None:
            n = config.train_top_n_layers
            if n > len(blocks):
                raise TargetModulesError(
                    f"train_top_n_layers={n} but {blocks_name} holds {len(blocks)} blocks; use at most {len(blocks)} "
                    "(or method 'full')"
                )
            prefixes = tuple(f"{blocks_name}.{i}." for i in range(len(blocks) - n, len(blocks)))
            selected += [name for name in all_names if name.startswith(prefixes)]
        for pattern in config.trainable_patterns or []:
            matched = [name for name in all_names if re.search(pattern, name)]
            if not matched:
                raise TargetModulesError(
                    f"trainable_patterns entry {pattern!r} matches no parameter of {type(model).__name__}; "
                    f"its parameters are named like: {_sample(all_names)}"
                )
            selected += matched
        inside_blocks = f"{blocks_name}."
        for name, module in model.named_modules():
            if blocks is not None and name.startswith(inside_blocks):
                continue
            own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
            if "embeddings" in config.also_train and isinstance(module, nn.Embedding):
                selected += own
            if "norms" in config.also_train and "norm" in type(module).__name__.lower():
                selected += own
        if "head" in config.also_train:
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            if head is None:
                raise TargetModulesError(
                    f"also_train includes 'head' but {type(model).__name__} has no output embeddings; "
                    "name its head in modules_to_save instead"
                )
            head_name = next(name for name, m in model.named_modules() if m is head)
            selected += [f"{head_name}.{p}" for p, _ in head.named_parameters()]
        return selected
