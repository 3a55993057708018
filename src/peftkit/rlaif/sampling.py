"""Sampling answers from the model being trained (or any causal LM), reproducibly.

::

    prompts (token ids) --repeat each num_generations times--> batches of ``sampling.batch_size``
    sequences, longest first, one ``generate`` each (left-padded, KV cache, adapters as loaded:
    unmerged) --> per prompt, its group of :class:`SampledAnswer` (token ids through the end token)

Every answer has its own random stream, seeded by the caller per answer (the training loop: the
training seed, the step, the prompt's place in the step's global batch, the answer's number):
:class:`SeededSampler` draws one uniform number per token from it and takes the token where the
cumulative probability (after temperature, top-k and top-p) passes it. An answer therefore does
not depend on which other answers share its batch, its micro-batch or its process: gradient
accumulation and torchrun sample the same answers as one process (up to the float rounding of
the logits themselves), an interrupted run resumes with the same samples, and the caller's RNG
(dropout, data order) is never touched.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessorList

from peftkit.evaluation import _eos_ids, generate_token_ids
from peftkit.rlaif.config import SamplingConfig


@dataclass
class SampledAnswer:
    """One sampled completion."""

    ids: list[int]  # its tokens, through the end token when the model stopped
    text: str  # decoded without special tokens, stripped
    finished: bool  # False: cut at max_completion_length


def step_seed(*parts: int) -> int:
    """A 63-bit seed from integers (training seed, step, rank): independent streams per step."""
    digest = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class SeededSampler:
    """A transformers logits processor that samples each row's next token from the row's own
    generator (inverse-CDF: one uniform draw per token) and leaves only that token possible, so
    that greedy decoding picks it. Temperature, then top-k, then top-p, as transformers orders them."""

    def __init__(self, seeds: Sequence[int], cfg: SamplingConfig):
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.cfg = cfg

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float() / self.cfg.temperature  # (rows, vocab)
        if self.cfg.top_k is not None and self.cfg.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.cfg.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        probs = torch.softmax(logits, dim=-1)
        if self.cfg.top_p < 1.0:
            ordered, order = torch.sort(probs, dim=-1, descending=True)
            before = ordered.cumsum(-1) - ordered  # mass of the likelier tokens: keep while < top_p
            ordered = ordered.masked_fill(before >= self.cfg.top_p, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, ordered)
        probs = probs / probs.sum(-1, keepdim=True)
        draws = torch.cat([torch.rand(1, generator=g) for g in self.generators]).to(probs.device)
        cumulative = probs.cumsum(-1)
        chosen = torch.searchsorted(cumulative, draws.unsqueeze(-1).to(cumulative.dtype)).clamp(
            max=probs.shape[-1] - 1
        )
        # A token of probability 0 is never chosen: searchsorted lands on the first index whose
        # cumulative mass reaches the draw, and a zero-mass token does not raise it.
        out = torch.full_like(scores, -math.inf)
        return out.scatter(-1, chosen, 0.0)


def sample_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    *,
    seeds: Sequence[int] | None = None,
    autocast_dtype: torch.dtype | None = None,
    num_generations: int | None = None,
    greedy: bool = False,
    progress: bool | None = False,
) -> list[list[SampledAnswer]]:
    """``num_generations`` (default ``cfg``'s) answers per prompt, in the prompts' order, answer g
    of prompt i sampled with seed ``step_seed(seeds[i], g)``; ``greedy``: one deterministic answer
    per prompt instead (held-out evaluation; no seeds)."""
    count = 1 if greedy else num_generations or cfg.num_generations
    if not greedy and (seeds is None or len(seeds) != len(prompts)):
        raise ValueError("sampling needs one seed per prompt")
    repeated = [list(p) for p in prompts for _ in range(count)]
    row_seeds = [] if greedy else [step_seed(seed, g) for seed in seeds for g in range(count)]
    eos = _eos_ids(model, tokenizer, None)
    # Longest first, in batches of cfg.batch_size (few pads); each batch's sampler gets its rows' seeds.
    # The sort is stable: a prompt's answers stay together, and batches of whole groups keep them
    # in one batch, whose prompt pass then runs once per prompt (shared_prompt_cache).
    order = sorted(range(len(repeated)), key=lambda i: len(repeated[i]), reverse=True)
    rows: list[list[int]] = [[] for _ in repeated]
    share = count > 1 and _acts_per_position(model)
    size = max(count, cfg.batch_size // count * count) if share else cfg.batch_size
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        options: dict[str, Any] = {}
        if not greedy:
            options["logits_processor"] = LogitsProcessorList(
                [SeededSampler([row_seeds[i] for i in chunk], cfg)]
            )
        if share:
            options[_cache_name(model)] = shared_prompt_cache(
                model, tokenizer, [repeated[i] for i in chunk[::count]], count, autocast_dtype
            )
        found = generate_token_ids(
            model,
            tokenizer,
            [repeated[i] for i in chunk],
            max_new_tokens=cfg.max_completion_length,
            batch_size=len(chunk),
            eos_token_id=eos,
            autocast_dtype=autocast_dtype,
            progress=progress,
            **options,
        )
        for i, ids in zip(chunk, found):
            rows[i] = ids
    answers = [
        SampledAnswer(
            ids,
            tokenizer.decode(ids, skip_special_tokens=True).strip(),
            bool(ids) and ids[-1] in eos,
        )
        for ids in rows
    ]
    return [answers[i * count : (i + 1) * count] for i in range(len(prompts))]


def _acts_per_position(model: Any) -> bool:
    """Whether the model's prompt pass may be cached and reused (see ``acts_per_position``)."""
    from peftkit.methods.tuner_base import acts_per_position

    return acts_per_position(model)


def shared_prompt_cache(
    model: Any, tokenizer: Any, prompts: list[list[int]], count: int, autocast_dtype: torch.dtype | None
) -> Any:
    """The KV cache of each prompt's tokens but its last, computed once per prompt and repeated
    for its ``count`` answers (rows of a prompt consecutive, as ``generate`` gets them), so that
    ``generate`` runs only the last prompt token and the answers. Rows are left-padded to the
    longest prompt as generate_token_ids pads them, with positions from the mask as ``generate``
    computes them."""
    from peftkit.evaluation import _inference, _pad, _pad_id

    device = next(model.parameters()).device
    pad = _pad_id(tokenizer, None)
    input_ids = _pad(prompts, pad, left=True).to(device)[:, :-1]
    mask = _pad([[1] * len(p) for p in prompts], 0, left=True).to(device)[:, :-1]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with _inference(model, device, autocast_dtype):
        out = model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
    cache = out[_cache_name(model)]
    cache.batch_repeat_interleave(count)
    return cache


def _cache_name(model: Any) -> str:
    """``cache`` (transformers >= 5.25) or ``past_key_values``: see peftkit.transformers_compat."""
    from peftkit.transformers_compat import CACHE_KEYWORDS, cache_keyword

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return cache_keyword(inner) or CACHE_KEYWORDS[-1]
