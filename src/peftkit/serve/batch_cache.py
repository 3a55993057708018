"""The running batch's KV cache: rows joined, left, and trimmed between decode steps.

Rows are left-padded to one length, as ``generate`` pads a batch: every row's next token goes to
the same column, its attention mask hides the padding and its position ids count only its real
tokens, so a row computes what it would alone (up to float rounding)::

    cache columns   0 1 2 3 4 5 6
    row a (old)     . . a a a a a      mask 0 0 1 1 1 1 1
    row b (joined)  b b b b b b b      mask 1 1 1 1 1 1 1
    row c (joined)  . . . . c c c      mask 0 0 0 0 1 1 1

A joining group is prefilled on its own cache and concatenated on the batch dimension, the shorter
side padded on the left. A finished row is dropped; columns that only padding uses any more are cut
off, so the cache is never wider than the longest live row.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from peftkit.errors import ModelLoadError


def new_cache(config: Any) -> DynamicCache:
    return DynamicCache(config=config)


def check_cache_layers(config: Any) -> None:
    """Refuse models whose cache layers are not plain growing key/value tensors (sliding windows,
    recurrent states): the batch operations below would corrupt them."""
    kinds = {type(layer).__name__ for layer in new_cache(config).layers}
    if kinds != {DynamicLayer.__name__}:
        raise ModelLoadError(
            f"peftkit serve batches models whose KV cache grows per token on every layer; this model's "
            f"cache layers are {', '.join(sorted(kinds))} (a sliding window or recurrent state); "
            "use `peftkit generate` for it"
        )


class BatchCache:
    """A ``DynamicCache`` for the running rows and its ``(rows, columns)`` attention mask."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor):
        self.cache = cache
        self.mask = mask  # long, 1 = a real token in that column

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def positions(self) -> torch.Tensor:
        """``(rows, 1)``: the position of each row's next token (its real tokens so far)."""
        return self.mask.sum(-1, keepdim=True)

    def step_mask(self) -> torch.Tensor:
        """The mask for a decode step (one new real column); becomes the mask after the step."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.rows, 1))], dim=1)
        return self.mask

    def join(self, other: BatchCache) -> None:
        """Append ``other``'s rows after these, both padded on the left to the wider one."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
        self.mask = torch.cat([_pad_left(self.mask, width, dim=1), _pad_left(other.mask, width, dim=1)])

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order), then drop the columns no kept row uses."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        unused = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # leading all-padding columns
        if unused:
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, unused:].contiguous()
                layer.values = layer.values[:, :, unused:].contiguous()
            self.mask = self.mask[:, unused:]


def _pad_left(tensor: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    pads = [0, 0] * (tensor.dim() - 1 - dim) + [missing, 0]  # F.pad counts dimensions from the last
    return F.pad(tensor, pads)
