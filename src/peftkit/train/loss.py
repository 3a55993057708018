"""Causal-LM loss that computes the output layer only where there are labels.

The vocabulary projection of a small model is a large share of its compute (SmolLM2-135M:
49k x 576 per token) and ``[batch, seq, vocab]`` logits dominate activation memory. With
completion-only labels most positions need no logits at all, so we run the model's body,
gather the hidden states at labelled positions, and project them in chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.methods.tuner_base import TunerBase
from peftkit.train.batching import IGNORE_INDEX
from peftkit.train.shared_prefix import SharedPrefix

_CHUNK = 1024  # labelled positions projected at a time: bounds the logits buffer


def body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The transformer body and output layer of a causal LM, when the model exposes them."""
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(hf_model, "base_model_prefix", None)
    body = getattr(hf_model, prefix, None) if prefix else None
    get_head = getattr(hf_model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if body is None or head is None or body is hf_model:
        return None
    return body, head


def lm_loss_sum(
    model: nn.Module, batch: dict[str, torch.Tensor], shared_prefix: SharedPrefix | None = None
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over label tokens, and how many there were.

    With ``shared_prefix`` the prompt prefix all rows share runs once (train/shared_prefix.py)."""
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    n_tokens = int(mask.sum())
    # A packed batch (train/packing.py) separates its examples by position_ids; its attention_mask
    # only marks real tokens and must not reach the model, which would then ignore the packing.
    position_ids = batch.get("position_ids")
    inputs = {"input_ids": batch["input_ids"]}
    inputs.update(
        {"position_ids": position_ids}
        if position_ids is not None
        else {"attention_mask": batch["attention_mask"]}
    )
    parts = body_and_head(model)
    if parts is None:
        logits = model(**inputs).logits
        # Methods that prepend virtual tokens (prompt tuning) return logits for them too.
        logits = logits[:, -batch["input_ids"].shape[1] : -1][mask]
        return F.cross_entropy(logits.float(), labels[mask], reduction="sum"), n_tokens
    body, head = parts
    tuner = getattr(model, "base_model", None)
    shared = shared_prefix.hidden_and_targets(body, batch) if shared_prefix is not None else None
    if shared is not None:  # only for methods with supports_packing (see train/loop.py)
        selected, targets = shared
    else:
        if isinstance(tuner, TunerBase):  # a PeftModel: the method may add prompts or past key/values
            packed = (
                {} if position_ids is None else {"position_ids": position_ids}
            )  # supports_packing methods only
            hidden = tuner.body_hidden_states(
                body, batch["input_ids"], inputs.get("attention_mask"), **packed
            )
        else:
            hidden = body(**inputs, use_cache=False)[0]
        selected = hidden[:, :-1][mask]  # (n_tokens, hidden)
        targets = labels[mask]
    total = selected.new_zeros((), dtype=torch.float32)
    for start in range(0, selected.shape[0], _CHUNK):
        logits = head(selected[start : start + _CHUNK])  # (chunk, vocab)
        total = total + F.cross_entropy(logits.float(), targets[start : start + _CHUNK], reduction="sum")
    return total, n_tokens
