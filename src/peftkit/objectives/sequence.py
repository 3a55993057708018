"""Completion log-probabilities of a batch of rows, and the reference model they are compared with.

:func:`completion_logps` runs the model's body once over all rows (chosen and rejected of a batch
together, or one row per pair where objectives/pair_layout.py applies: each prompt computed once)
and the output layer only at labelled positions, in chunks, as the SFT loss does
(``train/loss.py``): never ``[rows, seq, vocab]`` logits. Per row it returns the summed
log-probability of the label tokens and how many there were.

The reference (DPO, KTO) is the model training started from, evaluated without gradients::

    AdapterOff    a new adapter: the base model, adapter disabled for the pass (costs nothing)
    FrozenStart   init_adapter: the starting trainable weights, kept aside (one copy of the
                  adapter) and pointed to during the pass (no copying of tensors)
    precomputed   ``ref_*`` tensors in the batch (preference.reference: precompute)

The reference pass runs BEFORE the policy's forward in a step: switching weights after the
policy's forward would change tensors its backward still needs.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from peftkit.methods.tuner_base import TunerBase
from peftkit.objectives.pair_layout import KEYS as PAIR_KEYS
from peftkit.objectives.pair_layout import SharedPrompt
from peftkit.train.batching import IGNORE_INDEX
from peftkit.train.loss import body_and_head

_CHUNK = 1024  # labelled positions projected at a time, as in train/loss.py


def completion_logps(
    model: nn.Module, batch: dict[str, torch.Tensor], shared_prompt: SharedPrompt | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's label tokens, number of label tokens per row), fp32.

    ``batch`` holds ``input_ids``, ``attention_mask`` and ``labels`` (-100 off the completion);
    position t's output predicts label t+1. With ``shared_prompt`` and a batch collated with it
    (``pair_*`` tensors), each preference pair runs as one row (objectives/pair_layout.py); the
    rows, sums and counts are still those of the two-row layout."""
    counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)
    parts = body_and_head(model)
    if shared_prompt is not None and parts is not None:
        found = shared_prompt.hidden_and_targets(model, parts[0], batch)
        if found is not None:
            selected, targets, rows = found
            sums = _summed(parts[1], selected, targets, rows, counts.shape[0])
            fp32 = selected.dtype == torch.float32 and not torch.is_autocast_enabled(selected.device.type)
            if shared_prompt.agrees(sums, counts, fp32, lambda: _row_logps(model, batch, parts)):
                return sums, counts
    return _row_logps(model, batch, parts), counts


def _row_logps(
    model: nn.Module, batch: dict[str, torch.Tensor], parts: tuple[nn.Module, nn.Module] | None
) -> torch.Tensor:
    """The summed label log-probs of the two-row layout: one row per completion."""
    picked, row_of_label = _token_logps(model, batch, parts)
    rows = batch["input_ids"].shape[0]
    return torch.zeros(rows, dtype=torch.float32, device=picked.device).index_add(0, row_of_label, picked)


