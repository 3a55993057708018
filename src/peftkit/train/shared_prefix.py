"""The prompt prefix that every example of a micro-batch shares, computed once per micro-batch.

Chat-formatted examples start with the same tokens: the chat template's system turn and any fixed
instruction. In the default job that is 17 of an example's 59 tokens on average. Causal attention
means those positions never see what follows them, so their hidden states are the same in every
row. This module runs them once.

    padded batch (B rows)                       one row, no padding
    [prefix | suffix 1 | pad]                   [prefix | suffix 1 | suffix 2 | ... | suffix B]
    [prefix | suffix 2     ]        ---->       position ids: 0..P-1, then P.. again for each suffix
    ...                                         segment attention (below)

Attention (:func:`segment_attention`, registered with transformers' attention interface) gathers
one padded group per segment: the prefix's queries over the prefix, and each suffix's queries over
the prefix and that suffix, causally. It then scatters the outputs back to the row. Everything else
in the model is per position and sees each token once. Loss and gradients equal the padded batch's
(``tests/test_shared_prefix.py``, fp32, 1e-5 relative).

On the default job the forward and backward became 1.23x faster (measured in one process on the
same batches; docs/performance.md).

When it applies: causal-LM training whose method acts per position (``supports_packing``), with no
active dropout (one dropout mask would be shared by every row's prefix), no packing, not under
FSDP (the check below adds a forward pass on some ranks only, and FSDP's per-layer all-gathers
must match on all), and a shared prefix of at least ``MIN_SHARED_TOKENS`` tokens before the first
labelled one. The first batch that uses it also runs the usual way once (without gradients) and
the two are compared. If they differ, sharing is switched off for the run and a note is printed.
That happens for an architecture whose attention does not go through the interface, or which adds
position biases this function does not know.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.train.batching import IGNORE_INDEX

ATTENTION_NAME = "peftkit_shared_prefix"
MIN_SHARED_TOKENS = 4  # below this the saving does not pay for the gathers
_CHECK_TOLERANCE = 0.1  # of the largest hidden value: bf16 noise is ~1e-2, a wrong attention ~1


def shared_prefix_length(batch: dict[str, torch.Tensor]) -> int:
    """Tokens every row shares from the start, up to the first position whose output a label needs
    (0 when that is fewer than ``MIN_SHARED_TOKENS``, or the batch has one row)."""
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    rows, width = input_ids.shape
    if rows < 2:
        return 0
    same = ((input_ids == input_ids[:1]) & (attention_mask == 1)).all(0)
    shared = int(same.long().cumprod(0).sum())
    labelled = (labels != IGNORE_INDEX).any(0)  # position t labelled: position t-1's output is used
    first_label = int(labelled.nonzero()[0]) if labelled.any() else width
    length = min(shared, first_label - 1)
    return length if length >= MIN_SHARED_TOKENS else 0


@dataclass
class Layout:
    """Where each segment's queries and keys sit in the one-row sequence."""

    segments: int
    query_slots: int  # queries per segment, padded
    key_slots: int  # keys per segment, padded
    query_index: torch.Tensor  # (segments * query_slots,) row position of each query slot
    key_index: torch.Tensor  # (segments * key_slots,)
    mask: torch.Tensor  # (segments, 1, query_slots, key_slots), 0 or -inf
    unscatter: torch.Tensor  # (row length,) query slot of each row position
    calls: int = field(default=0)  # attention layers that used it (0: the model ignored it)
    _grouped: dict[int, torch.Tensor] = field(default_factory=dict)

    def grouped_mask(self, groups: int) -> torch.Tensor:
        """``mask`` for ``groups`` query heads stacked per key head: (segments, 1, groups * q, k)."""
        if groups == 1:
            return self.mask
        if groups not in self._grouped:
            self._grouped[groups] = self.mask.repeat(1, 1, groups, 1)
        return self._grouped[groups]


