"""Which modules of a model an adapter goes into: PEFT's matching rules, in one place.

    target_modules = ["q_proj", "v_proj"]          list: name == entry, or name ends with "." + entry
    target_modules = r".*\\.layers\\.0\\..*_proj"    str:  re.fullmatch against the full module name
    target_modules = "all-linear"                  every nn.Linear / Conv1D except the output layer
    target_modules = None                          the method's default for the model architecture

    layers_to_transform=[0, 1], layers_pattern="layers"   (list targets only) keep model.layers.{0,1}.*
    exclude_modules                                       same rules as target_modules; never adapted
    modules_to_save                                       never adapted (they are trained in full)

Methods call :func:`resolve_target_modules` then :func:`inject_adapter`, passing their own
``is_supported`` test and ``create_or_update`` factory; nothing here knows about any method.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator

from torch import nn

from peftkit.configuration import closest
from peftkit.errors import TargetModulesError
from peftkit.methods.base import AdapterModule, TargetingConfig, TaskType

LINEAR_SHORTHAND = "all-linear"
# PEFT condenses target lists this long (e.g. "all-linear" on a real model) into name suffixes;
# doing the same keeps saved configs identical to PEFT's.
MIN_TARGETS_TO_CONDENSE = 20
# Classification heads that "all-linear" leaves alone for SEQ_CLS models (PEFT's list).
SEQ_CLS_HEAD_NAMES = ("score", "classifier")


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2 style linear with a transposed (in, out) weight).

    Looked up in ``sys.modules``: a model containing a ``Conv1D`` has necessarily imported it,
    so this never imports transformers itself.
    """
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _layer_match(name: str, layers_pattern: list[str] | str | None) -> re.Match[str] | None:
    if not layers_pattern:
        return re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
        if match is not None:
            return match
    return None


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The layer number in a module name, as PEFT parses it (the first numbered segment)."""
    match = _layer_match(name, layers_pattern)
    return int(match["idx"]) if match else None


def _layer_lists(model: nn.Module, layers_pattern: list[str] | str | None) -> dict[str, set[int]]:
    """The numbered layers that ``layer_index`` finds in ``model``: {module list name: indices}."""
    found: dict[str, set[int]] = {}
    for name, _ in iter_modules_outside_adapters(model):
        match = _layer_match(f"{name}.", layers_pattern)
        if match is not None:
            found.setdefault(name[: match.start("idx") - 1], set()).add(int(match["idx"]))
    return found


def _ranges(indices: Iterable[int]) -> str:
    """``{0, 1, 2, 5}`` -> ``"0-2, 5"``."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def check_layers_to_transform(model: nn.Module, config: TargetingConfig) -> None:
    """Refuse a ``layers_to_transform`` that selects no layer of ``model``; warn about indices it lacks.

    PEFT silently adapts nothing (or fewer layers) for such indices; the message gives the range.
    """
    layers = config.layers_to_transform
    if layers is None or layers == []:
        return
    wanted = [layers] if isinstance(layers, int) else list(layers)
    found = _layer_lists(model, config.layers_pattern)
    if not found:
        lists = ", ".join(_layer_lists(model, None)) or "none"
        raise TargetModulesError(
            f"layers_pattern={config.layers_pattern!r} names no numbered module list of "
            f"{type(model).__name__} (numbered module lists: {lists}): set layers_pattern to the last part "
            "of one of these names, or null"
        )
    have = set().union(*found.values())
    where = f"the model has layers {_ranges(have)} (under {', '.join(found)})"
    missing = [i for i in wanted if i not in have]
    if len(missing) == len(wanted):
        raise TargetModulesError(
            f"layers_to_transform {layers!r} selects no layer: {where}; use indices in that range"
        )
    if missing:
        what = f"index {missing[0]} names" if len(missing) == 1 else f"indices {missing} name"
        warnings.warn(f"layers_to_transform: {what} no layer (ignored); {where}", stacklevel=3)


