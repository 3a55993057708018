"""benchmarks/turns.py: worker processes take turns, and their clocks leave the waiting out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import load_benchmark

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

# A worker: 4 "steps" of `pause` seconds, each logged to a shared file; its own clock's readings
# go to <name>.json.
WORKER = """
import json, sys, time
sys.path.insert(0, {benchmarks!r})
from turns import Turn
name, fds, pause, per_turn, log = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
if name == "crash":
    raise SystemExit(3)
turn = Turn(fds, per_turn)
turn.ready()
stamps = [turn.clock()]
for step in range(1, 5):
    time.sleep(pause)
    with open(log, "a") as f:
        f.write(f"{{name}}{{step}}\\n")
    stamps.append(turn.clock())
    turn.after_step(step, 4)
with open(log, "a") as f:
    f.write(f"{{name}}-exit\\n")
json.dump(stamps, open(log + "." + name + ".json", "w"))
"""


@pytest.fixture
def worker(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(benchmarks=str(BENCHMARKS)))
    log = tmp_path / "log.txt"

    def command(name: str, pause: float = 0.0, per_turn: int = 1):
        return lambda fds: [sys.executable, str(script), name, fds, str(pause), str(per_turn), str(log)]

    return command, log


def test_workers_alternate_and_exit_one_at_a_time(worker):
    turns = load_benchmark(BENCHMARKS / "turns.py")
    command, log = worker
    turns.run_in_turns({"a": command("a"), "b": command("b", per_turn=2)})
    order = log.read_text().split()
    # a yields after every step, b after every second; each exits only after both are done.
    assert order == ["a1", "b1", "b2", "a2", "b3", "b4", "a3", "a4", "a-exit", "b-exit"]


def test_clock_leaves_out_the_other_workers_turns(worker):
    turns = load_benchmark(BENCHMARKS / "turns.py")
    command, log = worker
    turns.run_in_turns({"slow": command("slow", pause=0.3), "fast": command("fast", pause=0.0)})
    fast = json.loads(Path(f"{log}.fast.json").read_text())
    slow = json.loads(Path(f"{log}.slow.json").read_text())
    # fast waited through slow's 4 x 0.3 s, which its clock must not count.
    assert fast[-1] - fast[0] < 0.2
    assert slow[-1] - slow[0] > 1.1


def test_a_failing_worker_stops_the_run(worker):
    turns = load_benchmark(BENCHMARKS / "turns.py")
    command, _ = worker
    with pytest.raises(SystemExit, match="worker crash failed"):
        turns.run_in_turns({"a": command("a"), "crash": command("crash")})


def test_without_fds_a_turn_does_nothing():
    turns = load_benchmark(BENCHMARKS / "turns.py")
    turn = turns.Turn(None)
    turn.ready()
    turn.after_step(1, 2)
    assert turn.paused_s == 0.0
