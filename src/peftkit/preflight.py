"""Checks of the machine a command runs on, made before any model loads.

A device name is checked against the devices this machine has (``torch.device("tpu")`` and
``cuda:7`` on a CPU-only build would otherwise fail deep inside torch, after the model loaded),
and a directory a command will write is checked for being writable by creating and removing one
empty file in it (or in its nearest existing parent): nothing is left behind. Every problem
names the config key or option it comes from.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

AUTO_HELP = "auto: the first GPU if there is one, else cpu"


def available_devices() -> list[str]:
    """The devices torch can compute on here: ``cpu``, ``cuda:0`` ... ``cuda:N-1``, ``mps``, ``xpu:N``."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        found += [f"xpu:{i}" for i in range(xpu.device_count())]
    return found


def auto_device() -> torch.device:
    """The GPU if there is one (CUDA, then Apple MPS), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def device_problem(name: object, key: str) -> str | None:
    """Why ``name`` is not a device this machine has (naming ``key`` and the devices it has), or None."""
    text = str(name).strip()
    if text == "auto":
        return None
    names = available_devices()
    have = ", ".join(names)
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        return f"{key} is {name!r}, which is not a device name; this machine has: {have} (or {AUTO_HELP})"
    if device.type == "cpu":
        return None
    if device.index is None:
        present = any(n.split(":")[0] == device.type for n in names)
    else:
        present = f"{device.type}:{device.index}" in names or (device.index == 0 and device.type in names)
    if present:
        return None
    why = ""
    if device.type == "cuda" and not torch.cuda.is_available() and not torch.backends.cuda.is_built():
        why = " (this torch build has no CUDA support)"
    return f"{key} is {name!r}, which this machine does not have{why}; it has: {have} (or {AUTO_HELP})"


def resolve_device(name: str, key: str = "device") -> torch.device:
    """The ``torch.device`` for ``name`` (``auto``: :func:`auto_device`), checked to exist here."""
    from peftkit.configuration import ConfigError

    problem = device_problem(name, key)
    if problem:
        raise ConfigError(problem)
    return auto_device() if str(name).strip() == "auto" else torch.device(str(name).strip())


def writable_dir_problem(path: str | os.PathLike, key: str) -> str | None:
    """Why directory ``path`` (which may not exist yet) cannot be created and written, or None.

    The probe creates and removes one empty file in ``path`` or its nearest existing parent."""
    path = Path(path).expanduser()
    if os.path.lexists(path) and not os.path.isdir(path):
        return f"{key} {path} exists and is a file, not a directory: choose a directory path"
    existing = path
    while not os.path.lexists(existing) and existing.parent != existing:
        existing = existing.parent
    if not os.path.isdir(existing):
        return f"{key} {path} lies under {existing}, which is a file, not a directory: choose another path"
    try:
        handle, probe = tempfile.mkstemp(prefix=".peftkit-write-check-", dir=existing)
    except OSError as err:
        where = "" if existing == path else f" (it would be created in {existing})"
        reason = err.strerror or str(err)
        return f"{key} {path} is not writable{where}: {reason}; choose a writable directory"
    os.close(handle)
    os.unlink(probe)
    return None


def writable_file_problem(path: str | os.PathLike, key: str) -> str | None:
    """Why file ``path`` cannot be written (it is a directory, or its directory is not writable)."""
    path = Path(path).expanduser()
    if os.path.isdir(path):
        return f"{key} {path} is a directory; give a file path"
    return writable_dir_problem(path.parent, f"{key} {path}: its directory")


def training_machine_problems(device: str, output_dir: str) -> list[str]:
    """What stops a training job on this machine: ``training.device`` missing, ``output_dir`` unwritable."""
    problems = [device_problem(device, "'training.device'"), writable_dir_problem(output_dir, "'output_dir'")]
    return [p for p in problems if p]
