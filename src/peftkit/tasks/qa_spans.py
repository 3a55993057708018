"""Extractive QA spans: answer characters <-> token positions, for training labels and predictions.

A fast tokenizer encodes ``(question, context)`` and reports per token its character ``offsets``
into its own text and its ``sequence_ids`` (None for special tokens, 0 question, 1 context)::

    tokens        [CLS]  what  is   it   ?   [SEP]  paris  is  the  capital  [SEP]  [PAD]
    sequence_ids   None   0    0    0    0   None    1     1    1     1      None   None
    offsets        (0,0) (0,4)(5,7)(8,10)(10,11)(0,0) (0,5) (6,8)(9,12)(13,20)  (0,0)  (0,0)
                                                      └── answer "Paris": chars [0, 5) -> tokens (6, 6)

Training wants the answer as inclusive token indices (``answer_token_span``); inference turns the
model's per-token start/end logits back into a context substring (``best_span``), also across the
overflow windows of a long context (``best_span_over_windows``). Offsets index the text of the
sequence they belong to, so only context tokens' offsets are ever used against ``context``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

NO_ANSWER = (0, 0)  # transformers' convention: an answer outside the window points at [CLS]


def _to_list(values: Any, what: str) -> list[Any]:
    """Plain Python list from a list, tuple, numpy array or torch tensor (any device or dtype)."""
    if hasattr(values, "detach"):  # torch.Tensor: leave autograd, cast bf16/fp16, leave the GPU
        values = values.detach().float().cpu() if values.is_floating_point() else values.detach().cpu()
    if hasattr(values, "tolist"):
        values = values.tolist()
    try:
        return list(values)
    except TypeError as error:
        raise TypeError(
            f"{what} must be a sequence (list, numpy array or torch tensor), got {values!r}"
        ) from error


def _context_tokens(sequence_ids: Sequence[int | None], context_id: int) -> list[int]:
    """Indices of the tokens of sequence ``context_id`` (the context), in order."""
    return [i for i, seq in enumerate(_to_list(sequence_ids, "sequence_ids")) if seq == context_id]


def answer_token_span(
    offsets: Sequence[tuple[int, int]],
    sequence_ids: Sequence[int | None],
    start_char: int,
    end_char: int,
    context_id: int = 1,
    no_answer: tuple[int, int] = NO_ANSWER,
) -> tuple[int, int]:
    """Inclusive ``(start_token, end_token)`` of the context characters ``[start_char, end_char)``.

    ``end_char`` is exclusive (``start_char + len(answer_text)``, as SQuAD's ``answer_start`` gives
    it). The span covers every context token that overlaps the answer: the start token is the last
    context token starting at or before ``start_char``, the end token the first ending at or after
    ``end_char``. When the answer is not entirely inside this window's context tokens (truncated,
    or in another overflow window) the result is ``no_answer``, ``(0, 0)`` = the [CLS] position.
    """
    if end_char < start_char:
        raise ValueError(f"end_char {end_char} is before start_char {start_char}; end_char is exclusive")
    spans = _to_list(offsets, "offsets")
    seq_ids = _to_list(sequence_ids, "sequence_ids")
    if len(spans) != len(seq_ids):
        raise ValueError(
            f"got {len(spans)} offsets for {len(seq_ids)} sequence ids; pass one of each per token"
        )
    context = _context_tokens(seq_ids, context_id)
    if not context or spans[context[0]][0] > start_char or spans[context[-1]][1] < end_char:
        return no_answer
    start = max(i for i in context if spans[i][0] <= start_char)
    end = min(i for i in context if spans[i][1] >= end_char)
    return start, max(start, end)  # max: an empty answer between two tokens still gets one token


def _best_scored_span(
    start_logits: Any,
    end_logits: Any,
    offsets: Sequence[tuple[int, int]],
    sequence_ids: Sequence[int | None],
    max_answer_length: int,
    n_best: int,
    context_id: int,
) -> tuple[float, int, int] | None:
    """Best ``(score, start_char, end_char)`` of one window, score = start logit + end logit.

    transformers' QA post-processing: take the ``n_best`` highest start and end logits, keep pairs
    with start <= end, both context tokens, at most ``max_answer_length`` tokens long, pick the
    highest sum. Non-context tokens are dropped BEFORE taking the top ``n_best`` (as the QA pipeline
    masks them), so high logits on question or special tokens never crowd out the answer.
    Ties go to the earlier start, then the earlier end.
    """
    starts = _to_list(start_logits, "start_logits")
    ends = _to_list(end_logits, "end_logits")
    spans = _to_list(offsets, "offsets")
    seq_ids = _to_list(sequence_ids, "sequence_ids")
    if not (len(starts) == len(ends) == len(spans) == len(seq_ids)):
        raise ValueError(
            f"one window must give one start logit, end logit, offset and sequence id per token; got "
            f"{len(starts)} start logits, {len(ends)} end logits, {len(spans)} offsets, {len(seq_ids)} sequence ids"
        )
    if any(isinstance(x, list) for x in starts[:1] + ends[:1]):
        raise ValueError("start_logits / end_logits must be 1-D (one window); use best_span_over_windows")
    context = _context_tokens(seq_ids, context_id)
    top_starts = sorted(context, key=lambda i: (-starts[i], i))[:n_best]
    top_ends = sorted(context, key=lambda i: (-ends[i], i))[:n_best]
    best: tuple[float, int, int] | None = None
    for s in sorted(top_starts):
        for e in sorted(top_ends):
            if e < s or e - s + 1 > max_answer_length:
                continue
            score = float(starts[s]) + float(ends[e])
            if best is None or score > best[0]:
                best = (score, int(spans[s][0]), int(spans[e][1]))
    return best


def _check_limits(max_answer_length: int, n_best: int) -> None:
    if max_answer_length < 1:
        raise ValueError(f"max_answer_length is {max_answer_length}; it counts tokens and must be >= 1")
    if n_best < 1:
        raise ValueError(f"n_best is {n_best}; it must be >= 1 (transformers' default is 20)")


def best_span(
    start_logits: Any,
    end_logits: Any,
    offsets: Sequence[tuple[int, int]],
    sequence_ids: Sequence[int | None],
    context: str,
    max_answer_length: int = 30,
    n_best: int = 20,
    context_id: int = 1,
) -> str:
    """The highest-scoring valid answer span of one window, as a substring of ``context``.

    Logits may be lists, numpy arrays or torch tensors of shape (seq_len,). A span is valid when
    start <= end, both are context tokens and it has at most ``max_answer_length`` tokens; its score
    is ``start_logits[start] + end_logits[end]``. Returns "" when no valid span exists among the
    ``n_best`` best start and end candidates (or the window holds no context token).
    """
    _check_limits(max_answer_length, n_best)
    best = _best_scored_span(
        start_logits, end_logits, offsets, sequence_ids, max_answer_length, n_best, context_id
    )
    return "" if best is None else context[best[1] : best[2]]


def best_span_over_windows(
    start_logits: Sequence[Any] | Any,
    end_logits: Sequence[Any] | Any,
    offsets: Sequence[Sequence[tuple[int, int]]],
    sequence_ids: Sequence[Sequence[int | None]],
    context: str,
    max_answer_length: int = 30,
    n_best: int = 20,
    context_id: int = 1,
) -> str:
    """The best answer over all overflow windows of ONE example (a long context split with
    ``return_overflowing_tokens=True, stride=...``): each window's best span as in ``best_span``,
    then the highest raw score across windows (transformers' ``postprocess_qa_predictions``).

    ``start_logits`` / ``end_logits`` are (n_windows, seq_len) -- a 2-D array/tensor or a list of
    1-D ones -- and ``offsets[w]`` / ``sequence_ids[w]`` belong to window ``w``. Every window's
    offsets index the same ``context``. Ties go to the earlier window.
    """
    _check_limits(max_answer_length, n_best)
    starts, ends = _to_list(start_logits, "start_logits"), _to_list(end_logits, "end_logits")
    windows = _to_list(offsets, "offsets")
    seq_ids = _to_list(sequence_ids, "sequence_ids")
    if not (len(starts) == len(ends) == len(windows) == len(seq_ids)):
        raise ValueError(
            f"got {len(starts)} start-logit rows, {len(ends)} end-logit rows, {len(windows)} offset lists and "
            f"{len(seq_ids)} sequence-id lists; pass one of each per window"
        )
    best: tuple[float, int, int] | None = None
    for window in zip(starts, ends, windows, seq_ids):
        candidate = _best_scored_span(*window, max_answer_length, n_best, context_id)
        if candidate is not None and (best is None or candidate[0] > best[0]):
            best = candidate
    return "" if best is None else context[best[1] : best[2]]
