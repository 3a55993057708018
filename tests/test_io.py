"""Atomic writes (peftkit.io): a directory replaced while others read it, or killed at any point of
its replacement, is always there whole; results get the modes of a plain open/mkdir."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import peftkit.io
from peftkit.io import (
    atomic_dir,
    atomic_file,
    exchange,
    is_temporary,
    remove_stale_temporaries,
    write_json,
)

# Runs peftkit/io.py alone (it imports nothing of peftkit), so a child starts in ~50 ms.
_LOAD_IO = f"""
import importlib.util, os, signal, sys
spec = importlib.util.spec_from_file_location("pio", {peftkit.io.__file__!r})
pio = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pio)
"""

# Reads DIR/data until STOP exists; prints how often it was there and how often it was missing.
_READER = """
path, stop = os.path.join(sys.argv[1], "data"), sys.argv[2]
found = missing = 0
print("ready", flush=True)
while not os.path.exists(stop):
    try:
        with open(path) as handle:
            found += bool(handle.read())
    except FileNotFoundError:
        missing += 1
print(found, missing)
"""

# Overwrites DIR with two files holding VALUE; from inside the block on, SIGKILLs itself at its
# K-th audit event (each file open, mkdir, rename, remove, ... raises one before it happens; the
# renameat2 call raises none, so a kill at the next event is a kill right after it).
_KILLED_WRITER = """
target, value, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
events = 0
def hook(event, args):
    global events
    events += 1
    if events == k:
        os.kill(os.getpid(), signal.SIGKILL)
with pio.atomic_dir(target) as tmp:
    sys.addaudithook(hook)
    for name in ("a", "b"):
        with open(os.path.join(tmp, name), "w") as handle:
            handle.write(value)
"""


def _can_exchange(tmp_path) -> bool:
    (tmp_path / "x1").mkdir()
    (tmp_path / "x2").mkdir()
    try:
        return exchange(tmp_path / "x1", tmp_path / "x2")
    finally:
        os.rmdir(tmp_path / "x1")
        os.rmdir(tmp_path / "x2")


@pytest.fixture
def exchanging(tmp_path):
    if not _can_exchange(tmp_path):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here: atomic_dir falls back to two renames")


def _write(target, value: str) -> None:
    with atomic_dir(target) as tmp:
        (tmp / "data").write_text(value)


@pytest.mark.usefixtures("exchanging")
def test_a_reader_never_sees_an_overwritten_directory_missing(tmp_path):
    target, stop = tmp_path / "out", tmp_path / "stop"
    _write(target, "0")
    reader = subprocess.Popen(
        [sys.executable, "-c", _LOAD_IO + _READER, str(target), str(stop)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout.readline() == "ready\n"
        for i in range(1, 250):
            _write(target, str(i))
    finally:
        stop.touch()
        found, missing = map(int, reader.communicate(timeout=30)[0].split())
    assert missing == 0, f"{target} was missing {missing} times (found {found} times)"
    assert found > 0
    assert (target / "data").read_text() == "249"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "stop"]  # no leftovers


@pytest.mark.usefixtures("exchanging")
def test_a_kill_at_any_point_of_an_overwrite_leaves_a_whole_directory(tmp_path):
    """Kill before each file-system operation of an overwrite in turn, until one finishes."""
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        for name in "ab":
            (tmp / name).write_text("old")
    replaced = kept = 0
    for k in range(1, 200):
        before, value = (target / "a").read_text(), f"new{k}"
        done = subprocess.run([sys.executable, "-c", _LOAD_IO + _KILLED_WRITER, str(target), value, str(k)])
        assert target.is_dir(), f"{target} missing after a kill before operation {k}"
        now = [(target / name).read_text() for name in "ab"]
        assert now in ([before] * 2, [value] * 2), f"kill before operation {k}: {now}"
        if done.returncode == 0:
            break
        assert done.returncode == -9
        replaced, kept = replaced + (now[0] == value), kept + (now[0] == before)
        remove_stale_temporaries(tmp_path)  # what the killed writer left beside it
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    else:
        pytest.fail("the overwrite never finished")
    assert now[0] == value
    assert replaced and kept  # killed both before and after the swap


def test_without_exchange_the_old_directory_is_moved_aside_first(tmp_path, monkeypatch):
    monkeypatch.setattr(peftkit.io, "exchange", lambda a, b: False)  # e.g. macOS, NFS
    target = tmp_path / "out"
    _write(target, "1")
    _write(target, "2")
    assert (target / "data").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(FileExistsError), atomic_dir(target, overwrite=False) as tmp:
        (tmp / "data").write_text("3")
    assert (target / "data").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_results_get_the_modes_of_a_plain_open_and_mkdir(tmp_path, umask):
    new_dir, new_file = 0o777 & ~umask, 0o666 & ~umask  # 0755/0644 under umask 022
    for overwrite in ("first", "again"):  # a new path, then one replaced
        with atomic_dir(tmp_path / "dir") as tmp:
            (tmp / "sub").mkdir()
            save_file({"w": torch.zeros(2)}, tmp / "sub" / "weights")  # safetensors makes it 0600
        with atomic_file(tmp_path / "file.bin") as handle:
            handle.write(b"x")
        write_json(tmp_path / "dir" / "config.json", {"overwrite": overwrite})
        assert _mode(tmp_path / "dir") == new_dir, oct(_mode(tmp_path / "dir"))
        assert _mode(tmp_path / "dir" / "sub") == new_dir
        for path in ("file.bin", "dir/config.json", "dir/sub/weights"):
            assert _mode(tmp_path / path) == new_file, (path, oct(_mode(tmp_path / path)))


def test_merge_writes_a_model_with_the_modes_of_the_umask(tmp_path, umask, single_thread):
    """Issue 18.7: `peftkit merge` left its output 0700 and model.safetensors 0600."""
    from transformers import AutoModelForCausalLM

    import peftkit
    from conftest import save_tiny_model_dir
    from peftkit.cli.main import main

    base = save_tiny_model_dir(tmp_path / "base")
    model = peftkit.get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        peftkit.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"),
    )
    model.save_pretrained(tmp_path / "adapter")
    assert main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    for directory in ("adapter", "merged"):
        assert _mode(tmp_path / directory) == 0o777 & ~umask, directory
        for path in (tmp_path / directory).iterdir():
            assert _mode(path) == 0o666 & ~umask, (path.name, oct(_mode(path)))
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_stale_temporaries_are_recognised_by_their_full_name(tmp_path):
    leftovers = ["adapter.tmp-1a2b3c4d", "metrics.jsonl.tmp-k_8zq0ab", "adapter.old-abcdefgh"]
    kept = ["notes.tmp-1.txt", "my.old-version", "adapter", "x.tmp-ABCDEFGH"]
    for name in leftovers + kept:
        (tmp_path / name).mkdir() if "adapter" in name else (tmp_path / name).write_text("x")
    (tmp_path / "adapter" / "model.safetensors.tmp-00000000").write_text("x")
    assert [is_temporary(name) for name in leftovers + kept] == [True] * 3 + [False] * 4
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert [p.name for p in remove_stale_temporaries(tmp_path, recursive=True)] == [
        "model.safetensors.tmp-00000000"
    ]
    assert list((tmp_path / "adapter").iterdir()) == []