@dataclass
class SharedBatch:
    """A batch laid out as one row, and where the loss reads it."""

    input_ids: torch.Tensor  # (1, N)
    position_ids: torch.Tensor  # (1, N)
    layout: Layout
    hidden_index: torch.Tensor  # row positions whose outputs predict a label
    targets: torch.Tensor  # the labels they predict


def lay_out(batch: dict[str, torch.Tensor], prefix: int) -> SharedBatch:
    """The one-row form of a right-padded batch whose rows share their first ``prefix`` tokens."""
    input_ids, labels = batch["input_ids"], batch["labels"]
    device = input_ids.device
    lengths = batch["attention_mask"].sum(1).tolist()
    suffixes = [n - prefix for n in lengths]
    starts = [prefix + sum(suffixes[:i]) for i in range(len(suffixes))]
    row_ids = torch.cat([input_ids[0, :prefix]] + [input_ids[i, prefix:n] for i, n in enumerate(lengths)])
    positions = torch.cat([torch.arange(prefix)] + [torch.arange(prefix, n) for n in lengths])

    segments, query_slots, key_slots = len(lengths) + 1, max([prefix, *suffixes]), prefix + max(suffixes)
    query_index = torch.zeros(segments, query_slots, dtype=torch.long)
    query_valid = torch.zeros(segments, query_slots, dtype=torch.bool)
    key_index = torch.zeros(segments, key_slots, dtype=torch.long)
    key_valid = torch.zeros(segments, key_slots, dtype=torch.bool)
    query_index[0, :prefix] = key_index[0, :prefix] = torch.arange(prefix)
    query_valid[0, :prefix] = key_valid[0, :prefix] = True
    for i, (start, n) in enumerate(zip(starts, suffixes), start=1):
        own = torch.arange(start, start + n)
        query_index[i, :n], query_valid[i, :n] = own, True
        key_index[i, :prefix], key_index[i, prefix : prefix + n] = torch.arange(prefix), own
        key_valid[i, : prefix + n] = True
    allowed = key_valid[:, None, :] & (positions[key_index][:, None, :] <= positions[query_index][:, :, None])
    allowed[:, :, 0] |= ~query_valid  # padding queries see one key (no NaN); their outputs are dropped
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))[:, None]
    unscatter = torch.empty(len(row_ids), dtype=torch.long)
    unscatter[query_index[query_valid]] = torch.arange(segments * query_slots).view(segments, -1)[query_valid]

    # Row i's label at position t is predicted from position t-1 >= prefix, in suffix i.
    next_labels = labels[:, 1:]
    hidden_index, targets = [], []
    for i, start in enumerate(starts):
        t = (next_labels[i] != IGNORE_INDEX).nonzero().flatten()
        hidden_index.append(start + t - prefix)
        targets.append(next_labels[i, t])
    layout = Layout(
        segments,
        query_slots,
        key_slots,
        query_index.flatten().to(device),
        key_index.flatten().to(device),
        mask.to(device),
        unscatter.to(device),
    )
    return SharedBatch(
        row_ids[None].to(device),
        positions[None].to(device),
        layout,
        torch.cat(hidden_index).to(device),
        torch.cat(targets).to(device),
    )