def completion_token_logps(
    model: nn.Module, batch: dict[str, torch.Tensor], shared_prefix: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per label token, flat over the batch (row by row, left to right): its log-probability
    (fp32) and its row. No padding: GRPO's per-token loss works on these vectors. With
    ``shared_prefix`` (train/shared_prefix.py) the tokens every row starts with (the chat
    template's system turn ...) run once; its outputs come in the same order."""
    parts = body_and_head(model)
    if shared_prefix is not None and parts is not None:
        found = shared_prefix.hidden_and_targets(parts[0], batch)
        if found is not None:
            selected, targets = found
            rows = (batch["labels"][:, 1:] != IGNORE_INDEX).nonzero()[:, 0]
            return _picked(parts[1], selected, targets), rows
    return _token_logps(model, batch, parts)


def _token_logps(
    model: nn.Module, batch: dict[str, torch.Tensor], parts: tuple[nn.Module, nn.Module] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    row_of_label = mask.nonzero()[:, 0]
    if parts is None:  # no separable output layer: full logits (small or unusual models only)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, -batch["input_ids"].shape[1] : -1]  # virtual tokens of prompt methods off
        return _label_logps(logits[mask], labels[mask]), row_of_label
    body, head = parts
    tuner = getattr(model, "base_model", None)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if bool((batch["attention_mask"][:, 0] == 0).any()):  # left padding: positions from the mask
        if isinstance(tuner, TunerBase) and not tuner.supports_packing:
            raise ValueError(
                f"{type(tuner).__name__} adds virtual tokens, which need right-padded rows; "
                "collate the batch with right padding"
            )
        inputs["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        hidden = body(**inputs, use_cache=False)[0]
    elif isinstance(tuner, TunerBase):  # the method may add prompts or past key/values
        hidden = tuner.body_hidden_states(body, batch["input_ids"], batch["attention_mask"])
    else:
        hidden = body(**inputs, use_cache=False)[0]
    selected = hidden[:, :-1][mask]  # (n_labels, hidden)
    return _picked(head, selected, labels[mask]), row_of_label


def _summed(
    head: nn.Module, selected: torch.Tensor, targets: torch.Tensor, row_of_label: torch.Tensor, rows: int
) -> torch.Tensor:
    """Per row, the summed log-prob of its labels (see :func:`_picked`)."""
    picked = _picked(head, selected, targets)
    return torch.zeros(rows, dtype=torch.float32, device=picked.device).index_add(0, row_of_label, picked)


def _picked(head: nn.Module, selected: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each label's log-prob: the head applied to ``selected`` hidden states (one per label) in
    chunks of ``_CHUNK``, never to every position."""
    if not selected.shape[0]:
        return selected.new_zeros((0,), dtype=torch.float32)
    return torch.cat(
        [
            _label_logps(head(selected[start : start + _CHUNK]), targets[start : start + _CHUNK])
            for start in range(0, selected.shape[0], _CHUNK)
        ]
    )


def _label_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def token_nll(logps: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per label token of each row (0 for a row without labels)."""
    return -logps / counts.clamp(min=1)


class Reference:
    """How the reference log-probs of a batch are obtained (see the module docstring)."""

    name = "reference"

    def logps(
        self, model: nn.Module, batch: dict[str, torch.Tensor], shared_prompt: SharedPrompt | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Without gradients and in eval mode: the reference is the deterministic starting model
        (no dropout), as TRL's separate reference model is. ``shared_prompt``: as in
        :func:`completion_logps`."""
        was_training = model.training
        model.eval()
        _keep_mode_dependent_kernels(model, was_training)
        try:
            with torch.no_grad(), self.active(model):
                return completion_logps(model, batch, shared_prompt)
        finally:
            model.train(was_training)

    def token_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per label token (flat, as :func:`completion_token_logps`), without gradients, in eval mode."""
        was_training = model.training
        model.eval()
        _keep_mode_dependent_kernels(model, was_training)
        try:
            with torch.no_grad(), self.active(model):
                return completion_token_logps(model, batch)[0]
        finally:
            model.train(was_training)

    @contextlib.contextmanager
    def active(self, model: nn.Module) -> Iterator[None]:
        yield


def _keep_mode_dependent_kernels(model: nn.Module, training: bool) -> None:
    """Put bitsandbytes' 8-bit layers back in the caller's mode: on the CPU they pick their kernel
    by it (training: dequantized weights; eval: int8 activations as well, ~1e-3 apart), so a
    reference in eval mode would differ from the policy at the start of training (DPO's first
    loss off ln 2). They hold no dropout."""
    bnb = sys.modules.get("bitsandbytes")  # not imported: no such layers
    if bnb is None:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            module.train(training)


class AdapterOff(Reference):
    """The base model: the new adapter disabled for the pass."""

    name = "the base model (adapter disabled)"

    @contextlib.contextmanager
    def active(self, model: nn.Module) -> Iterator[None]:
        with model.disable_adapter():
            yield


class FrozenStart(Reference):
    """The weights training started from (``init_adapter``), kept aside and swapped in by pointer."""

    name = "the starting adapter, frozen"

    def __init__(self, model: nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.start = [p.detach().clone() for p in self.params]

    @contextlib.contextmanager
    def active(self, model: nn.Module) -> Iterator[None]:
        # Autocast caches its low-precision copy of each trainable leaf weight for the whole autocast
        # region, keyed by the parameter, not its data: without clearing, the reference pass would
        # run on the policy's cached copies and the policy's pass after it on the starting weights'
        # (LoRA's lora_A: F.linear on the leaf weight; measured: a bf16 DPO run trained against them).
        current = [p.data for p in self.params]
        torch.clear_autocast_cache()
        try:
            for param, start in zip(self.params, self.start):
                param.data = start
            yield
        finally:
            for param, data in zip(self.params, current):
                param.data = data
            torch.clear_autocast_cache()


def reference_logps(
    reference: Reference | None,
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    key: str = "",
    shared_prompt: SharedPrompt | None = None,
) -> torch.Tensor:
    """Summed reference log-probs of ``batch``'s rows: the precomputed ``ref{key}_logps`` if the
    batch carries them, else a pass through ``reference`` (one row per pair with ``shared_prompt``
    and a batch collated with it)."""
    stored = batch.get(f"ref{key}_logps")
    if stored is not None:
        return stored.float()
    if reference is None:
        raise RuntimeError("this objective needs a reference model, and none was set up")
    prefix = f"{key.strip('_')}_" if key else ""
    rows = {name: batch[prefix + name] for name in ("input_ids", "attention_mask", "labels")}
    if not key:
        rows.update({name: batch[name] for name in PAIR_KEYS if name in batch})
    return reference.logps(model, rows, shared_prompt)[0]


def auto_reference(model: Any, *, init_adapter: bool) -> Reference:
    """The ``auto`` reference for ``model`` at the start of training."""
    return FrozenStart(model) if init_adapter else AdapterOff()
