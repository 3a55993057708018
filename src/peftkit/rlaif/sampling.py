"""Sampling answers from the model being trained (or any causal LM), reproducibly.

::

    prompts (token ids) --repeat each num_generations times--> one ``generate`` per batch of
    ``sampling.batch_size`` sequences (left-padded, KV cache, adapters as loaded: unmerged)
    --> per prompt, its group of :class:`SampledAnswer` (token ids through the end token)

The random draws come from a generator state seeded by ``seed`` alone (``torch.random.fork_rng``):
the same seed gives the same answers, and the caller's RNG stream (dropout, data order) is left
exactly where it was. The training loop seeds each step with (training.seed, step, rank), so an
interrupted run resumes with the same samples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

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


def sample_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    *,
    seed: int,
    autocast_dtype: torch.dtype | None = None,
    num_generations: int | None = None,
    greedy: bool = False,
    progress: bool | None = False,
) -> list[list[SampledAnswer]]:
    """``num_generations`` (default ``cfg``'s) answers per prompt, in the prompts' order; ``greedy``:
    one deterministic answer per prompt instead (held-out evaluation)."""
    count = 1 if greedy else num_generations or cfg.num_generations
    repeated = [list(p) for p in prompts for _ in range(count)]
    eos = _eos_ids(model, tokenizer, None)
    options: dict[str, Any] = {}
    if not greedy:
        options = dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k or 0)
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        rows = generate_token_ids(
            model,
            tokenizer,
            repeated,
            max_new_tokens=cfg.max_completion_length,
            batch_size=cfg.batch_size,
            eos_token_id=eos,
            autocast_dtype=autocast_dtype,
            progress=progress,
            **options,
        )
    answers = [
        SampledAnswer(
            ids,
            tokenizer.decode(ids, skip_special_tokens=True).strip(),
            bool(ids) and ids[-1] in eos,
        )
        for ids in rows
    ]
    return [answers[i * count : (i + 1) * count] for i in range(len(prompts))]
