"""Micro-batch order is a pure function of (seed, epoch): the basis of exact resume."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peftkit.train.batching import IGNORE_INDEX, MicroBatchStream, collate, count_label_tokens, epoch_batches


@dataclass
class Ex:
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:  # what MicroBatchStream groups by: tokens per example
        return len(self.input_ids)


def test_epoch_covers_every_example_once_and_is_seeded():
    lengths = [i % 17 + 1 for i in range(200)]
    for group in (True, False):
        a = epoch_batches(lengths, 8, seed=3, epoch=0, group_by_length=group)
        assert sorted(i for b in a for i in b) == list(range(200))
        assert a == epoch_batches(lengths, 8, seed=3, epoch=0, group_by_length=group)
        assert a != epoch_batches(lengths, 8, seed=3, epoch=1, group_by_length=group)
        assert a != epoch_batches(lengths, 8, seed=4, epoch=0, group_by_length=group)


def test_group_by_length_reduces_padding():
    lengths = [(i * 37) % 100 + 1 for i in range(1024)]

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    grouped = epoch_batches(lengths, 16, seed=0, epoch=0, group_by_length=True)
    plain = epoch_batches(lengths, 16, seed=0, epoch=0, group_by_length=False)
    assert padding(grouped) < padding(plain) / 4


def test_stream_is_random_access_across_epochs():
    examples = [Ex([1] * (i % 5 + 1), [1] * (i % 5 + 1)) for i in range(10)]
    stream = MicroBatchStream(examples, 3, seed=1, group_by_length=False)
    assert stream.batches_per_epoch == 4
    sequential = [stream.get(m) for m in range(12)]
    fresh = MicroBatchStream(examples, 3, seed=1, group_by_length=False)
    assert [fresh.get(m) for m in (7, 2, 11)] == [sequential[7], sequential[2], sequential[11]]
    assert stream.position(9) == (2, 1)


def test_collate_pads_right_and_counts_shifted_labels():
    batch = collate([Ex([5, 6, 7], [IGNORE_INDEX, 6, 7]), Ex([8], [8])], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    # The first position predicts nothing, so row 2's only label does not count.
    assert count_label_tokens(batch) == 2
    assert batch["input_ids"].dtype == torch.long
