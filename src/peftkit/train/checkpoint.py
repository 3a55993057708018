"""Resumable checkpoints, written atomically and without pickle.

A checkpoint directory ``<output_dir>/checkpoints/step-000050/`` holds::

    adapter/                  the adapter, in PEFT's format (loads anywhere)
    optimizer.safetensors     every optimizer state tensor, keyed "<param index>.<name>"
    rng.safetensors           torch RNG states (CPU and CUDA), of every rank of a distributed run
    trainer_state.json        step, scheduler, optimizer hyper-parameters, Python/NumPy RNG

It appears under its final name only once complete (``peftkit.io.atomic_dir``), so a kill
during a save leaves at most a temporary directory that is ignored and cleaned up.

Tensors are always stored whole, under the single-process names: a checkpoint of a DDP or FSDP
run resumes in any number of processes. Under FSDP every rank takes part in gathering them
(``train/fsdp.py``) and rank 0 writes; on resume each rank keeps its shard of what it reads.
"""

from __future__ import annotations

import errno
import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from peftkit.errors import PeftkitError
from peftkit.io import atomic_dir, remove_stale_temporaries
from peftkit.train.distributed import World
from peftkit.train.fsdp import FullStateDict, full, shard_like

_NAME = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"
TUNER_STATE_FILE = "tuner_state.safetensors"  # a method's own training state, when it has one
# The trainable parameters under the model's own names. The adapter file next to it is PEFT's
# format, which for some methods is not the training state: P-tuning saves its encoder's output,
# not the encoder; AdaLoRA saves ranks cut to the budget.
TRAINABLE_FILE = "trainable.safetensors"


@dataclass
class TrainerState:
    """What, besides tensors, a resumed run needs to continue exactly."""

    step: int
    tokens_seen: int
    scheduler: dict[str, Any]
    optimizer_groups: list[dict[str, Any]]
    python_rng: Any
    numpy_rng: Any
    # CPU threads the run computed with: a resume that picks its own (by load) reuses these, as
    # some reductions split their sums by thread (older checkpoints: None)
    num_threads: int | None = None


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporaries of interrupted saves are skipped)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def _rng_tensors(world: World) -> dict[str, torch.Tensor]:
    """Every rank's torch RNG states; rank r >= 1 under the prefix ``rank<r>.`` (a collective)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    if not world.distributed:
        return tensors
    device = torch.device("cuda", torch.cuda.current_device()) if _nccl() else torch.device("cpu")
    gathered = {}
    for name, state in tensors.items():
        for rank, value in enumerate(world.gather(state.to(device))):
            gathered[name if rank == 0 else f"rank{rank}.{name}"] = value.cpu()
    return gathered


def _nccl() -> bool:
    import torch.distributed as dist

    return dist.is_initialized() and dist.get_backend() == "nccl"


def _whole(value: Any, writer: bool) -> torch.Tensor:
    """The whole tensor (gathering a sharded one is a collective: every rank calls this); only the
    rank that writes makes the contiguous CPU copy."""
    whole = full(value).detach()
    return whole.cpu().contiguous() if writer else whole


def _python_rng_to_json() -> Any:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _numpy_rng_to_json() -> Any:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def save_checkpoint(
    output_dir: str | Path,
    *,
    step: int,
    tokens_seen: int,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    keep: int,
    world: World | None = None,
) -> Path | None:
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep``.

    In a distributed run every rank calls this (reading sharded tensors whole, and the ranks' RNG
    states, are collectives); only rank 0 writes, and returns the path."""
    world = world or World()
    root = checkpoints_dir(output_dir)
    final = root / f"step-{step:06d}"
    opt_state = optimizer.state_dict()
    tensors = {}
    for index, state in opt_state["state"].items():
        for name, value in state.items():
            tensors[f"{index}.{name}"] = (
                _whole(value, world.is_main) if torch.is_tensor(value) else torch.tensor(value)
            )
    trainable = {n: _whole(p, world.is_main) for n, p in model.named_parameters() if p.requires_grad}
    tuner_state = {k: _whole(v, world.is_main) for k, v in model.base_model.training_state().items()}
    rng = _rng_tensors(world)
    adapter_state = FullStateDict(model.state_dict())
    if not world.is_main:
        model.save_pretrained(final, state_dict=adapter_state, is_main_process=False)  # its gathers
        return None
    remove_stale_temporaries(root)
    scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    state = TrainerState(
        step=step,
        tokens_seen=tokens_seen,
        scheduler=scheduler_state,
        optimizer_groups=opt_state["param_groups"],
        python_rng=_python_rng_to_json(),
        numpy_rng=_numpy_rng_to_json(),
        num_threads=torch.get_num_threads(),
    )
    try:
        with atomic_dir(final) as tmp:  # a failed write removes the partial directory
            model.save_pretrained(tmp / "adapter", state_dict=adapter_state)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
            save_file(trainable, str(tmp / TRAINABLE_FILE))
            if tuner_state:  # e.g. AdaLoRA's sensitivity averages
                save_file(tuner_state, str(tmp / TUNER_STATE_FILE))
            # The state file goes last: its presence is what marks a checkpoint as complete.
            (tmp / STATE_FILE).write_text(json.dumps(state.__dict__, indent=1, default=_json_default))
    except (OSError, SafetensorError) as err:
        if _errno(err) != errno.ENOSPC:
            raise
        size = sum(_nbytes(group) for group in (tensors, rng, trainable, trainable, tuner_state))
        raise _disk_full(output_dir, step, final, size) from err
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _errno(err: Exception) -> int | None:
    """The OS error number of ``err``; safetensors reports a failed write as text: "(os error 28)"."""
    if isinstance(err, OSError):
        return err.errno
    found = re.search(r"os error (\d+)", str(err))
    return int(found.group(1)) if found else None


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _disk_full(output_dir: str | Path, step: int, final: Path, size: int) -> PeftkitError:
    """The error for a checkpoint that did not fit on the disk (its partial directory is gone)."""
    last = latest_checkpoint(output_dir)
    resume = (
        f"the last complete checkpoint is step {int(_NAME.match(last.name).group(1))}"
        if last is not None
        else "there is no complete checkpoint yet, so --resume starts from step 0"
    )
    return PeftkitError(
        f"no space left on device while writing checkpoint step {step} to {final} (needs about "
        f"{max(size / 2**20, 0.1):.1f} MB); {resume}; free space and run with --resume"
    )


