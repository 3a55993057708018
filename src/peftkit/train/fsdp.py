"""Sharded data parallelism (PyTorch FSDP2, ``torch.distributed.fsdp.fully_shard``).

Under ``distributed: fsdp`` every decoder layer (the model's ``_no_split_modules`` classes) is
one shard group and the loss module is the root group, which holds what lies outside the layers
(embeddings, final norm, a tied output layer). Each rank keeps 1/N of every parameter, gradient
and optimizer state; a layer's full weights exist only while it runs.

What shared code must do differently, all of it here:

* run anything that calls the model (validation, generation) *inside* the root module's forward
  on every rank, with the same inputs, so that every rank takes part in each all-gather;
* read a parameter or an optimizer state as a whole with :func:`full` (a collective: every rank
  asks for the same tensors in the same order) before rank 0 writes it;
* write a whole tensor read from a checkpoint into a sharded one with :func:`shard_like`.

Frozen weights may be stored in bf16 next to fp32 trainable ones (train/precision.py): FSDP2
only needs the *trainable* parameters of a group to share a dtype.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn


def is_sharded(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def full(value: Any) -> Any:
    """The whole tensor behind a sharded one (a collective); anything else as it is."""
    return value.full_tensor() if is_sharded(value) else value


def shard_like(value: torch.Tensor, like: Any) -> torch.Tensor:
    """``value`` (a whole tensor) laid out as ``like``: this rank's shard when ``like`` is sharded.

    Every rank holds the whole tensor (read from the same checkpoint), so no data moves."""
    if not is_sharded(like):
        return value
    from torch.distributed.tensor import distribute_tensor

    value = value.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)


class FullStateDict(Mapping):
    """A state dict whose sharded tensors are gathered when read (on every rank alike)."""

    def __init__(self, state: Mapping[str, Any]):
        self._state = state

    def __getitem__(self, key: str) -> Any:
        return full(self._state[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer layers of ``model``: modules of its ``_no_split_modules`` classes."""
    classes: set[str] = set()
    for module in model.modules():
        classes.update(getattr(module, "_no_split_modules", None) or [])
    return [module for module in model.modules() if type(module).__name__ in classes]


def shard(loss_module: nn.Module, model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """Apply ``fully_shard`` to every decoder layer of ``model``, then to ``loss_module`` (the root)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    for module in decoder_layers(model):
        fully_shard(module, mesh=mesh)
    fully_shard(loss_module, mesh=mesh)
    return loss_module
