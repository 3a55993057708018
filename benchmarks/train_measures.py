"""What benchmarks/train_throughput.py measures: the matmul peak, parameter counts, model FLOPs
(the formula is in that script's docstring), step timing, peak memory and held-out loss. Shared
by its workers."""

from __future__ import annotations

import resource
import time
from typing import Any


def param_counts(hf_model: Any) -> dict[str, int]:
    """Frozen matmul weights of the adapted model: the LM head and every other frozen linear layer.

    Call after the adapter is injected: its own (trainable) linear layers are left out here and
    counted as trainable parameters instead.
    """
    import torch

    head = hf_model.get_output_embeddings()
    body = sum(
        m.weight.numel()
        for m in hf_model.modules()
        if isinstance(m, torch.nn.Linear) and m is not head and not m.weight.requires_grad
    )
    cfg = hf_model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    d_attn = cfg.num_attention_heads * head_dim  # width of Q.K^T and of the attention-weighted V
    return {
        "frozen_body": body,
        "head": head.weight.numel(),
        "n_layers": cfg.num_hidden_layers,
        "d_attn": d_attn,
    }


def model_flops(batches: list[list[Any]], counts: dict[str, int], trained: int, dense_head: bool) -> float:
    total = 0.0
    for batch in batches:
        for ex in batch:
            s = len(ex.input_ids)
            labelled = sum(x != -100 for x in ex.labels[1:])
            head_tokens = s if dense_head else labelled
            total += 6 * trained * s + 4 * counts["frozen_body"] * s + 4 * counts["head"] * head_tokens
            total += 12 * counts["n_layers"] * counts["d_attn"] * s * s
    return total


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def timing_summary(
    stamps: list[float], batches: list[list[Any]], counts: dict[str, int], trained: int
) -> dict[str, Any]:
    """Steps 3..N: the window from the end of step 2 to the end of step N."""
    assert len(stamps) == len(batches), f"{len(stamps)} optimizer steps timed, {len(batches)} expected"
    timed = batches[2:]
    seconds = stamps[-1] - stamps[1]
    tokens = sum(len(ex.input_ids) for b in timed for ex in b)
    return {
        "timed_steps": len(timed),
        "timed_s": seconds,
        "step_time_s": seconds / len(timed),
        "step_times_s": [b - a for a, b in zip(stamps, stamps[1:])],
        "tokens_timed": tokens,
        "tokens_per_s": tokens / seconds,
        "trainable_params": trained,
        "param_counts": counts,
        "model_flops_timed": model_flops(timed, counts, trained, dense_head=False),
        "model_flops_timed_dense_head": model_flops(timed, counts, trained, dense_head=True),
    }


def heldout_loss(model: Any, examples: list[Any], pad_id: int, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy over completion tokens, fp32, no autocast.

    ``model`` is a plain transformers causal LM (adapters merged in). The head runs only at
    labelled positions: the same numbers as full logits, without projecting every prompt token
    onto the 49k vocabulary.
    """
    import torch
    import torch.nn.functional as F

    from peftkit.train.batching import collate

    model.float().eval()
    body, head = getattr(model, model.base_model_prefix), model.get_output_embeddings()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], pad_id)
            hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
            labels = batch["labels"][:, 1:]
            mask = labels != -100
            logits = head(hidden[:, :-1][mask]).float()  # (labelled tokens, vocab)
            total += float(F.cross_entropy(logits, labels[mask], reduction="sum"))
            count += int(mask.sum())
    return total / max(1, count)


def matmul_peak(threads: int | None, size: int, reps: int) -> dict[str, Any]:
    """The machine's ceiling: best-of-``reps`` GFLOP/s of square fp32 and bf16 matmuls."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    out: dict[str, Any] = {"matmul_size": size, "threads": torch.get_num_threads()}
    for name, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16)]:
        n = _affordable_size(dtype, size)
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        torch.mm(a, b)  # warm-up: thread pool, kernel selection
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
        out[f"{name}_gflops"] = 2 * n**3 / best / 1e9
        out[f"{name}_matmul_size"] = n
    return out


def _affordable_size(dtype: Any, n: int, seconds: float = 1.0) -> int:
    """``n``, halved until one n x n matmul should take under ``seconds``: a CPU without
    AVX512-BF16 or AMX emulates bf16 at well under 1 GFLOP/s (a 2048^2 matmul took 57 s)."""
    import torch

    probe = min(n, 256)
    a = torch.randn(probe, probe).to(dtype)
    torch.mm(a, a)
    start = time.perf_counter()
    torch.mm(a, a)
    per_flop = (time.perf_counter() - start) / (2 * probe**3)
    while n > probe and 2 * n**3 * per_flop > seconds:
        n //= 2
    return n
