"""One numeric precision for training, train-time evaluation, ``peftkit eval``, ``generate`` and
``chat``, so that the same adapter gives the same greedy answers in all of them.

``auto`` (every command's default) is bf16 where the device computes it natively (CPUs with
AVX512-BF16 or AMX, recent GPUs) and fp32 elsewhere. bf16 means what training does
(``train/precision.py``): autocast to bf16, the base model's weights *stored* in bf16 (not only
cast per matmul: the embeddings' output and so the residual stream are then bf16 too), adapter
weights in fp32. Evaluating in fp32 an adapter trained this way measured different greedy answers
on the same prompts (a user's 0.105 vs 0.100 accuracy), so the commands store and cast alike.
bf16 results can also depend on which prompts share a batch (kernels block differently by shape):
evaluation uses ``evaluation.batch_size`` everywhere.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

import torch
from torch import nn

PRECISIONS = ("auto", "bf16", "fp32")


def resolve_autocast(
    precision: str,
    device: torch.device,
    *,
    key: str = "training.precision",
    note: Callable[[str], None] | None = None,
) -> torch.dtype | None:
    """The autocast dtype ``precision`` means on ``device`` (None: fp32). ``key`` names the setting
    in messages; ``note`` prints the remark on emulated bf16 (default: to stderr)."""
    from peftkit.errors import PeftkitError
    from peftkit.models import bf16_supported

    if precision not in PRECISIONS:
        raise PeftkitError(f"{key} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None
    supported = bf16_supported(device)
    if precision == "auto" or supported:
        return torch.bfloat16 if supported else None
    if device.type == "cpu":  # emulated: same results, only slower, so the user's choice stands
        (note or _stderr)(
            f"note: {key} is bf16, but this CPU has no native bfloat16 (AVX512-BF16 or AMX), "
            "so it is emulated and slower than fp32 (auto picks fp32 here)"
        )
        return torch.bfloat16
    raise PeftkitError(f"{key} is bf16 but {device} does not support bfloat16: use fp32")


def store_for_inference(model: nn.Module, dtype: torch.dtype | None, base_params: Iterable[int]) -> None:
    """Store the base model's floating-point weights (``base_params``: their ``id``s, taken before
    adapters were applied) in ``dtype`` and every other one (the adapters') in fp32, as training
    holds them. ``dtype`` None: nothing changes."""
    if dtype is None:
        return
    base = set(base_params)
    for param in model.parameters():
        if param.is_floating_point():
            wanted = dtype if id(param) in base else torch.float32
            if param.dtype != wanted:
                param.data = param.data.to(wanted)


def describe(dtype: torch.dtype | None) -> str:
    """How a model computes, for the line each command prints."""
    if dtype is None:
        return "fp32"
    name = str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float16", "fp16")
    return f"{name} (autocast; base weights stored in {name}, adapter weights fp32)"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
