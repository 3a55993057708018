"""One row per preference pair ("shared prompt"): each pair's prompt computed once, not twice.

The paired objectives (dpo, orpo, simpo) compare a chosen and a rejected completion of one
prompt. The two-row layout (data/preference_collate.py) runs the prompt in both rows; on the
benchmark's tweets the prompt is ~95% of the tokens. Here a pair is one row::

    two rows per pair (2B rows)                 one row per pair (B rows)
    [prompt | chosen   | pad]                   [prompt | chosen | rejected | pad]
    [prompt | rejected | pad]       ---->       position ids: 0 .. P+C-1, then P .. P+R-1 again
                                                attention: causal, but rejected never sees chosen

so every token sees exactly the tokens, at the positions, it sees in its own row of the two-row
layout, and the log-probs are the same (fp32: ~1e-6; tests/test_pair_layout.py). The attention
mask is a 4D ``[pairs, 1, L, L]`` mask built on the device from one small ``[pairs, L]`` tensor of
segment codes (prompt / chosen / rejected / padding): bool for sdpa, additive for eager, in the
dtype transformers itself would use. Its memory is that of the 4D mask transformers already builds
for a padded batch (B rows instead of 2B); for long rows (L in the thousands, ~L^2 bytes a pair)
a segment-wise attention as in train/shared_prefix.py would save it, at the price of gathers.

When it applies (decided once at training start, :func:`shared_prompt_for`): the method acts per
position (``supports_packing``: no virtual tokens or past key/values), no dropout anywhere in the
model (a token's dropout mask would be shared by both completions' prompt), a decoder whose body
takes ``position_ids`` and a 4D mask (attention eager or sdpa), and ``training.shared_prefix`` on
(the loop hands ``use_shared_prefix`` None when it is off, or when dropout or packing rule out the
SFT shared prefix too). Batches whose rows exceed a sliding attention window take two rows (a
custom mask replaces the window). The first pass with gradients and the first without (the
reference, validation) are also run the two-row way and compared; if they differ, the layout is
switched off for the run with a note (an architecture that derives positions or biases from a 2D
mask, e.g. ALiBi).

The batch keeps its 2B-row ``input_ids`` / ``attention_mask`` / ``labels``: the loop counts
tokens/s over chosen + rejected rows (comparable with TRL), the check and any fallback use them.
Training steps (policy and reference passes) and validation use the layout; the held-out
evaluation before and after training keeps two rows, as ``peftkit eval`` does, so that its
numbers are reproduced exactly (a preference accuracy flips on a margin's sign, and bf16 rounding
differs between layouts).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from peftkit.methods.tuner_base import TunerBase
from peftkit.train.loss import body_and_head
from peftkit.train.shared_prefix import can_share

PROMPT, CHOSEN, REJECTED, PADDING = 0, 1, 2, 3  # segment codes of ``pair_segments``
KEYS = ("pair_input_ids", "pair_position_ids", "pair_segments", "pair_hidden", "pair_targets", "pair_rows")
# Largest allowed |difference| of a row's log-prob per label token between the layouts, in nats.
# fp32: ~1e-6 apart. bf16 (SmolLM2-135M, tweets): 0 on most batches, up to 0.03, rounding in
# differently shaped matmuls. A wrong layout (rejected seeing chosen, positions not restarting):
# its worst row 1.4 to 4.2 apart on the same batches.
_TOLERANCE = {True: 1e-3, False: 0.2}  # fp32, lower precision


def lay_out_pairs(examples: Sequence[Any], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The one-row-per-pair tensors of ``examples`` (``PreferenceExample``: prompt_ids, chosen_ids,
    rejected_ids), right-padded to the longest pair:

    ``pair_input_ids`` / ``pair_position_ids`` / ``pair_segments``  (B, L)
    ``pair_hidden``   (N,) flat index into the B x L positions whose output predicts a label
    ``pair_targets``  (N,) that label; ``pair_rows`` (N,) its row in the two-row layout (i or B+i)

    Labels come chosen rows first, then rejected, each in order: the order of the two-row layout's
    ``labels[:, 1:]``. A completion token at row position 0 (an empty prompt) has no predicting
    position in either layout and is skipped in both."""
    pairs = len(examples)
    width = max(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    input_ids = torch.full((pairs, width), pad_token_id, dtype=torch.long)
    positions = torch.zeros((pairs, width), dtype=torch.long)
    segments = torch.full((pairs, width), PADDING, dtype=torch.int8)
    hidden: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    rows: list[torch.Tensor] = []
    chosen_side, rejected_side = [], []
    for i, e in enumerate(examples):
        p, c, r = len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids)
        n = p + c + r
        input_ids[i, :n] = torch.tensor(e.prompt_ids + e.chosen_ids + e.rejected_ids, dtype=torch.long)
        positions[i, : p + c] = torch.arange(p + c)
        positions[i, p + c : n] = torch.arange(p, p + r)
        segments[i, :p] = PROMPT
        segments[i, p : p + c] = CHOSEN
        segments[i, p + c : n] = REJECTED
        # Token j of a completion is predicted by the token before it: the prompt's last for j = 0.
        at_chosen = torch.arange(c) + p - 1
        at_rejected = torch.cat([torch.tensor([p - 1]), torch.arange(1, r) + p + c - 1])[:r]
        chosen_side.append((i, at_chosen, torch.tensor(e.chosen_ids, dtype=torch.long)))
        rejected_side.append((pairs + i, at_rejected, torch.tensor(e.rejected_ids, dtype=torch.long)))
    for row, at, tokens in chosen_side + rejected_side:
        keep = at >= 0
        pair = row % pairs
        hidden.append(pair * width + at[keep])
        targets.append(tokens[keep])
        rows.append(torch.full((int(keep.sum()),), row, dtype=torch.long))
    return {
        "pair_input_ids": input_ids,
        "pair_position_ids": positions,
        "pair_segments": segments,
        "pair_hidden": torch.cat(hidden),
        "pair_targets": torch.cat(targets),
        "pair_rows": torch.cat(rows),
    }


