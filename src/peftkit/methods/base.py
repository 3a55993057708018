"""What every PEFT method shares: task types, the config base classes, and the two interfaces
that shared code talks to.

Shared code (``PeftModel``, serialization, targeting) never asks *which* method it handles. It
only uses:

* :class:`AdapterModule` -- a layer that carries adapter weights (a LoRA linear, the
  ``modules_to_save`` wrapper, later an IA3 or LoHa layer). Structural, like torchtune's
  ``AdapterModule`` protocol: no base class to inherit.
* :class:`TunerModel` -- the object that wraps the user's model as ``.model`` and knows how to
  inject, activate and remove one method's layers. ``PeftModel.base_model`` is one.

Configs are plain dataclasses read and written in PEFT's ``adapter_config.json`` format. PEFT
files carry many keys for features peftkit does not implement; a config class lists them with
PEFT's default values in ``PEFT_DEFAULTS_NOT_IMPLEMENTED`` so that reading accepts them while
they are at their defaults and refuses (naming the key) when they ask for the missing feature.
This module does not import torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from peftkit.configuration import ConfigError
from peftkit.configuration import from_dict as build_config
from peftkit.configuration import to_dict as plain_data
from peftkit.errors import ModelLoadError
from peftkit.io import write_json
from peftkit.serialization import CONFIG_NAME

if TYPE_CHECKING:
    from torch import nn


class TaskType(str, Enum):
    """The model head an adapter was trained for (PEFT's ``task_type`` values)."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    SEQ_CLS = "SEQ_CLS"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


def _is_off(value: Any) -> bool:
    """True for the values PEFT uses to mean "feature not used": null, false, {} and []."""
    return value is None or value is False or value == {} or value == []


@dataclasses.dataclass(kw_only=True)
class PeftConfig:
    """Fields every method's config has; ``from_pretrained`` finds the right subclass by ``peft_type``."""

    peft_type: str | None = field(
        default=None,
        metadata={"help": "Which PEFT method this config belongs to (e.g. LORA); each config class sets it."},
    )
    task_type: TaskType | None = field(
        default=None,
        metadata={
            "help": f"The model head the adapter is for: one of {', '.join(t.value for t in TaskType)}."
        },
    )
    base_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or path of the base model; filled in from the model when the adapter is created."
        },
    )
    revision: str | None = field(
        default=None, metadata={"help": "Revision (branch, tag, commit) of the base model."}
    )
    inference_mode: bool = field(
        default=False,
        metadata={
            "help": "Freeze the adapter weights (true in saved files; loading for training sets it false)."
        },
    )

    # PEFT keys for features peftkit lacks -> PEFT's default value (accepted only at that value).
    PEFT_DEFAULTS_NOT_IMPLEMENTED: ClassVar[dict[str, Any]] = {}
    # PEFT keys that only matter when another key switches their feature on: key -> switch key.
    PEFT_KEYS_SWITCHED_BY: ClassVar[dict[str, str]] = {}
    # PEFT bookkeeping keys that never change behaviour; read and dropped.
    PEFT_INFORMATIONAL_KEYS: ClassVar[tuple[str, ...]] = ("peft_version", "auto_mapping", "runtime_config")
    # Fields holding module names or indices: a tuple or set given in Python is stored as a list
    # (sets sorted), so configs compare, serialize and print the same whatever the caller passed.
    NAME_LIST_FIELDS: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        for name in self.NAME_LIST_FIELDS:
            value = getattr(self, name)
            if isinstance(value, (tuple, set, frozenset)):
                setattr(self, name, sorted(value) if isinstance(value, (set, frozenset)) else list(value))
        if isinstance(self.peft_type, str):
            self.peft_type = self.peft_type.upper()
        if isinstance(self.task_type, str) and not isinstance(self.task_type, TaskType):
            try:
                self.task_type = TaskType(self.task_type)
            except ValueError:
                pass  # reported by validate()
        problems = self.validate()
        if problems:  # one line: configuration.from_dict nests this message in its own list
            raise ValueError("; ".join(problems))

    def validate(self) -> list[str]:
        """Cross-field checks; each problem says what to change. Subclasses extend the list."""
        problems = []
        declared = self._declared_peft_type()
        if declared is not None and self.peft_type != declared:
            problems.append(
                f"peft_type must be {declared!r} for {type(self).__name__}, got {self.peft_type!r}; "
                "use the config class of the method you want"
            )
        if self.task_type is not None and not isinstance(self.task_type, TaskType):
            valid = ", ".join(t.value for t in TaskType)
            problems.append(f"task_type must be one of {valid} (or null), got {self.task_type!r}")
        for f in dataclasses.fields(self):  # configs built in Python skip from_dict's type checks
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{f.name} must be a finite number, got {value}")
        return problems

    def with_modules_to_save(self, names: list[str]) -> PeftConfig:
        """This config with the modules ``names`` also trained in full and saved with the adapter.

        The task model classes call it for a fresh classification head (PEFT's rule: the names
        are appended to ``modules_to_save`` of every config that has that field). Names already
        listed are not repeated; a config without the field is returned unchanged. A method that
        trains the head some other way overrides this (full fine-tuning trains it already).
        """
        if "modules_to_save" not in {f.name for f in dataclasses.fields(self)}:
            return self
        current = list(self.modules_to_save or [])
        missing = [name for name in names if name not in current]
        if not missing:
            return self
        return dataclasses.replace(self, modules_to_save=current + missing)

    # -- reading and writing -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The implemented fields as plain JSON data (enums become strings)."""
        return {f.name: plain_data(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_peft_json(self) -> dict[str, Any]:
        """What goes into ``adapter_config.json``: our fields plus PEFT's defaults for the rest.

        Writing the not-implemented keys at their defaults gives files with the same keys PEFT
        writes, so tools that index the JSON directly (``config["use_dora"]``) keep working.
        """
        return {**plain_data(self.PEFT_DEFAULTS_NOT_IMPLEMENTED), **self.to_dict()}

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` (atomically)."""
        write_json(Path(save_directory) / CONFIG_NAME, self.to_peft_json())

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | dict[str, Any]) -> PeftConfig:
        """Read a config from a directory, an ``adapter_config.json`` path, or its parsed dict.

        Called on ``PeftConfig`` it returns the registered subclass named by ``peft_type``.
        """
        if isinstance(source, dict):
            return cls.from_dict(source)
        path = Path(source)
        file = path / CONFIG_NAME if path.is_dir() else path
        if not file.is_file():
            raise ModelLoadError(
                f"no {CONFIG_NAME} found at {path}: point to an adapter directory or the file itself"
            )
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ModelLoadError(f"{file} is not valid JSON: {err}") from err
        return cls.from_dict(data, source=str(file))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str | None = None) -> PeftConfig:
        """Build a config from PEFT-format data, reporting every problem at once (``ConfigError``)."""
        from peftkit.methods import get_method  # the registry imports the methods, which import us

        data = dict(data)
        peft_type = data.pop("peft_type", None)
        if isinstance(peft_type, Enum):  # PeftType.LORA: str() of a str-Enum is "PeftType.LORA"
            peft_type = peft_type.value
        target = cls
        if cls._declared_peft_type() is None:
            if peft_type is None:
                raise ConfigError(
                    "'peft_type' is missing: cannot tell which PEFT method this config is for", source
                )
            target = get_method(str(peft_type)).config_cls
        elif peft_type is not None and str(peft_type).upper() != cls._declared_peft_type():
            raise ConfigError(
                f"'peft_type' is {peft_type!r} but {cls.__name__} reads {cls._declared_peft_type()!r} configs; "
                "use PeftConfig.from_pretrained to pick the class automatically",
                source,
            )
        problems = target._drop_peft_only_keys(data)
        try:
            config = build_config(target, data, source=source)
        except ConfigError as err:
            problems.extend(err.problems)
        if problems:
            raise ConfigError(problems, source)
        return config

    @classmethod
    def _declared_peft_type(cls) -> str | None:
        return next(f.default for f in dataclasses.fields(cls) if f.name == "peft_type")

    @classmethod
    def _drop_peft_only_keys(cls, data: dict[str, Any]) -> list[str]:
        """Remove the keys we do not model from ``data``; return a problem for each that matters.

        A key matters when it asks for something: a value other than PEFT's default (or
        null/false/empty), unless the key only configures a feature that is switched off.
        """
        ours = {f.name for f in dataclasses.fields(cls) if f.init}
        original = dict(data)
        defaults = cls.PEFT_DEFAULTS_NOT_IMPLEMENTED
        problems = []
        for key in [k for k in original if k not in ours]:
            value = data.pop(key)
            switch = cls.PEFT_KEYS_SWITCHED_BY.get(key)
            if (
                key in cls.PEFT_INFORMATIONAL_KEYS
                or (switch is not None and _is_off(original.get(switch, defaults.get(switch))))
                or value == defaults.get(key)
                or _is_off(value)  # also a newer PEFT's new key at its default
            ):
                continue
            what = (
                "a PEFT feature peftkit does not implement" if key in defaults else "not a key peftkit knows"
            )
            problems.append(
                f"'{key}' = {value!r} is {what}; only its default ({defaults.get(key)!r}) can be loaded. "
                "Remove the key or use an adapter trained without it."
            )
        return problems


@dataclasses.dataclass(kw_only=True)
class TargetingConfig(PeftConfig):
    """Fields of methods that inject layers into chosen modules (LoRA, IA3, LoHa, LoKr, OFT, ...).

    Matching follows PEFT exactly so that configs mean the same thing in both libraries.
    """

    NAME_LIST_FIELDS: ClassVar[tuple[str, ...]] = (
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "modules_to_save",
    )

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Modules to adapt. A list matches a module whose full name equals an entry or ends with "
            "'.' + entry (e.g. [q_proj, v_proj]); a string is a regex that must match the full name; "
            "'all-linear' picks every linear layer except the output layer; null uses the method's default "
            "for the model architecture."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Modules never to adapt; same matching rules as target_modules."},
    )
    layers_to_transform: list[int] | int | None = field(
        default=None,
        metadata={
            "help": "Only adapt modules in these layer indices (the number after layers_pattern in the module "
            "name, e.g. model.layers.3.self_attn.q_proj is layer 3). Needs a list target_modules or 'all-linear'."
        },
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Name of the module list holding the layers (e.g. 'layers' or 'h'); null finds the first "
            "numbered segment. Only used with layers_to_transform."
        },
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules trained in full and saved with the adapter (e.g. [lm_head] or a classifier head); "
            "matched by name suffix."
        },
    )

    def validate(self) -> list[str]:
        problems = super().validate()
        # A regex names layers itself; "all-linear" (resolved to a list of names) can take the filter.
        regex = isinstance(self.target_modules, str) and self.target_modules.lower() != "all-linear"
        if regex and self.layers_to_transform is not None:
            problems.append(
                "layers_to_transform only works with a list target_modules (or 'all-linear'), not a regex: "
                "put the layer numbers into the regex or make target_modules a list"
            )
        if regex and self.layers_pattern is not None:
            problems.append("layers_pattern only works with a list target_modules, not a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            problems.append("layers_pattern is set but layers_to_transform is not: set both or neither")
        layers = self.layers_to_transform
        if any(isinstance(i, int) and i < 0 for i in (layers if isinstance(layers, list) else [layers])):
            problems.append(
                f"layers_to_transform must hold layer indices counted from 0 (no negative ones), got {layers!r}"
            )
        if isinstance(self.target_modules, list) and not self.target_modules:
            problems.append(
                "target_modules is an empty list: name at least one module, or use null for the default"
            )
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as err:
                    problems.append(f"{name} is not a valid regular expression ({err}): {value!r}")
        return problems


@runtime_checkable
class AdapterModule(Protocol):
    """A module that carries adapter state (structural: implement these, inherit nothing).

    ``active_adapter`` is the adapter whose weights the forward pass uses; ``None`` disables the
    adapter (the module then behaves like the module it wraps).
    """

    active_adapter: str | None

    def adapter_params(self, adapter_name: str) -> dict[str, str]:
        """This module's state for ``adapter_name``: ``{checkpoint name: state_dict name}``.

        Both names are relative to this module. The checkpoint name is what goes into
        ``adapter_model.safetensors`` (adapter name removed, as PEFT writes it), e.g.
        ``{"lora_A.weight": "lora_A.default.weight"}``. Parameters among the values are the
        ones training updates.
        """
        ...

    def unwrap(self, merge: bool) -> nn.Module:
        """The plain module to put back in place of this one; with ``merge`` the active adapter is
        folded into its weights."""
        ...


@runtime_checkable
class TunerModel(Protocol):
    """What ``PeftModel`` needs from a method's model class (the registry's ``model_cls``).

    Constructed as ``model_cls(model, config, adapter_name)``; it keeps the user's model as
    ``.model`` so state-dict keys read ``base_model.model.<original name>`` as in PEFT.
    """

    model: nn.Module
    peft_config: dict[str, PeftConfig]
    active_adapter: str | None

    def add_adapter(self, adapter_name: str, config: PeftConfig) -> None:
        """Inject another adapter (it does not become active)."""
        ...

    def set_adapter(self, adapter_name: str | None) -> None:
        """Make ``adapter_name`` the one used in forward; ``None`` turns all adapters off."""
        ...

    def adapter_state_keys(self, adapter_name: str) -> dict[str, str]:
        """``{checkpoint key: state_dict key}`` for everything saved with the adapter, relative to
        this module (so both start with ``model.``). Parameters among the values are trainable."""
        ...

    def unload(self, merge: bool) -> nn.Module:
        """Remove all adapter layers (folding in the active adapter if ``merge``); return ``.model``."""
        ...

    @classmethod
    def targetable_modules(cls, model: nn.Module) -> list[str]:
        """Full names of the modules of ``model`` this method could adapt (for ``peftkit inspect``)."""
        ...
