"""Configs of the methods that train a chosen subset of the model's own parameters.

peftkit's own methods (PEFT has no equivalent, so their ``peft_type``s are peftkit's): FULL
(every parameter), BITFIT (the bias terms, Ben Zaken et al., 2021) and PARTIAL (the top N
transformer blocks and/or parameters matched by regex). Nothing is injected, except the zero
biases that BitFit's ``add_missing_biases`` gives bias-free linear layers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from peftkit.methods.base import PeftConfig

EXTRA_PARTS = ("embeddings", "norms", "head")


@dataclass(kw_only=True)
class SelectiveConfig(PeftConfig):
    """Fields shared by the selective methods (not a method itself: it has no ``peft_type``)."""

    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules trained in full as well (e.g. [lm_head] or a classifier head 'score'); matched by "
            "name suffix, as in LoRA."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.modules_to_save, (tuple, set, frozenset)):
            self.modules_to_save = sorted(self.modules_to_save)
        super().__post_init__()


@dataclass(kw_only=True)
class FullFinetuneConfig(SelectiveConfig):
    """Full fine-tuning: every parameter of the model is trained and saved (tied weights once)."""

    peft_type: str | None = field(
        default="FULL", metadata={"help": "Which PEFT method this config belongs to (always FULL)."}
    )

    def validate(self) -> list[str]:
        problems = super().validate()
        if self.modules_to_save:
            problems.append(
                "modules_to_save is meaningless with method 'full', which already trains every module: remove it"
            )
        return problems

    def with_modules_to_save(self, names: list[str]) -> FullFinetuneConfig:
        """Unchanged: every module, a task head included, trains already."""
        return self


@dataclass(kw_only=True)
class BitFitConfig(SelectiveConfig):
    """BitFit: train only the model's bias parameters (plus ``modules_to_save``).

    Llama-style models have no biases. ``add_missing_biases`` is the usual adaptation of BitFit
    to them: each bias-free ``nn.Linear`` gets a zero bias vector (so the model's output is
    unchanged at the start), and BitFit trains these additive vectors. That *adds* parameters
    instead of training existing ones; the adapter file holds them, and loading it into a fresh
    base model creates them again before the weights are loaded.
    """

    peft_type: str | None = field(
        default="BITFIT", metadata={"help": "Which PEFT method this config belongs to (always BITFIT)."}
    )
    add_missing_biases: bool = field(
        default=False,
        metadata={
            "help": "Give every bias-free nn.Linear of the transformer blocks (or those missing_bias_modules "
            "names) a zero-initialised bias, and train it with the model's own biases. Needed for models "
            "without biases (Llama, Mistral, T5, ...); the output is unchanged until training moves them."
        },
    )
    missing_bias_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Which nn.Linear modules get a bias with add_missing_biases: a list of names or name "
            "suffixes (e.g. [q_proj, v_proj]; [lm_head] to include the output layer) or one regex matched "
            "against the full name. null: every nn.Linear inside the transformer blocks."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.missing_bias_modules, (tuple, set, frozenset)):
            self.missing_bias_modules = sorted(self.missing_bias_modules)
        super().__post_init__()

    def validate(self) -> list[str]:
        problems = super().validate()
        if not isinstance(self.add_missing_biases, bool):
            problems.append(f"add_missing_biases must be true or false, got {self.add_missing_biases!r}")
        modules = self.missing_bias_modules
        if modules is not None and not self.add_missing_biases:
            problems.append(
                "missing_bias_modules is only used with add_missing_biases: set add_missing_biases: true "
                "or remove missing_bias_modules"
            )
        if isinstance(modules, str):
            try:
                re.compile(modules)
            except re.error as err:
                problems.append(f"missing_bias_modules {modules!r} is not a valid regular expression ({err})")
        elif modules is not None and (not modules or not all(isinstance(m, str) and m for m in modules)):
            problems.append(
                f"missing_bias_modules must be a non-empty list of module names (or a regex), got {modules!r}"
            )
        return problems


@dataclass(kw_only=True)
class PartialFinetuneConfig(SelectiveConfig):
    """Layer-wise fine-tuning: train the top N transformer blocks and/or parameters chosen by regex."""

    peft_type: str | None = field(
        default="PARTIAL", metadata={"help": "Which PEFT method this config belongs to (always PARTIAL)."}
    )
    train_top_n_layers: int | None = field(
        default=None,
        metadata={
            "help": "Train the last N transformer blocks (those nearest the output) and freeze the rest. The blocks "
            "are the largest list of identical modules (model.layers, transformer.h, ...) unless layers_pattern "
            "names it."
        },
    )
    layers_pattern: str | None = field(
        default=None,
        metadata={
            "help": "Name (or name suffix) of the module list holding the blocks, e.g. 'layers' or 'h'; null finds it."
        },
    )
    trainable_patterns: list[str] | None = field(
        default=None,
        metadata={
            "help": "Regexes searched in full parameter names (e.g. 'mlp\\.', 'layers\\.0\\.'); every parameter a "
            "pattern matches is trained. Each pattern must match something."
        },
    )
    also_train: list[Literal["embeddings", "norms", "head"]] = field(
        default_factory=list,
        metadata={
            "help": "Parts outside the blocks to train too: embeddings (every embedding table), norms (norm layers "
            "outside the blocks, e.g. the final norm) and head (the output layer)."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.trainable_patterns, str):  # one regex given without a list
            self.trainable_patterns = [self.trainable_patterns]
        if isinstance(self.also_train, str):
            self.also_train = [self.also_train]
        super().__post_init__()

    def validate(self) -> list[str]:
        problems = super().validate()
        n = self.train_top_n_layers
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            problems.append(f"train_top_n_layers must be a positive integer (or null), got {n!r}")
        if self.layers_pattern is not None and n is None:
            problems.append("layers_pattern is only used with train_top_n_layers: set both or neither")
        for pattern in self.trainable_patterns or []:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as err:
                problems.append(
                    f"trainable_patterns entry {pattern!r} is not a valid regular expression ({err})"
                )
        unknown = [part for part in self.also_train if part not in EXTRA_PARTS]
        if unknown:
            problems.append(f"also_train may hold {', '.join(EXTRA_PARTS)}; got {unknown}")
        if n is None and not self.trainable_patterns and not self.also_train and not self.modules_to_save:
            problems.append(
                "method 'partial' trains nothing as configured: set train_top_n_layers (e.g. 2) and/or "
                "trainable_patterns, also_train or modules_to_save"
            )
        return problems
