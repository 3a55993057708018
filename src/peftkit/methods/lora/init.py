"""LoRA initialisations that move part of the base weight into the adapter (PiSSA, OLoRA).

Both split the frozen weight ``W`` (out, in) into ``W_res + scaling * B @ A`` so the model's output
is unchanged at the start, but the adapter begins on ``W``'s principal directions:

    pissa           A = sqrt(S_r) U_r^T,  B = V_r sqrt(S_r)   from the top-r SVD (S divided by scaling)
    pissa_niter_N   the same from ``torch.svd_lowrank`` with N subspace iterations (fast, approximate)
    olora           A = R[:r],  B = Q[:, :r]                  from the QR decomposition W = Q R

The base weight is overwritten with ``W_res`` (as PEFT does): save the residual base model too, or
the adapter will not reproduce its outputs on the original one.
"""

from __future__ import annotations

import torch

from peftkit.methods.lora.config import PISSA_NITER, is_weight_moving_init

__all__ = ["is_weight_moving_init", "split_weight"]


def split_weight(
    weight: torch.Tensor, r: int, scaling: float, init_lora_weights: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A (r, in), B (out, r), W_res (out, in))`` in fp32 for a (out, in) ``weight``."""
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"{init_lora_weights} initialisation needs a float32/float16/bfloat16 base weight, got {weight.dtype}"
        )
    weight = weight.detach().to(torch.float32)
    if init_lora_weights == "olora":
        q, rr = torch.linalg.qr(weight)
        lora_a, lora_b = rr[:r].contiguous(), q[:, :r].contiguous()
    else:
        niter = PISSA_NITER.fullmatch(init_lora_weights)
        if niter is None:  # exact SVD: W = V S U^T in PEFT's naming
            v, s, uh = torch.linalg.svd(weight, full_matrices=False)
            vr, sr, uhr = v[:, :r], s[:r] / scaling, uh[:r]
        else:
            vr, sr, ur = torch.svd_lowrank(weight, r, niter=int(niter[1]))
            sr, uhr = sr / scaling, ur.t()
        lora_a = torch.diag(torch.sqrt(sr)) @ uhr
        lora_b = vr @ torch.diag(torch.sqrt(sr))
    return lora_a, lora_b, weight - scaling * lora_b @ lora_a
