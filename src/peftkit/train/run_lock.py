"""One training run per output directory: an exclusive lock held for the whole run.

Two ``peftkit train`` processes writing one ``output_dir`` would interleave their checkpoints and
``metrics.jsonl``, and each checkpoint save cleans up temporaries, including the other run's
half-written ones. So the writing process (rank 0 under torchrun) holds ``fcntl.flock`` on
``output_dir/.peftkit-train.lock`` from before the model loads until it exits::

    run A: open + flock(LOCK_EX | LOCK_NB) -> write "pid, host, since" -> ... train ... -> empty it, unlock
    run B: open + flock(LOCK_EX | LOCK_NB) -> EWOULDBLOCK -> read the owner -> refused, naming it

The kernel drops a flock when its holder dies, even by SIGKILL, so a crashed run never blocks the
next one: the file's content only names the last owner, for the message. The file itself stays
(deleting it would let two processes lock two different files of the same name). Commands that
only read a run (``eval``, ``generate``, ``merge``) take no lock. Without ``fcntl`` (Windows)
there is no lock.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_FILE = ".peftkit-train.lock"
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}  # e.g. some FUSE mounts


class RunDirectoryInUse(PeftkitError):
    """Another live process is training into this output directory."""

    def __init__(self, directory: Path, owner: dict[str, Any] | None):
        self.directory, self.owner = directory, owner or {}
        if owner:
            who = (
                f"another peftkit train (pid {owner.get('pid')} on host {owner.get('host')}, "
                f"since {owner.get('since')})"
            )
        else:
            who = f"another process (its lock file {directory / LOCK_FILE} names no owner yet)"
        super().__init__(
            f"{directory} is in use by {who}: two runs in one output_dir would mix their checkpoints "
            "and metrics. Wait for it to finish or stop it, or set output_dir to a new directory "
            "(peftkit eval, generate and merge may read the run meanwhile)"
        )


class RunLock:
    """The lock on a run directory (a context manager); :meth:`acquire` raises
    :class:`RunDirectoryInUse` when another process holds it."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, *, attempts: int = 3) -> RunLock:
        """Take the lock without waiting. A holder that has not written its name yet, or has
        just let go, is given ``attempts`` tries 0.1 s apart before the refusal."""
        if fcntl is None or self._fd is not None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            for attempt in range(attempts):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    owner = read_owner(self.directory)
                    if owner or attempt == attempts - 1:
                        raise RunDirectoryInUse(self.directory, owner) from None
                    time.sleep(0.1)
                except OSError as err:
                    if err.errno not in _NO_LOCKS:
                        raise
                    print(
                        f"warning: the file system of {self.directory} has no file locks ({err.strerror}): "
                        "nothing stops a second run from writing into it meanwhile",
                        file=sys.stderr,
                        flush=True,
                    )
                    os.close(fd)
                    return self
            since = datetime.now().astimezone().isoformat(timespec="seconds")
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": since}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)  # releases the lock if it was taken
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the file (no owner) and let go; a no-op when not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the only descriptor releases the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def read_owner(directory: str | os.PathLike) -> dict[str, Any] | None:
    """Who holds (or last held) the lock of ``directory``, as its lock file says; None if empty."""
    try:
        text = (Path(directory) / LOCK_FILE).read_text()
        owner = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None