def _json_default(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def load_checkpoint(
    path: str | Path,
    *,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rank: int = 0,
) -> TrainerState:
    """Restore adapter weights, optimizer, scheduler and every RNG from ``path``.

    Rank ``rank`` of a distributed run takes its own RNG states when the checkpoint has them (the
    same number of processes), else rank 0's; sharded parameters keep their shard of each tensor."""
    from peftkit.serialization import set_peft_model_state_dict

    path = Path(path)
    state = TrainerState(**json.loads((path / STATE_FILE).read_text()))
    if (path / TRAINABLE_FILE).exists():
        _load_trainable(model, load_file(str(path / TRAINABLE_FILE)))
    else:  # a checkpoint written before trainable.safetensors existed
        set_peft_model_state_dict(model, load_file(str(path / "adapter" / "adapter_model.safetensors")))

    tensors = load_file(str(path / "optimizer.safetensors"))
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        param = ordered[int(index)] if int(index) < len(ordered) else None
        if param is not None and value.shape == param.shape:  # e.g. Adam's moments, not its step
            value = shard_like(value, param)
        per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state.optimizer_groups})
    # LambdaLR stores its (unpicklable) functions as None; ours are rebuilt from the config.
    scheduler.load_state_dict({**state.scheduler, "lr_lambdas": [None] * len(optimizer.param_groups)})

    tuner_state = path / TUNER_STATE_FILE
    model.base_model.load_training_state(load_file(str(tuner_state)) if tuner_state.exists() else {})

    rng = load_file(str(path / "rng.safetensors"))
    own = f"rank{rank}."
    if rank and f"{own}torch_cpu" in rng:
        rng = {k.removeprefix(own): v for k, v in rng.items() if k.startswith(own)}
    else:  # rank 0, or a checkpoint of fewer processes: rank 0's states
        rng = {k: v for k, v in rng.items() if not k.startswith("rank")}
    torch.set_rng_state(rng["torch_cpu"])
    cuda_states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = state.python_rng
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state.numpy_rng
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return state


def _load_trainable(model: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Copy the saved trainable parameters back; the set must be exactly the model's trainable ones."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(tensors):
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise PeftkitError(
            "the checkpoint's trainable parameters do not match this run's (was the method config changed "
            f"before --resume?): missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(shard_like(value, params[name]))
