"""Benchmark workers in separate processes that take turns, a few optimizer steps each.

This shared machine's speed drifts by 10-20% over minutes, so configurations timed one after
another differ by that much for reasons of their own. Run side by side but never at the same
time, they share every fast and slow moment, and their ratio keeps only what they do differently.
Each stays its own process, so each peak resident memory is its own.

    driver (run_in_turns)                       worker (Turn)
    starts every worker ──────────────────────► sets up, Turn.ready(): "R", waits
    round after round, one worker at a time:
      "G" ─────────────────────────────────────► trains K steps, Turn.after_step(): "Y", waits
                                                 (after its last step: "D", waits)
    once every worker is done, one at a time:
      "G" ─────────────────────────────────────► saves, exits; the next is released after that

Time spent waiting is left out of ``Turn.clock()``, which timestamps steps.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable


class Turn:
    """The worker's side; without ``fds`` (a worker run alone) every method is a no-op."""

    def __init__(self, fds: str | None, steps_per_turn: int = 1):
        self.go_fd, self.done_fd = (int(fd) for fd in fds.split(",")) if fds else (None, None)
        self.steps_per_turn = steps_per_turn
        self.paused_s = 0.0

    def clock(self) -> float:
        """Seconds of this process's own turns (``time.perf_counter`` minus time spent waiting)."""
        return time.perf_counter() - self.paused_s

    def ready(self) -> None:
        self._hand_over(b"R")

    def after_step(self, step: int, last_step: int) -> None:
        if step == last_step:
            self._hand_over(b"D")
        elif step % self.steps_per_turn == 0:
            self._hand_over(b"Y")

    def _hand_over(self, message: bytes) -> None:
        if self.go_fd is None:
            return
        os.write(self.done_fd, message)
        waiting = time.perf_counter()
        if os.read(self.go_fd, 1) != b"G":
            raise SystemExit("the benchmark driver went away")
        self.paused_s += time.perf_counter() - waiting


def run_in_turns(commands: dict[str, Callable[[str], list[str]]]) -> None:
    """Run each ``commands[name](fds)`` (an argv taking ``--turn-fds fds``) in turns until all exit."""
    workers: dict[str, tuple[subprocess.Popen, int, int]] = {}
    try:
        for name, command in commands.items():
            go_read, go_write = os.pipe()
            done_read, done_write = os.pipe()
            proc = subprocess.Popen(command(f"{go_read},{done_write}"), pass_fds=(go_read, done_write))
            os.close(go_read)
            os.close(done_write)
            workers[name] = (proc, go_write, done_read)
        for name in workers:
            _expect(name, workers[name], {b"R"})
        running = list(workers)
        while running:
            for name in list(running):
                proc, go_write, done_read = workers[name]
                os.write(go_write, b"G")
                if _expect(name, workers[name], {b"Y", b"D"}) == b"D":
                    running.remove(name)
        for name, (proc, go_write, _) in workers.items():  # saving and exiting, one at a time
            os.write(go_write, b"G")
            if proc.wait() != 0:
                raise SystemExit(f"[train_throughput] worker {name} failed (its traceback is above)")
    finally:
        for proc, go_write, done_read in workers.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            os.close(go_write)
            os.close(done_read)


def _expect(name: str, worker: tuple[subprocess.Popen, int, int], allowed: set[bytes]) -> bytes:
    message = os.read(worker[2], 1)
    if message not in allowed:  # b"": the worker exited without handing over
        worker[0].wait()
        raise SystemExit(f"[train_throughput] worker {name} failed (its traceback is above)")
    return message
