"""Atomic file and directory writes: a kill during a save never leaves a half-written result.

Every output of peftkit (adapters, checkpoints, converted models, metrics plots) goes through
these helpers. The pattern is always the same: write into a temporary sibling
(``<name>.tmp-XXXXXXXX``), flush it to disk, then rename it into place, which is atomic on POSIX
file systems. Temporaries are created the way a plain ``open`` / ``mkdir`` would create the result
(mode 0o666 / 0o777 less the umask), so the rename carries over no private 0600/0700 modes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_MARKER = ".tmp-"
# What the writers here leave behind when killed: "<name>.tmp-" or "<name>.old-" and 8 random
# characters (ours are hex; tempfile's, of older versions, [a-z0-9_]).
_LEFTOVER = re.compile(r"\.(?:tmp|old)-[a-z0-9_]{8}$")


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a leftover of an interrupted atomic write of this module."""
    return _LEFTOVER.search(name) is not None


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temporary_name(path: Path) -> Path:
    return path.parent / f"{path.name}{TMP_MARKER}{secrets.token_hex(4)}"


def _make_temporary(path: Path, make: Any) -> Any:
    """``make(candidate)`` for a fresh ``<name>.tmp-XXXXXXXX`` beside ``path``, retried on a clash."""
    for _ in range(100):
        candidate = _temporary_name(path)
        try:
            return candidate, make(candidate)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name beside {path}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` atomically.

    The file gets the mode a new file of ``open`` gets (0o666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    tmp, fd = _make_temporary(path, lambda name: os.open(name, flags, 0o666))
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_file(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` only if the block finishes.

    The directory and everything in it get the modes of a plain ``mkdir`` / ``open`` (0o777 /
    0o666 less the umask), whatever the writers in the block made.

    If ``path`` exists and ``overwrite`` is true it is replaced. On Linux (``renameat2`` with
    ``RENAME_EXCHANGE``: kernel 3.15+, on a file system that has it, such as ext4, xfs, btrfs or
    tmpfs) the new and the old directory swap names in one step, so at every instant ``path``
    is the old or the new complete directory, for a reader and after a kill alike; the old one,
    now under the temporary name, is deleted after. Elsewhere (macOS, NFS, ...) the old one is
    moved aside and the new one renamed in: between those two renames ``path`` does not exist,
    and a kill there leaves the old directory in ``<name>.old-*/``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, _ = _make_temporary(path, lambda name: os.mkdir(name, 0o777))
    try:
        yield tmp
        _settle(tmp)
        if os.path.lexists(path):
            if not overwrite:
                raise FileExistsError(f"{path} already exists")
            if exchange(tmp, path):  # tmp now names the old directory
                _fsync_dir(path.parent)
                _remove(tmp)
            else:
                old = move_aside(path)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        _remove(tmp)
        raise


def _settle(tmp: Path) -> None:
    """Flush every file under ``tmp`` to disk and give everything in it the mode a plain
    ``mkdir`` / ``open`` would: some writers create private files (safetensors' ``save_file``
    makes them 0600). ``tmp`` itself was made by ``mkdir(0o777)``, so its mode is the umask's."""
    dir_mode = stat.S_IMODE(tmp.stat().st_mode)
    file_mode = dir_mode & 0o666
    for root, dirs, files in os.walk(tmp):  # links are not followed
        for name in dirs:
            child = os.path.join(root, name)
            if not os.path.islink(child) and stat.S_IMODE(os.lstat(child).st_mode) != dir_mode:
                os.chmod(child, dir_mode)
        for name in files:
            child = os.path.join(root, name)
            mode = os.lstat(child).st_mode
            if not stat.S_ISREG(mode):
                continue
            wanted = file_mode | (dir_mode & 0o111 if mode & 0o111 else 0)  # executables stay so
            if stat.S_IMODE(mode) != wanted:
                os.chmod(child, wanted)
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100
# The file system or kernel cannot exchange: fall back to two renames.
_CANNOT_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EXDEV, errno.ENOTSUP}


@functools.cache
def _renameat2() -> Any:
    """glibc's (2.28+) ``renameat2``, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap the names of ``a`` and ``b`` (both must exist) in one atomic step; False where the
    platform or file system cannot (nothing changed then)."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _CANNOT_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), os.fspath(a), None, os.fspath(b))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def move_aside(path: Path) -> Path:
    """Move ``path`` (atomically) into a new ``<name>.old-*`` directory beside it and return that
    directory, for the caller to delete: a kill before the delete leaves a leftover that
    :func:`remove_stale_temporaries` recognises, never half of ``path`` in its place."""
    old = Path(tempfile.mkdtemp(prefix=f"{path.name}.old-", dir=path.parent))
    os.replace(path, old / "x")
    return old


def remove_stale_temporaries(directory: str | os.PathLike, *, recursive: bool = False) -> list[Path]:
    """Delete leftovers of interrupted atomic writes inside ``directory`` (with ``recursive``, also
    in its subdirectories, not following links); return them.

    Only for a directory no other process is writing into: its temporaries are not stale."""
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for child in sorted(directory.iterdir()):
        if is_temporary(child.name):
            _remove(child)
            removed.append(child)
        elif recursive and child.is_dir() and not child.is_symlink():
            removed += remove_stale_temporaries(child, recursive=True)
    return removed


def check_out_dir(
    out: Path,
    inputs: list[str] | list[Path],
    *,
    overwrite: bool,
    name: str = "OUT_DIR",
    what: str = "input adapter directory",
) -> None:
    """Refuse an output directory that is, holds or lies inside an input adapter directory (writing
    it would destroy the input), and a non-empty one unless ``overwrite``. Nothing is touched."""
    from peftkit.configuration import ConfigError  # imported late: peftkit.io is imported everywhere

    if out.exists() and not out.is_dir():
        raise ConfigError(f"{name} {out} exists and is not a directory", "command line")
    real_out = out.resolve()
    for directory in inputs:
        real = Path(directory).expanduser().resolve()
        if not real.exists():
            continue  # a hub id or a missing directory: reported when it is loaded
        if real == real_out or real_out in real.parents or real in real_out.parents:
            where = "is" if real == real_out else "contains" if real_out in real.parents else "is inside"
            raise ConfigError(
                f"{name} {out} {where} the {what} {directory}; writing there would destroy "
                "the input, so choose another directory",
                "command line",
            )
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"{name} {out} is not empty; pass --overwrite to replace it, or choose another directory",
            "command line",
        )
