"""Metrics on held-out data: token-weighted loss / perplexity and greedy-generation accuracy.

Examples are duck-typed (see :class:`Example`): the data package's rows, a test's dataclass or
anything else with those attributes. Models are anything with the transformers
``forward(input_ids=, attention_mask=)`` / ``generate(...)`` API, so a plain transformers
model and an adapter wrapper are evaluated alike.

Padding differs on purpose: loss batches pad on the *right* (positions of real tokens stay
0..n-1, padded label positions are -100), generation batches pad on the *left* so that every
row's next token is appended at the same column.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F

from peftkit.answer_match import MATCH_MODES as MATCH_MODES  # re-exported: the modes' old home
from peftkit.answer_match import MatchOptions, match_flags

IGNORE_INDEX = -100


class Example(Protocol):
    """What evaluation reads from a data row."""

    input_ids: list[int]
    labels: list[int]  # same length as input_ids; IGNORE_INDEX where no loss is taken
    origin: str  # where the row came from ("train.jsonl:12"), for error messages
    prompt_ids: list[int]  # the prompt up to and including the assistant generation prompt
    answer: str | None  # the expected completion text, if known


class GenerationSample(NamedTuple):
    """One generated answer next to what was expected, and whether it matched (unpacks as a 4-tuple)."""

    prompt: str
    prediction: str
    answer: str
    correct: bool = False


def evaluate_loss(
    model: Any,
    examples: Sequence[Example],
    *,
    batch_size: int,
    pad_token_id: int,
    autocast_dtype: torch.dtype | None = None,
    progress: bool | None = None,
) -> dict[str, float]:
    """Cross-entropy over all label tokens of ``examples``, averaged per token (not per batch).

    Returns ``{"loss", "perplexity", "tokens"}``; ``tokens`` counts predicted label tokens
    (labels are shifted by one, as in transformers' causal LM loss). ``progress=None`` shows a
    bar only on a terminal.
    """
    if not examples:
        raise ValueError("evaluate_loss got no examples; check the evaluation data file and split")
    for example in examples:
        if len(example.input_ids) != len(example.labels):
            raise ValueError(
                f"{_origin(example)}: input_ids has {len(example.input_ids)} tokens but labels has "
                f"{len(example.labels)}; they must align (use {IGNORE_INDEX} where no loss is taken)"
            )
    device = _device_of(model)
    # Longest first: an out-of-memory batch size shows up on the first batch, not the last.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids), reverse=True)
    loss_sum = torch.zeros((), dtype=torch.float64)
    tokens = 0
    with _inference(model, device, autocast_dtype), _progress(len(examples), "eval loss", progress) as bar:
        for batch in _chunks(order, batch_size):
            rows = [examples[i] for i in batch]
            input_ids = _pad([r.input_ids for r in rows], pad_token_id, left=False).to(device)
            labels = _pad([r.labels for r in rows], IGNORE_INDEX, left=False).to(device)
            attention_mask = _pad([[1] * len(r.input_ids) for r in rows], 0, left=False).to(device)
            logits = _logits(model(input_ids=input_ids, attention_mask=attention_mask))  # (batch, seq, vocab)
            # Soft prompts (prompt tuning, P-tuning) prepend virtual tokens: their positions come first.
            logits = logits[:, logits.shape[1] - input_ids.shape[1] :]
            targets = labels[:, 1:]  # position t predicts token t+1
            mask = targets != IGNORE_INDEX
            picked = logits[:, :-1][mask].float()  # (label tokens, vocab): only where loss is taken
            loss_sum += F.cross_entropy(picked, targets[mask], reduction="sum").double().cpu()
            tokens += int(mask.sum())
            bar.update(len(rows))
    if tokens == 0:
        raise ValueError(
            f"none of the {len(examples)} examples has a label token (all labels are {IGNORE_INDEX}); "
            "check how the data is masked"
        )
    loss = float(loss_sum) / tokens
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf, "tokens": tokens}


def generate_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    pad_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool | None = None,
    adapter_names: Sequence[str] | None = None,
    **generate_kwargs: Any,
) -> list[str]:
    """Complete each token-id prompt; return only the new text, decoded and stripped.

    ``adapter_names`` (LoRA mixed-adapter batches): the adapter for each prompt, ``"__base__"``
    for none; they travel with their prompts through the length sorting.

    Greedy unless ``generate_kwargs`` say otherwise (e.g. ``do_sample=True, temperature=0.7``;
    a ``streamer`` works with ``batch_size=1``). Prompts are sorted by length so that batches
    carry few pad tokens; results come back in the input order. Generation stops at any of
    the tokenizer's and the model's eos tokens.
    """
    eos = _eos_ids(model, tokenizer, eos_token_id)
    rows = generate_token_ids(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        pad_token_id=pad_token_id,
        eos_token_id=eos,
        autocast_dtype=autocast_dtype,
        progress=progress,
        adapter_names=adapter_names,
        **generate_kwargs,
    )
    return [tokenizer.decode(_cut_at_eos(tokens, eos), skip_special_tokens=True).strip() for tokens in rows]


def generate_token_ids(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    pad_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool | None = None,
    adapter_names: Sequence[str] | None = None,
    **generate_kwargs: Any,
) -> list[list[int]]:
    """The new token ids of each prompt's completion, up to and including the first eos token
    (all ``max_new_tokens`` of them where none came); see :func:`generate_completions`."""
    for prompt in prompts:
        if len(prompt) == 0:
            raise ValueError("cannot generate from an empty prompt; every prompt needs at least one token")
    pad = _pad_id(tokenizer, pad_token_id)
    eos = _eos_ids(model, tokenizer, eos_token_id)
    kwargs = {"do_sample": False, "use_cache": True, **generate_kwargs}
    if not kwargs["do_sample"]:
        # Unset sampling knobs a model's generation_config may carry; greedy ignores them anyway.
        kwargs.update({"temperature": None, "top_p": None, "top_k": None})
    if adapter_names is not None and len(adapter_names) != len(prompts):
        raise ValueError(
            f"got {len(adapter_names)} adapter names for {len(prompts)} prompts: give one per prompt"
        )
    device = _device_of(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    results: list[list[int]] = [[] for _ in prompts]
    with (
        _inference(model, device, autocast_dtype),
        _contiguous_head_input(model),
        _progress(len(prompts), "generating", progress) as bar,
    ):
        for batch in _chunks(order, batch_size):
            rows = [list(prompts[i]) for i in batch]
            input_ids = _pad(rows, pad, left=True).to(device)  # (batch, longest prompt)
            attention_mask = _pad([[1] * len(r) for r in rows], 0, left=True).to(device)
            if adapter_names is not None:
                kwargs["adapter_names"] = [adapter_names[i] for i in batch]
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=eos,
                **kwargs,
            )
            new_tokens = output[:, input_ids.shape[1] :].tolist()  # (batch, <= max_new_tokens)
            for i, tokens in zip(batch, new_tokens):
                results[i] = _through_eos(tokens, eos)
            bar.update(len(rows))
    return results


def generate_answers(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
    progress: bool | None = None,
    **generate_kwargs: Any,
) -> list[str]:
    """Greedy completions of each example's ``prompt_ids`` (see :func:`generate_completions`)."""
    return generate_completions(
        model,
        tokenizer,
        [ex.prompt_ids for ex in examples],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        autocast_dtype=autocast_dtype,
        progress=progress,
        **generate_kwargs,
    )


def answer_accuracy(
    predictions: Sequence[str],
    answers: Sequence[str],
    match: str = "first_word",
    match_options: MatchOptions | None = None,
) -> float:
    """The fraction of predictions that match their answer under match mode ``match``.

    The modes and their options are described in :mod:`peftkit.answer_match`.
    """
    if not predictions and not answers:
        raise ValueError("answer_accuracy needs at least one prediction/answer pair")
    flags = match_flags(predictions, answers, match, match_options)
    return sum(flags) / len(flags)


def evaluate_generation(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    match: str = "first_word",
    match_options: MatchOptions | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Generate for every example that has an ``answer``; return accuracy and all samples.

    Returns ``{"accuracy", "n", "samples"}`` where ``samples`` holds one
    :class:`GenerationSample` (prompt text, prediction, answer, correct) per evaluated example,
    in order. Examples without an answer are skipped and not counted in ``n``. ``match`` and
    ``match_options``: see :mod:`peftkit.answer_match`.
    """
    match_flags([], [], match, match_options)  # a bad mode or option fails before generating
    rows = [ex for ex in examples if ex.answer is not None]
    if not rows:
        raise ValueError(
            f"none of the {len(examples)} examples has an expected answer, so generation accuracy "
            "cannot be measured; it needs rows whose last message is the assistant's answer"
        )
    predictions = generate_answers(
        model,
        tokenizer,
        rows,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        autocast_dtype=autocast_dtype,
        progress=progress,
    )
    answers = [str(ex.answer) for ex in rows]
    correct = match_flags(predictions, answers, match, match_options)
    samples = [
        GenerationSample(tokenizer.decode(ex.prompt_ids, skip_special_tokens=False), pred, ans, flag)
        for ex, pred, ans, flag in zip(rows, predictions, answers, correct)
    ]
    return {"accuracy": sum(correct) / len(rows), "n": len(rows), "samples": samples}


# --- helpers -------------------------------------------------------------------------------


def _pad(rows: Sequence[Sequence[int]], value: int, *, left: bool) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            if left:
                out[i, width - len(row) :] = torch.as_tensor(row, dtype=torch.long)
            else:
                out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


def _device_of(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _pad_id(tokenizer: Any, pad_token_id: int | None) -> int:
    for candidate in (pad_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ValueError("the tokenizer has neither a pad nor an eos token; pass pad_token_id explicitly")


def _eos_ids(model: Any, tokenizer: Any, eos_token_id: int | list[int] | None) -> list[int]:
    """The eos ids to stop at: the caller's, else the tokenizer's and the generation config's."""
    if eos_token_id is not None:
        return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    for value in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and token not in ids:
                ids.append(int(token))
    return ids


def _cut_at_eos(tokens: list[int], eos: list[int]) -> list[int]:
    for position, token in enumerate(tokens):
        if token in eos:
            return tokens[:position]
    return tokens


def _through_eos(tokens: list[int], eos: list[int]) -> list[int]:
    """``tokens`` up to and including the first eos (the padding generate adds after it dropped)."""
    for position, token in enumerate(tokens):
        if token in eos:
            return tokens[: position + 1]
    return tokens


def _origin(example: Any) -> str:
    return getattr(example, "origin", None) or "an example"


@contextlib.contextmanager
def _contiguous_head_input(model: Any) -> Iterator[None]:
    """Generation's first forward applies the output layer to ``hidden[:, -1:]``, a strided view:
    torch's matmul cannot fold its batch dimension then, and expands the (vocab x hidden) weight
    to one copy per row for a batched matmul instead (SmolLM2: 16 rows -> a 0.9 GB copy, 2.6 s of
    a 5 s generate call on a CPU, measured). A contiguous input makes it one matmul."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, torch.nn.Module):
        yield
        return
    handle = head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _inference(model: Any, device: torch.device, autocast_dtype: torch.dtype | None) -> Iterator[None]:
    """Eval mode, no gradients, optional autocast; the caller's train/eval mode is restored."""
    was_training = getattr(model, "training", False)
    model.eval()
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    try:
        with torch.no_grad(), autocast:
            yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _progress(total: int, desc: str, enabled: bool | None) -> Iterator[Any]:
    from tqdm.auto import tqdm

    # disable=None lets tqdm hide the bar when stderr is not a terminal (logs, CI, pipes). Under
    # torchrun every rank but 0 stays silent: FSDP evaluates on all of them at once.
    if enabled is None and os.environ.get("RANK", "0") != "0":
        enabled = False
    bar = tqdm(
        total=total, desc=desc, unit="ex", disable=None if enabled is None else not enabled, leave=False
    )
    try:
        yield bar
    finally:
        bar.close()
