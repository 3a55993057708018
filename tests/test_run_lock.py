"""One `peftkit train` per output_dir: the lock (train/run_lock.py) held by real other processes,
released by the kernel when its holder is SIGKILLed; stale temporaries cleaned at start."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import peftkit.models
from conftest import TINY_ROWS
from peftkit.train.checkpoint import list_checkpoints
from peftkit.train.config import build_job_config
from peftkit.train.distributed import World
from peftkit.train.loop import run_training
from peftkit.train.output import claim_output_dir
from peftkit.train.run_lock import LOCK_FILE, RunDirectoryInUse, RunLock, read_owner

pytestmark = pytest.mark.usefixtures("single_thread")

# Holds the lock of DIR, says so, and sleeps until killed.
_HOLDER = """
import sys, time
from peftkit.train.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def job(tiny_model_dir, out: Path, **training):
    data = out.parent / f"{out.name}-train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS))
    settings = {"max_steps": 2, "batch_size": 4, "precision": "fp32", "seed": 7, **training}
    return build_job_config(
        {
            "base_model": str(tiny_model_dir),
            "lora": {"r": 2, "target_modules": ["q_proj"]},
            "data": {"train": str(data)},
            "training": settings,
            "evaluation": {"accuracy_after": False},
            "output_dir": str(out),
        }
    )


@pytest.fixture
def holder(tmp_path):
    """Another process that holds the lock of tmp_path / "run"."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline() == "locked\n"
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_run_is_refused_until_the_holder_dies(tiny_model_dir, tmp_path, holder, monkeypatch):
    out = tmp_path / "run"
    leftover = out / "checkpoints" / "step-000004.tmp-0123abcd"  # the live run's save in progress
    leftover.mkdir(parents=True)

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded although the run directory is in use")

    with monkeypatch.context() as patch:
        patch.setattr(peftkit.models, "load_model_and_tokenizer", forbidden)
        for flags in ({}, {"resume": True}, {"overwrite": True}):
            with pytest.raises(RunDirectoryInUse) as refused:
                run_training(job(tiny_model_dir, out), progress=False, **flags)
            assert f"pid {holder.pid} on host {socket.gethostname()}, since " in str(refused.value)
        assert refused.value.owner["pid"] == holder.pid
    assert leftover.is_dir()  # never another live run's
    # Under torchrun only rank 0 writes, so only rank 0 takes the lock.
    with claim_output_dir(out, World(size=2, rank=1, local_rank=1)):
        pass
    with pytest.raises(RunDirectoryInUse), claim_output_dir(out, World(size=2, rank=0, local_rank=0)):
        pass

    holder.send_signal(signal.SIGKILL)  # a crash: no chance to let go of the lock itself
    holder.wait()
    assert read_owner(out)["pid"] == holder.pid  # the file still names it; the kernel dropped the lock
    run_training(job(tiny_model_dir, out, save_every=1), progress=False)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not leftover.exists()  # the dead run's temporaries: cleaned
    assert [p.name for p in list_checkpoints(out)] == ["step-000001"]
    assert read_owner(out) is None and (out / LOCK_FILE).read_text() == ""  # released


def test_peftkit_train_in_another_process_is_refused_while_a_run_holds_the_directory(
    tiny_model_dir, tmp_path
):
    out = tmp_path / "run"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job(tiny_model_dir, out).to_yaml_dict()))
    with RunLock(out):  # what this process's run_training holds while it trains
        second = subprocess.run(
            [sys.executable, "-m", "peftkit", "train", str(config), "--no-progress"],
            capture_output=True,
            text=True,
        )
    assert second.returncode == 2, second.stderr
    assert f"is in use by another peftkit train (pid {os.getpid()} on host" in second.stderr
    assert not (out / "adapter").exists() and not (out / "checkpoints").exists()


def test_a_kill_during_the_final_save_leaves_nothing_behind_after_the_next_start(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    # What a SIGKILL during an atomic write leaves: the final adapter's directory, a file beside
    # it, a checkpoint's directory. Other names, and what is in other folders, are the user's.
    stale_dirs = ["adapter.tmp-1a2b3c4d", "checkpoints/step-000002.tmp-00ff00ff"]
    stale_files = ["eval_results.json.tmp-abcdefgh", "metrics.jsonl.old-k_8zq0ab"]
    kept = ["notes.tmp-1.txt", "mine/data.tmp-12345678"]
    for name in stale_dirs:
        (out / name).mkdir(parents=True)
    for name in stale_files + kept:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    stale = stale_dirs + stale_files
    run_training(job(tiny_model_dir, out, max_steps=1), progress=False)
    assert not [name for name in stale if (out / name).exists()]
    assert all((out / name).exists() for name in kept)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_the_lock_within_one_process(tmp_path):
    """flock belongs to an open file: a second lock of the same directory conflicts here too."""
    first = RunLock(tmp_path).acquire()
    with pytest.raises(RunDirectoryInUse, match=f"pid {os.getpid()} "):
        RunLock(tmp_path).acquire()
    first.release()
    first.release()  # idempotent
    with RunLock(tmp_path) as again:
        assert again.held and read_owner(tmp_path)["pid"] == os.getpid()
    assert not again.held and read_owner(tmp_path) is None
    # A holder that has not written its name yet is reported as such.
    (tmp_path / LOCK_FILE).write_text("")
    import fcntl

    with open(tmp_path / LOCK_FILE) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        with pytest.raises(RunDirectoryInUse, match="names no owner yet"):
            RunLock(tmp_path).acquire()


def test_a_file_system_without_locks_warns_and_runs(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with RunLock(tmp_path) as lock:
        assert not lock.held
    assert "has no file locks (No locks available)" in capsys.readouterr().err