def warn_unmatched_entries(
    model: nn.Module, config: TargetingConfig, is_supported: Callable[[nn.Module], bool], method: str
) -> None:
    """Warn about list entries of target_modules / exclude_modules that name no module (typos).

    PEFT ignores them silently. When no target entry matches, ``inject_adapter``'s error says it.
    """
    names = [name for name, _ in iter_modules_outside_adapters(model)]
    for key in ("target_modules", "exclude_modules"):
        entries = getattr(config, key)
        if not isinstance(entries, list):
            continue
        unmatched = [e for e in entries if not any(_names_match([e], n) for n in names)]
        if not unmatched or (key == "target_modules" and len(unmatched) == len(entries)):
            continue
        targetable = targetable_modules(model, is_supported)
        described = []
        for entry in unmatched:
            depth = entry.count(".") + 1  # compare with names of as many parts: "self_attn.q_proj"
            candidates = dict.fromkeys(".".join(n.split(".")[-depth:]) for n in targetable)
            near = closest(entry, candidates, n=1)
            described.append(f"{entry!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        what = "entry" if len(unmatched) == 1 else "entries"
        warnings.warn(
            f"{key} {what} {', '.join(described)} matched no module of {type(model).__name__} and "
            f"{'is' if len(unmatched) == 1 else 'are'} ignored. "
            + _what_to_write(model, is_supported, method),
            stacklevel=3,
        )


def _names_match(spec: list[str] | str, name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith(f".{entry}") for entry in spec)


def is_target(config: TargetingConfig, name: str) -> bool:
    """Whether the module called ``name`` is adapted under ``config`` (PEFT's exact semantics)."""
    if config.exclude_modules and _names_match(config.exclude_modules, name):
        return False
    if config.modules_to_save and any(
        re.match(rf"(^|.*\.){m}($|\..*)", name) for m in config.modules_to_save
    ):
        return False
    targets = config.target_modules
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True  # a full name is taken as given, without the layer filter (as PEFT does)
    if not any(name.endswith(f".{entry}") for entry in targets):
        return False
    layers = config.layers_to_transform
    if layers is None or layers == []:
        return True
    index = layer_index(name, config.layers_pattern)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def iter_modules_outside_adapters(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules()`` minus the insides of adapter layers (their lora_A etc. are not targets)."""
    inside: str | None = None
    for name, module in model.named_modules():
        if not name:
            continue
        if inside is not None and name.startswith(inside):
            continue  # named_modules is pre-order, so a module's descendants follow it directly
        inside = None
        if isinstance(module, AdapterModule):
            inside = f"{name}."
        yield name, module


def targetable_modules(model: nn.Module, is_supported: Callable[[nn.Module], bool]) -> list[str]:
    """Full names of the modules that a method with this ``is_supported`` test could adapt."""
    return [name for name, module in iter_modules_outside_adapters(model) if is_supported(module)]


def module_suffixes(names: Iterable[str]) -> list[str]:
    """Last name components, deduplicated in order: what users write in ``target_modules``."""
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in names))


def _output_layer_names(model: nn.Module, task_type: TaskType | None) -> set[str]:
    """The output layer(s) that "all-linear" skips: the LM head, or a classifier for SEQ_CLS."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if output is None and task_type == TaskType.SEQ_CLS:
        output = next(
            (getattr(model, n) for n in SEQ_CLS_HEAD_NAMES if getattr(model, n, None) is not None), None
        )
    if output is None:
        return set()
    return {name for name, module in model.named_modules() if module is output}


def _all_linear(model: nn.Module, config: TargetingConfig) -> list[str]:
    skip = _output_layer_names(model, config.task_type)
    names = []
    for name, module in iter_modules_outside_adapters(model):
        wraps_linear = isinstance(module, AdapterModule) and any(is_linear_like(c) for c in module.children())
        if (is_linear_like(module) or wraps_linear) and name not in skip:
            names.append(name)
    # Apply the layer filter now: full names bypass it in matching (PEFT's rule), so a resolved
    # "all-linear" must already be restricted to the chosen layers.
    layers = config.layers_to_transform
    if layers not in (None, []):
        wanted = {layers} if isinstance(layers, int) else set(layers)
        names = [n for n in names if layer_index(n, config.layers_pattern) in wanted]
    return names


def _condense(targets: list[str], model: nn.Module) -> list[str]:
    """Shortest name suffixes that match exactly ``targets`` and no other module (PEFT's optimisation)."""
    target_set = set(targets)
    all_names = {name for name, _ in model.named_modules() if name}
    if not target_set <= all_names:
        return targets  # a user's list of suffixes: nothing to condense (and no full name to start from)
    others = [name for name in all_names if name not in target_set]

    def suffixes(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]  # shortest first

    taken = {suffix for other in others for suffix in suffixes(other)}
    chosen = {next(s for s in suffixes(t) if s not in taken) for t in targets}
    return sorted(chosen) if len(chosen) < len(targets) else targets


def resolve_target_modules(
    config: TargetingConfig,
    model: nn.Module,
    *,
    defaults: dict[str, list[str]],
    is_supported: Callable[[nn.Module], bool],
    method: str,
) -> TargetingConfig:
    """A copy of ``config`` whose ``target_modules`` is concrete (no null, no "all-linear").

    Refuses layer indices the model lacks and warns about list entries that name no module.
    """
    check_layers_to_transform(model, config)
    warn_unmatched_entries(model, config, is_supported, method)
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in defaults:
            raise TargetModulesError(
                f"target_modules is not set and peftkit has no default {method} targets for "
                f"model_type {model_type!r} (defaults exist for: {', '.join(sorted(defaults))}); set it. "
                + _what_to_write(model, is_supported, method)
            )
        targets = list(defaults[model_type])
    elif isinstance(targets, str) and targets.lower() == LINEAR_SHORTHAND:
        targets = _all_linear(model, config)
        if not targets:
            raise TargetModulesError(no_match_message(model, config, is_supported, method))
    if isinstance(targets, list) and len(targets) >= MIN_TARGETS_TO_CONDENSE:
        targets = _condense(targets, model)
    return dataclasses.replace(config, target_modules=targets)


def _what_to_write(model: nn.Module, is_supported: Callable[[nn.Module], bool], method: str) -> str:
    suffixes = module_suffixes(targetable_modules(model, is_supported))
    return (
        f"Modules {method} can adapt here: {', '.join(suffixes) or '(none)'}. Use a list of these names "
        "(matched as name suffixes), a regex matched against full module names, or 'all-linear'."
    )


def no_match_message(
    model: nn.Module, config: TargetingConfig, is_supported: Callable[[nn.Module], bool], method: str
) -> str:
    """Why nothing matched, and the names that would (deduplicated by suffix)."""
    filters = []
    for name in ("layers_to_transform", "layers_pattern", "exclude_modules", "modules_to_save"):
        if getattr(config, name) not in (None, []):
            filters.append(f"{name}={getattr(config, name)!r}")
    with_filters = f" (with {', '.join(filters)})" if filters else ""
    return (
        f"target_modules={config.target_modules!r}{with_filters} matched no module of {type(model).__name__}. "
        + _what_to_write(model, is_supported, method)
    )


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def inject_adapter(
    model: nn.Module,
    config: TargetingConfig,
    *,
    create_or_update: Callable[[nn.Module, str], nn.Module],
    is_supported: Callable[[nn.Module], bool],
    method: str,
) -> list[str]:
    """Swap ``create_or_update(module, name)`` in for every target; return the targets' names.

    ``create_or_update`` returns a new adapter layer, or the same module after adding an
    adapter to it (a second adapter on an already adapted layer).
    """
    names = [name for name, _ in iter_modules_outside_adapters(model) if is_target(config, name)]
    if not names:
        raise TargetModulesError(no_match_message(model, config, is_supported, method))
    unsupported = [n for n in names if not is_supported(model.get_submodule(n))]
    if unsupported:
        kinds = sorted({type(model.get_submodule(n)).__name__ for n in unsupported})
        shown = ", ".join(unsupported[:5]) + (
            f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else ""
        )
        raise TargetModulesError(
            f"target_modules={config.target_modules!r} matched modules {method} cannot adapt "
            f"({', '.join(kinds)}): {shown}. " + _what_to_write(model, is_supported, method)
        )
    for name in names:
        target = model.get_submodule(name)
        new = create_or_update(target, name)
        if new is not target:
            replace_module(model, name, new)
    return names