def segment_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    shared_prefix: Layout | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over (1, heads, N, dim) states, segment by segment as ``shared_prefix`` says."""
    layout = shared_prefix
    window = kwargs.get("sliding_window")
    if (
        layout is None
        or dropout
        or kwargs.get("softcap")
        or (window is not None and window < layout.key_slots)
    ):
        raise _Unsupported
    layout.calls += 1
    heads, dim, kv_heads = query.shape[1], query.shape[3], key.shape[1]
    groups = heads // kv_heads  # grouped-query attention: query heads g*i .. g*i+g-1 use key head i
    segments, query_slots, key_slots = layout.segments, layout.query_slots, layout.key_slots
    # The queries of a key head's group are stacked along the query axis, so keys and values are
    # never repeated (3% faster steps on SmolLM2, 9 query / 3 key heads): (segments, kv_heads,
    # groups * query_slots, dim) against (segments, kv_heads, key_slots, dim).
    q = query[0].index_select(1, layout.query_index).view(kv_heads, groups, segments, query_slots, dim)
    q = q.permute(2, 0, 1, 3, 4).reshape(segments, kv_heads, groups * query_slots, dim)
    k = key[0].index_select(1, layout.key_index).view(kv_heads, segments, key_slots, dim).transpose(0, 1)
    v = value[0].index_select(1, layout.key_index).view(kv_heads, segments, key_slots, dim).transpose(0, 1)
    # As transformers' eager attention (softmax in fp32), on every device: the groups are short.
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling + layout.grouped_mask(groups)
    out = torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
    out = out.view(segments, kv_heads, groups, query_slots, dim).permute(0, 3, 1, 2, 4)
    out = out.reshape(segments * query_slots, heads, dim)
    return out.index_select(0, layout.unscatter)[None], None


class _Unsupported(Exception):
    """The model asked for something segment attention does not do."""


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, segment_attention)


_register()


class SharedPrefix:
    """Runs causal-LM bodies on the one-row layout; checks the first time, and may switch off."""

    def __init__(self, say: Callable[[str], None] = print) -> None:
        self.enabled = True
        self.checked = False
        self.note: str | None = None  # why it was switched off
        self.say = say  # the training loop's: one copy of the note, from rank 0

    def hidden_and_targets(
        self, body: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Hidden states at labelled positions and their targets, or None to take the usual path."""
        if not self.enabled or "position_ids" in batch:
            return None
        prefix = shared_prefix_length(batch)
        if not prefix:
            return None
        shared = lay_out(batch, prefix)
        hidden = _run(body, shared)
        if hidden is None or shared.layout.calls == 0:
            self._switch_off(body, "its attention does not take the shared layout")
            return None
        selected = hidden[shared.hidden_index]
        if not self.checked:
            self.checked = True
            if not _agrees(body, batch, selected):
                self._switch_off(body, "it gives different outputs with it")
                return None
        return selected, shared.targets

    def _switch_off(self, body: nn.Module, why: str) -> None:
        self.enabled = False
        self.note = f"training.shared_prefix: off for {type(body).__name__}: {why}"
        self.say(self.note)


def _agrees(body: nn.Module, batch: dict[str, torch.Tensor], selected: torch.Tensor) -> bool:
    """Whether ``selected`` (the shared layout's outputs at labelled positions) matches the usual
    padded forward of ``batch`` within ``_CHECK_TOLERANCE``."""
    with torch.no_grad():
        usual = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        expected = usual[0][:, :-1][mask].float()
    return bool((selected.detach().float() - expected).abs().max() <= _CHECK_TOLERANCE * expected.abs().max())


def _run(body: nn.Module, shared: SharedBatch) -> torch.Tensor | None:
    """The body's last hidden states for the one row, (N, hidden); None if the model cannot."""
    config = body.config
    usual = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME  # read by every attention layer at call time
    try:
        out = body(
            input_ids=shared.input_ids,
            position_ids=shared.position_ids,
            use_cache=False,
            shared_prefix=shared.layout,
        )
    except _Unsupported:
        return None
    except TypeError as err:  # a forward that takes no extra keyword arguments; others are bugs
        if "shared_prefix" not in str(err):
            raise
        return None
    finally:
        config._attn_implementation = usual
    return out[0][0]


def shared_prefix_for(
    training: Any, strategy: str, model: nn.Module, say: Callable[[str], None] = print
) -> SharedPrefix | None:
    """A :class:`SharedPrefix` for a run with these ``training`` settings, or None where it does not
    apply (see the module docstring): the option is off, packing, FSDP, a method that adds virtual
    positions, or dropout."""
    if not training.shared_prefix or training.packing or strategy == "fsdp":
        return None
    if not getattr(model.base_model, "supports_packing", False) or not can_share(model):
        return None
    return SharedPrefix(say)


def can_share(model: nn.Module) -> bool:
    """No active dropout: every row's prefix would otherwise get the same dropout mask."""
    config = getattr(model, "config", None)
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return False
    return not getattr(config, "attention_dropout", 0)
