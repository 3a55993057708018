"""How many CPU threads torch uses, chosen so that a busy machine does not collapse throughput.

torch starts one OpenMP thread per core. When other processes already keep cores busy, those
threads wait for each other at every parallel region (each matmul), and a step takes as long as
its slowest thread's turn on a shared core: a user measured 42-55 s per step with the default
threads on a loaded 2-core machine and about 4 s with one thread (README, Benchmarks, has our own
side-by-side numbers). So, unless told (``training.num_threads``, ``--threads`` or the
``OMP_NUM_THREADS`` environment variable), peftkit leaves the cores other processes use (the
1-minute load average) and says so; and a training run warns, with the fix, when its steps
suddenly get much slower while the machine is loaded.
"""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Callable

import torch

SLOW_STEP_FACTOR = 3.0  # a step this many times the usual step time, on a loaded machine: warn
_SETTLED_STEPS = 5  # the usual step time is the median of these after the first (which warms up)


def machine_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def others_load() -> float:
    """Runnable processes other than this one, averaged over the last minute (0 where unknown)."""
    try:
        return max(0.0, os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def choose_threads(requested: int | None, *, key: str, note: Callable[[str], None] | None = None) -> int:
    """Set torch's CPU threads: ``requested`` if given, else torch's default (OMP_NUM_THREADS or
    one per core) lowered to the cores the load average leaves free. Returns the number set."""
    say = note or _stderr
    if requested:
        torch.set_num_threads(requested)
        return requested
    default = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):
        return default  # the user's (or torchrun's) choice
    cpus, load = machine_cpus(), others_load()
    free = max(1, int(cpus - load + 0.5))
    if free >= default:
        return default
    torch.set_num_threads(free)
    say(
        f"note: using {free} CPU thread{'s' * (free > 1)} instead of {default}: the machine's load average "
        f"is {load:.1f} on {cpus} CPUs, and threads that share busy cores slow every step down; "
        f"set {key} to choose"
    )
    return free


class StepTimeWatch:
    """Warns once when a training step takes ``SLOW_STEP_FACTOR`` times the usual step time while
    the machine is loaded beyond the threads' share: other processes are taking the cores."""

    def __init__(self, key: str = "training.num_threads", note: Callable[[str], None] | None = None):
        self.key, self.say = key, note or _stderr
        self.times: list[float] = []
        self.warned = False

    def observe(self, step: int, seconds: float) -> None:
        self.times.append(seconds)
        if self.warned or len(self.times) <= _SETTLED_STEPS:
            return
        usual = statistics.median(self.times[1 : _SETTLED_STEPS + 1])
        cpus, load, threads = machine_cpus(), others_load(), torch.get_num_threads()
        # The load average counts this run's own threads: others use what is above them.
        if seconds < SLOW_STEP_FACTOR * usual or load <= cpus + 0.5:
            return
        self.warned = True
        fewer = max(1, min(threads - 1, int(cpus - (load - threads) + 0.5)))
        self.say(
            f"warning: step {step} took {seconds:.1f} s, {seconds / usual:.1f}x the usual {usual:.1f} s, and the "
            f"machine's load average is {load:.1f} on {cpus} CPUs with {threads} threads here: other processes "
            f"compete for the cores. Stop them, or resume this run with {self.key}: {fewer}"
        )


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
