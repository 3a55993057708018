"""Deterministic micro-batches: the order depends only on (seed, epoch), so a resumed run
can jump straight to micro-batch ``m`` and see exactly the data an uninterrupted run saw."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

IGNORE_INDEX = -100
_MEGABATCH = 64  # batches per length-sorted group: enough to cut padding, small enough to stay random


def epoch_batches(
    lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int, group_by_length: bool
) -> list[list[int]]:
    """Split example indices into batches for one epoch.

    With ``group_by_length`` the shuffled indices are cut into mega-batches, each sorted by
    length before being split into batches, and the batch order is shuffled again: batches
    hold examples of similar length (little padding) while the epoch stays random.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    mega = batch_size * _MEGABATCH
    for start in range(0, len(order), mega):
        group = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in perm]


class MicroBatchStream:
    """Micro-batch ``m`` of an endless sequence of epochs, addressable by index. ``len(example)``
    is its length in tokens (a preference pair: prompt + its longer completion)."""

    def __init__(self, examples: Sequence[Any], batch_size: int, *, seed: int, group_by_length: bool):
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.lengths = [len(e) for e in examples]  # tokens per row (a preference pair: its longer row)
        self._epoch = -1
        self._batches: list[list[int]] = []
        self.batches_per_epoch = (len(examples) + batch_size - 1) // batch_size

    def position(self, micro_index: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of micro-batch ``micro_index``."""
        return divmod(micro_index, self.batches_per_epoch)

    def get(self, micro_index: int) -> list[Any]:
        epoch, index = self.position(micro_index)
        if epoch != self._epoch:
            self._batches = epoch_batches(
                self.lengths,
                self.batch_size,
                seed=self.seed,
                epoch=epoch,
                group_by_length=self.group_by_length,
            )
            self._epoch = epoch
        return [self.examples[i] for i in self._batches[index]]


def collate(examples: Sequence[Any], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` / ``labels`` into tensors with an attention mask."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry a loss: labels shifted by one (the first position predicts nothing)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
