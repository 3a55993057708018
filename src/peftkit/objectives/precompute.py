"""``preference.reference: precompute``: the reference log-probs of every pair, computed once.

Before the first step, the starting model (the reference: adapter disabled, or init_adapter's
weights) scores the chosen and rejected completion of every example of every split, in
evaluation batches without gradients, under the training precision. The values travel with the
examples (``PreferenceExample.ref``) into each batch (``ref_logps``), so training runs no
reference pass and needs no second copy of the weights (full fine-tuning).

They are stored with the run (``reference_logps.safetensors``: one ``[examples, 2]`` tensor per
split) and a resumed run reads them back instead of recomputing.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from peftkit.io import atomic_file
from peftkit.objectives.sequence import Reference

REFERENCE_FILE = "reference_logps.safetensors"
SPLITS = ("train", "validation", "test")


def attach_reference_logps(
    task: Any,
    model: Any,
    reference: Reference,
    *,
    data: Any,
    run_dir: Path,
    world: Any,
    autocast_dtype: torch.dtype | None,
    batch_size: int,
    pad_token_id: int,
    resume: bool = False,
    **_: Any,
) -> str:
    """Give every example its reference log-probs (read from the run when resuming); the log line."""
    from safetensors.torch import load_file, save

    path = Path(run_dir) / REFERENCE_FILE
    stored = load_file(str(path)) if resume and path.is_file() else {}
    found = "read from" if stored else "computed once, stored in"
    for split in SPLITS:
        examples = getattr(data, split) or []
        if not examples:
            continue
        values = stored.get(split)
        if values is None or values.shape != (len(examples), 2):
            values = _compute(task, model, reference, examples, autocast_dtype, batch_size, pad_token_id)
            stored[split] = values
            found = "computed once, stored in"
        for example, (chosen, rejected) in zip(examples, values.tolist()):
            example.ref = (chosen, rejected)
    if world.is_main and found.startswith("computed"):
        with atomic_file(path, "wb") as handle:
            handle.write(save({k: v.contiguous() for k, v in stored.items()}))
    return f"{reference.name}, log-probs {found} {path}"


def _compute(
    task: Any,
    model: Any,
    reference: Reference,
    examples: list[Any],
    autocast_dtype: torch.dtype | None,
    batch_size: int,
    pad_token_id: int,
) -> torch.Tensor:
    device = next(model.parameters()).device
    cast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    was_training = model.training
    # Reference.logps turns dropout off; in training mode, what depends on the mode for another
    # reason (bitsandbytes' 8-bit kernels on the CPU) computes as the training steps' policy does.
    model.train()
    rows = []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            for example in chunk:
                example.ref = None  # collate from the tokens only
            batch = {k: v.to(device) for k, v in task.collate(chunk, pad_token_id).items()}
            with cast:
                logps = reference.logps(model, batch)[0].float().cpu()
            pairs = len(chunk)
            rows.append(torch.stack([logps[:pairs], logps[pairs:]], dim=1))
    finally:
        model.train(was_training)
    return torch.cat(rows)
