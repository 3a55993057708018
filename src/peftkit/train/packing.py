"""Sample packing: the examples of a micro-batch laid end to end in a few rows, no padding inside.

::

    examples (lengths 5, 3, 4, 2), capacity 8      first-fit decreasing
    row 0:  a a a a a c c .        position_ids  0 1 2 3 4 0 1 0      (. = padding, its own segment)
    row 1:  b b b d d c? ...       labels        -100 at each example's first token

transformers builds the attention mask from ``position_ids`` when ``attention_mask`` is None (a
position that does not follow its predecessor starts a new sequence: ``find_packed_sequence_indices``),
so no token attends across an example boundary and RoPE / learned positions restart per example.
The label of each example's first token is set to ``IGNORE_INDEX`` so the shifted next-token loss
never predicts one example from the end of another: the packed loss and its gradients are those
of the unpacked batch (``tests/test_packing.py``).

Whether an architecture honours this is checked once per run by :func:`check_isolation` (an
architecture that ignored ``position_ids`` would silently mix examples).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from peftkit.errors import PeftkitError
from peftkit.train.batching import IGNORE_INDEX


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices grouped into rows of at most ``capacity`` tokens (an example longer than that
    gets a row of its own), longest examples first; deterministic for equal lengths."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def pack(examples: Sequence[Any], pad_token_id: int, capacity: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``labels``, ``position_ids`` of the packed rows, and ``attention_mask``
    marking real tokens (for counting; the model is given ``position_ids`` instead)."""
    rows = first_fit_decreasing([len(e.input_ids) for e in examples], capacity)
    width = max(sum(len(examples[i].input_ids) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            ex = examples[i]
            n = len(ex.input_ids)
            input_ids[r, start : start + n] = torch.tensor(ex.input_ids)
            labels[r, start : start + n] = torch.tensor(ex.labels)
            labels[r, start] = IGNORE_INDEX  # never predicted from the previous example's last token
            attention_mask[r, start : start + n] = 1
            position_ids[r, start : start + n] = torch.arange(n)
            start += n
        position_ids[r, start:] = torch.arange(width - start)  # padding: one more segment, no labels
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
    }


def check_isolation(model: Any, device: torch.device) -> None:
    """Refuse packing for a model whose attention lets packed examples see each other.

    Two rows hold the same second example after first examples of different tokens; with
    per-example attention the second example's outputs do not depend on the first's tokens
    (masked scores are exactly zero after softmax). Costs two forward passes of 11 tokens.
    """
    from peftkit.train.loss import body_and_head

    vocab_size = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(vocab_size // 2, vocab_size, (2, 6), generator=generator)
    second = torch.randint(vocab_size // 2, vocab_size, (5,), generator=generator)
    input_ids = torch.cat([first, second.expand(2, -1)], dim=1).to(device)
    position_ids = torch.cat([torch.arange(6), torch.arange(5)]).expand(2, -1).to(device)
    parts = body_and_head(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if parts is None:
                out = model(input_ids=input_ids, position_ids=position_ids).logits
            else:
                out = model.base_model.body_hidden_states(
                    parts[0], input_ids, None, position_ids=position_ids
                )
    finally:
        model.train(was_training)
    tail = out[:, -5:].float()
    if not torch.allclose(tail[0], tail[1], rtol=1e-3, atol=1e-3 * float(tail.abs().max())):
        raise PeftkitError(
            f"training.packing: {type(model.get_base_model()).__name__} does not keep packed examples apart "
            "(its attention ignores position_ids that restart per example): set training.packing: false"
        )
