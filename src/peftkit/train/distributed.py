"""Data-parallel training across processes started by ``torchrun`` (PyTorch DDP or FSDP2).

``torchrun`` (or ``peftkit train --nproc N``, which starts it) sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``; a plain ``peftkit train`` sees none of them and runs as one process::

    single process, batch_size B*W:   micro-batch m = examples e0 .. e(BW-1) of the seeded order
    W processes, batch_size B each:   the same micro-batch m; rank r trains on e_r, e_(r+W), ...
    loss of a step = sum over the step's label tokens on every rank / their global count
    DDP averages gradients over ranks, so each rank scales its loss by W: the update equals the
    single-process one (tests/test_distributed.py, max abs diff <= 1e-5 in fp32)

Gradients are all-reduced once per optimizer step (``no_sync`` on the other micro-batches).
The backend follows the hardware: NCCL on CUDA (one GPU per local rank), gloo on CPU. Only rank 0
prints, writes metrics, plots, checkpoints and the adapter; the others wait at a barrier.

``distributed: fsdp`` shards parameters, gradients and optimizer states over the ranks instead of
replicating them (train/fsdp.py); the batches, the loss normalisation and so the update are the
same as under DDP. ``auto`` picks FSDP when most of the model is trained (full fine-tuning, where
the optimizer states dominate memory) and DDP otherwise (an adapter is small: replicating it costs
little, and DDP never re-gathers the frozen weights).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from peftkit.errors import PeftkitError

SHARD_WHEN_TRAINABLE_FRACTION = 0.5  # distributed: auto -> fsdp from this trainable fraction on


@dataclass(frozen=True)
class World:
    """This process's place among the job's processes (one process: rank 0 of 1)."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> World:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        return cls(size, int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def start(self, device: torch.device, timeout_minutes: float = 30.0) -> torch.device:
        """Join the process group; returns this rank's device (``cuda:LOCAL_RANK`` on GPUs).

        A collective that waits longer than ``timeout_minutes`` (a rank died or hangs) fails."""
        if not self.distributed:
            return device
        if device.type == "cuda":
            if self.local_rank >= torch.cuda.device_count():
                raise PeftkitError(
                    f"local rank {self.local_rank} has no GPU ({torch.cuda.device_count()} visible): start "
                    "at most one process per GPU (torchrun --nproc_per_node)"
                )
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        elif device.type != "cpu":
            raise PeftkitError(f"distributed training runs on CUDA or CPU, not {device.type}")
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            kwargs = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes), **kwargs)
        return device

    def stop(self, *, failed: bool = False) -> None:
        """Leave the process group; after a failure without waiting for the others (torchrun
        stops them when this process exits with an error)."""
        if self.distributed and dist.is_initialized():
            if not failed:
                dist.barrier()
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def shard(self, examples: list[Any]) -> tuple[list[Any], bool]:
        """This rank's examples of a global micro-batch, and whether they are real.

        A last micro-batch with fewer examples than ranks leaves some ranks without one: they
        run the first example with its loss weighted 0 (every rank must take part in the
        gradient all-reduce)."""
        mine = examples[self.rank :: self.size]
        return (mine, True) if mine else (examples[:1], False)

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """``tensor`` of every rank, by rank (all ranks pass tensors of one shape and dtype)."""
        if not self.distributed:
            return [tensor]
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous())
        return parts

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum of ``values`` over all ranks (one all-reduce)."""
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()


def choose_strategy(setting: str, world: World, model: nn.Module, *, quantized: bool) -> str:
    """``none`` (one process), ``ddp`` or ``fsdp`` for the ``distributed`` config key (whose
    explicit ``fsdp`` the config check has already refused where it cannot work)."""
    if not world.distributed:
        return "none"
    if setting != "auto":
        return setting
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shardable = model.base_model.supports_fsdp and not quantized
    return "fsdp" if shardable and trainable >= SHARD_WHEN_TRAINABLE_FRACTION * total else "ddp"


class StepLoss(nn.Module):
    """What DDP or FSDP wraps: its forward is the task's loss (the loop's fast path, which calls
    the model's body and head itself), so the wrapper sees every forward and backward.

    ``run`` calls ``run(model)`` inside this forward instead: under FSDP that is how validation and
    generation see the root group's parameters whole."""

    def __init__(self, model: nn.Module, task: Any):
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: dict[str, torch.Tensor] | None = None, run: Any = None) -> Any:
        if run is not None:
            return run(self.model)
        return self.task.loss_sum(self.model, batch)


def data_parallel(
    model: nn.Module, task: Any, world: World, device: torch.device, strategy: str = "ddp"
) -> nn.Module:
    """The loss module: wrapped in DDP, or sharded with FSDP2, when there is more than one process."""
    loss = StepLoss(model, task)
    if not world.distributed or strategy == "none":
        return loss
    if strategy == "fsdp":
        from peftkit.train.fsdp import shard

        return shard(loss, model, device, world.size)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        loss,
        device_ids=[device.index] if device.type == "cuda" else None,
        # Some methods leave parameters without a gradient in a step (AdapterDrop skips layers).
        find_unused_parameters=True,
    )


def no_sync(loss_module: nn.Module, last: bool) -> Any:
    """Reduce gradients over ranks only on the last micro-batch of a step (DDP's ``no_sync``,
    FSDP's ``set_requires_gradient_sync``)."""
    if hasattr(loss_module, "set_requires_gradient_sync"):
        loss_module.set_requires_gradient_sync(last)
        return nullcontext()
    if last or not hasattr(loss_module, "no_sync"):
        return nullcontext()
    return loss_module.no_sync()
