"""peftkit.threads: fewer threads on a loaded machine, unless told; a warning when steps slow down."""

from __future__ import annotations

import pytest
import torch

import peftkit.threads as threads


@pytest.fixture
def restore_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield
    torch.set_num_threads(before)


def _machine(monkeypatch, cpus: int, load: float, default: int) -> None:
    monkeypatch.setattr(threads, "machine_cpus", lambda: cpus)
    monkeypatch.setattr(threads, "others_load", lambda: load)
    torch.set_num_threads(default)


@pytest.mark.parametrize(
    "cpus, load, default, expected",
    [
        (2, 0.1, 2, 2),  # idle: torch's default
        (2, 0.6, 2, 1),  # more than half a core busy elsewhere: rounds to 1 free
        (2, 3.5, 2, 1),  # overloaded: never below 1
        (8, 2.2, 8, 6),
        (8, 2.2, 4, 4),  # the default already fits in what is free
    ],
)
def test_default_threads_leave_the_busy_cores(
    monkeypatch, restore_threads, capsys, cpus, load, default, expected
):
    _machine(monkeypatch, cpus, load, default)
    assert threads.choose_threads(None, key="training.num_threads") == expected
    assert torch.get_num_threads() == expected
    note = capsys.readouterr().err
    assert ("training.num_threads" in note and f"load average is {load:.1f}" in note) == (expected < default)


def test_asked_threads_and_omp_num_threads_are_kept(monkeypatch, restore_threads, capsys):
    _machine(monkeypatch, 2, 5.0, 2)
    assert threads.choose_threads(2, key="--threads") == 2 and torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.choose_threads(None, key="--threads") == 2
    assert capsys.readouterr().err == ""


def test_a_step_slowed_down_by_other_processes_warns_once_with_the_fix(monkeypatch, restore_threads):
    _machine(monkeypatch, 2, 1.0, 2)
    said = []
    watch = threads.StepTimeWatch(note=said.append)
    for step, seconds in enumerate([9.0, 1.0, 1.1, 0.9, 1.0, 1.0, 1.2], start=1):  # step 1 warms up
        watch.observe(step, seconds)
    watch.observe(8, 5.0)  # 5x slower, but the machine is not loaded beyond our threads: not us
    assert said == []
    monkeypatch.setattr(threads, "others_load", lambda: 3.4)  # 2 threads here + 1.4 elsewhere
    watch.observe(9, 5.0)
    watch.observe(10, 6.0)
    assert len(said) == 1
    assert "step 9 took 5.0 s, 5.0x the usual 1.0 s" in said[0] and "training.num_threads: 1" in said[0]
