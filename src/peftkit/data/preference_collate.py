"""Batches of preference examples: one padded tensor per batch, labels only on completions.

Paired rows (DPO, ORPO, SimPO, reward models), B examples -> 2B rows, one forward pass::

    row 0 .. B-1     prompt_i + chosen_i     labels: -100 on prompt | chosen_i  | -100 on pad
    row B .. 2B-1    prompt_i + rejected_i   labels: -100 on prompt | rejected_i | -100 on pad

Unpaired rows (KTO) keep their B rows, plus B mismatched "KL" rows that estimate KTO's
reference point z0 (usually in a separate forward pass without gradients)::

    kl row i = prompt_i + completion_{i-1}   (row 0 takes the last row's completion)

which is TRL's pairing (``KTOTrainer``: completions rotated by one within each batch of
``per_device_train_batch_size``, precomputed on the dataset with sequential sampling). Built here
in the collator, the KL rows always use exactly the completions of the batch being trained,
whatever the sampler. A KL row longer than ``max_seq_len`` loses the end of its completion (the
prompt was already cut to leave room for a completion, so at least one token remains).

Rows are right-padded; ``labels[i]`` is the target for ``input_ids[i]`` (the model shifts them,
as in :class:`peftkit.data.encode.Example`). Labels come from the completion lengths, never from
comparing ids with the pad id, so an EOS that is also the pad token keeps its label.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from peftkit.data.encode import IGNORE_INDEX
from peftkit.data.preference_encode import KTOExample, PreferenceExample


def collate_pairs(examples: Sequence[PreferenceExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``labels``, each (2B, T): all chosen rows, then all rejected."""
    rows = [(e.prompt_ids, e.chosen_ids) for e in examples]
    rows += [(e.prompt_ids, e.rejected_ids) for e in examples]
    return collate_rows(rows, pad_token_id)


def collate_unpaired(
    examples: Sequence[KTOExample],
    pad_token_id: int,
    *,
    kl: bool = True,
    max_seq_len: int | None = None,
) -> dict[str, torch.Tensor]:
    """KTO batch: ``input_ids`` / ``attention_mask`` / ``labels`` (B, T), ``desirable`` (B,) bool,
    and with ``kl`` the mismatched rows as ``kl_input_ids`` / ``kl_attention_mask`` / ``kl_labels``.

    The KL rows need at least two examples: with one, the "mismatched" row would be the row
    itself and z0 would equal the row's own reward (TRL refuses batch size 1 for the same reason).
    """
    batch = collate_rows([(e.prompt_ids, e.completion_ids) for e in examples], pad_token_id)
    batch["desirable"] = torch.tensor([e.desirable for e in examples], dtype=torch.bool)
    if not kl:
        return batch
    if len(examples) < 2:
        raise ValueError(
            "KTO's KL rows pair each prompt with another row's completion, so a batch needs at least 2 "
            f"examples, got {len(examples)}: raise the batch size and drop an incomplete last batch"
        )
    rows = []
    for i, example in enumerate(examples):
        completion = examples[i - 1].completion_ids  # i - 1 = -1 for the first row: the last one's
        room = None if max_seq_len is None else max(max_seq_len - len(example.prompt_ids), 1)
        rows.append((example.prompt_ids, completion[:room]))
    kl_batch = collate_rows(rows, pad_token_id)
    batch.update({f"kl_{key}": value for key, value in kl_batch.items()})
    return batch


def collate_rows(
    rows: list[tuple[list[int], list[int]]], pad_token_id: int | None
) -> dict[str, torch.Tensor]:
    """(prompt ids, completion ids) rows -> right-padded ``input_ids`` / ``attention_mask`` and
    ``labels`` on the completions only, each (rows, T)."""
    if pad_token_id is None:
        raise ValueError(
            "the tokenizer has no pad token, so a batch cannot be padded: set tokenizer.pad_token "
            "(e.g. to its eos token; padded positions carry no label)"
        )
    if not rows:
        raise ValueError("cannot collate an empty batch")
    width = max(len(prompt) + len(completion) for prompt, completion in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # (rows, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        end = len(prompt) + len(completion)
        input_ids[i, :end] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[i, :end] = 1
        labels[i, len(prompt) : end] = torch.tensor(completion, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
