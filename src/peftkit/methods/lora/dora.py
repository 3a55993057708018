"""DoRA (Liu et al., 2024): LoRA with the weight split into magnitude and direction.

    W' = m * (W + s B A) / ||W + s B A||_row        m: (out,) trained, initialised to the row norms

The row norm is treated as a constant (detached, section 4.3 of the paper), as PEFT does. With
``y0 = W x`` (no bias) the layer's extra output is

    (m / norm - 1) * y0 + (m / norm) * s * B A x

which is what :func:`dora_delta` returns. Saved as ``<module>.lora_magnitude_vector`` (PEFT's key).

The other layer types follow PEFT's DoRA layouts exactly (same magnitude shapes, so files load both ways):

    Embedding  W: (num, dim)  m: (dim,)             norm over the vocabulary, per embedding dimension;
               y = (m / norm) * (W[ids] + s * A^T[ids] B^T)     (PEFT's DoraEmbeddingLayer)
    Conv       W: (out, in, *k)  m: (1, out, *1)    norm over everything but the output channel;
               y = W * x + (m / norm - 1) * (W * x) + (m / norm) * s * B(A(x))   (PEFT's _DoraConvNdLayer)
"""

from __future__ import annotations

import torch
from torch import nn


class DoraMagnitude(nn.Module):
    """Holds one adapter's magnitude vector as ``weight`` (PEFT's state-dict layout)."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)


def weight_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output row of ``weight + delta`` (both (out, in), delta already scaled)."""
    return torch.linalg.norm(weight + delta, dim=1).to(weight.dtype)


def dora_delta(
    x: torch.Tensor,
    *,
    weight: torch.Tensor,
    lora_a: nn.Module,
    lora_b: nn.Module,
    scaling: float,
    magnitude: torch.Tensor,
    base_out: torch.Tensor,
) -> torch.Tensor:
    """What DoRA adds to the base layer's output; ``weight`` is (out, in), ``base_out`` = ``W x`` without bias."""
    # B(A(I)).T rather than B @ A, as PEFT computes it (same numbers, FSDP-friendly).
    eye = torch.eye(lora_a.weight.shape[1], device=lora_a.weight.device, dtype=lora_a.weight.dtype)
    lora_weight = lora_b(lora_a(eye)).T.to(x.dtype)  # (out, in)
    norm = weight_norm(weight.to(x.dtype), scaling * lora_weight.detach()).detach()  # (out,)
    mag_norm_scale = (magnitude / norm).view(1, -1)
    return (mag_norm_scale - 1) * base_out + mag_norm_scale * lora_b(lora_a(x)) * scaling


def embedding_weight_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """L2 norm over the vocabulary of each embedding dimension of ``weight + delta`` (both (num, dim)): (dim,)."""
    return torch.linalg.norm(weight + delta, dim=0).to(weight.dtype)


def conv_weight_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output channel's kernel of ``weight + delta`` (both (out, in, *k)): (1, out, *1)."""
    total = weight + delta
    return total.norm(p=2, dim=tuple(range(1, total.dim())), keepdim=True).transpose(1, 0)


def conv_lora_weight(weight_a: torch.Tensor, weight_b: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """B's 1x1 kernel composed with A's: (out, r, *1) x (r, in, *k) -> ``shape`` (out, in, *k), unscaled."""
    r = weight_a.shape[0]
    return torch.mm(weight_b.reshape(-1, r), weight_a.reshape(r, -1)).reshape(shape)