def pair_attention_mask(segments: torch.Tensor, eager: bool, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, L, L): query q may see key k <= q of the prompt or of its own segment. Padding
    queries see the prompt and earlier padding (never an empty row, whose softmax would be NaN and
    poison the backward); real queries never see padding, which comes after them."""
    width = segments.shape[1]
    index = torch.arange(width, device=segments.device)
    causal = index[None, :, None] >= index[None, None, :]
    query, key = segments[:, :, None], segments[:, None, :]
    allowed = (causal & ((key == PROMPT) | (key == query)))[:, None]
    if not eager:
        return allowed  # sdpa takes a bool mask (True: attend)
    # eager adds the mask to the scores: 0 or the dtype's minimum, as transformers' eager masks.
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min
    )


class SharedPrompt:
    """Runs pairs in one row each where :func:`shared_prompt_for` found the model able to; checks
    the first passes against the two-row layout, and may switch off."""

    def __init__(self, window: int | None, say: Callable[[str], None] = print) -> None:
        self.enabled = True
        self.window = window  # a sliding attention window, which the 4D mask would override
        self.checked: set[bool] = set()  # gradient modes (policy / reference) already compared
        self.note: str | None = None  # why it was switched off
        self.say = say

    def collate(self, examples: Sequence[Any], pad_token_id: int) -> dict[str, torch.Tensor]:
        return lay_out_pairs(examples, pad_token_id) if self.enabled else {}

    def hidden_and_targets(
        self, model: nn.Module, body: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Hidden states at the positions that predict labels, their targets and two-row rows; None
        to take the two rows (off, a batch collated without the layout, or rows past the window)."""
        if not self.enabled or "pair_input_ids" not in batch:
            return None
        if self.window is not None and batch["input_ids"].shape[1] > self.window:
            return None
        dtype = body.get_input_embeddings().weight.dtype  # what transformers' own masks use
        eager = body.config._attn_implementation == "eager"
        mask = pair_attention_mask(batch["pair_segments"], eager, dtype)
        ids, positions = batch["pair_input_ids"], batch["pair_position_ids"]
        tuner = getattr(model, "base_model", None)
        if isinstance(tuner, TunerBase):  # e.g. AdapterDrop draws its skipped layers per pass
            hidden = tuner.body_hidden_states(body, ids, mask, position_ids=positions)
        else:
            hidden = body(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)[0]
        selected = hidden.flatten(0, 1).index_select(0, batch["pair_hidden"])
        return selected, batch["pair_targets"], batch["pair_rows"]

    def agrees(
        self, sums: torch.Tensor, counts: torch.Tensor, fp32: bool, two_rows: Callable[[], torch.Tensor]
    ) -> bool:
        """Whether ``sums`` (this layout's) may be used: always once this gradient mode's first pass
        matched ``two_rows()`` (run here without gradients) within the precision's tolerance."""
        mode = torch.is_grad_enabled()
        if mode in self.checked:
            return True
        self.checked.add(mode)
        with torch.no_grad():
            expected = two_rows()
        gap = float(((sums.detach() - expected).abs() / counts.clamp(min=1)).max()) if len(sums) else 0.0
        if gap <= _TOLERANCE[fp32]:
            return True
        self.switch_off(f"its log-probs differ from the two-row layout's by {gap:.3g} nats per token")
        return False

    def switch_off(self, why: str) -> None:
        self.enabled = False
        self.note = f"training.shared_prefix: two rows per preference pair from now on: {why}"
        self.say(self.note)


def shared_prompt_for(model: nn.Module) -> SharedPrompt | str:
    """A :class:`SharedPrompt` for ``model`` (its ``say`` set by the caller), or why it cannot
    have one (see the module docstring)."""
    tuner = getattr(model, "base_model", None)
    if isinstance(tuner, TunerBase) and not tuner.supports_packing:
        return f"{type(tuner).__name__} adds virtual tokens or past key/values to each row"
    if not can_share(model):
        return "dropout is active (one mask would be shared by both completions' prompt)"
    parts = body_and_head(model)
    if parts is None:
        return "the model has no separate body and output layer"
    body = parts[0]
    config = body.config
    if getattr(config, "is_encoder_decoder", False):
        return "it is not a decoder-only model"
    attention = config._attn_implementation
    if attention not in ("eager", "sdpa"):
        return f"attention {attention!r} takes no 4D mask (eager and sdpa do)"
    if "position_ids" not in inspect.signature(body.forward).parameters:
        return f"{type(body).__name__} takes no position_ids"
    return SharedPrompt(_sliding_window(config))


def _sliding_window(config: Any) -> int | None:
    """The attention window of any layer, or None. transformers applies it in the masks it builds;
    a custom 4D mask replaces them, so rows longer than the window must take two rows."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)
