"""Every bad input to a command ends in one named error: a non-zero exit, a message naming the
problem, no Python traceback, and nothing written.

The table below runs each malformed config, data file, path, model or adapter through the CLI entry
point in-process (``peftkit.cli.main.main``). Inputs are built once per module from the tiny test
model; each case runs in its own empty working directory, which must still be empty afterwards.
Hostile inputs (a pickle that creates a file when unpickled, model code that creates one when
imported) must never get that far, and no network connection may be attempted. Cases that need
a fault injected (a full disk, a read-only file system) follow the table.
"""

from __future__ import annotations

import errno
import json
import pickle
import shutil
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import peftkit
from conftest import save_tiny_model_dir
from peftkit.cli.main import main

pytestmark = pytest.mark.usefixtures("single_thread")

ROWS = [
    {"prompt": f"word {w} is", "completion": c} for w, c in [("good", "positive"), ("bad", "negative")]
] * 4


class Unpickled:
    """A pickle payload: unpickling it creates the file ``path`` (as a hostile file would run code)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _lora_adapter(model_dir: Path, out: Path, **config) -> Path:
    from transformers import AutoModelForCausalLM

    lora = {"r": 4, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM", **config}
    model = peftkit.get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir), peftkit.LoraConfig(**lora)
    )
    model.save_pretrained(out)
    return out


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    data = {k: v for k, v in data.items() if v is not None}
    path.write_text(json.dumps(data))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def w(tiny_model_dir, tmp_path_factory) -> SimpleNamespace:
    """Every input the cases use, good and bad, under one directory."""
    root = tmp_path_factory.mktemp("bad-inputs")
    w = SimpleNamespace(root=root, model=tiny_model_dir, marker=root / "CODE_RAN")
    w.data = root / "train.jsonl"
    w.data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    w.adapter = _lora_adapter(w.model, root / "adapter")
    w.run_dir = root / "run"  # a `peftkit train` output_dir: the adapter is inside it
    _copy(w.adapter, w.run_dir / "adapter")

    w.truncated_model = _copy(w.model, root / "truncated-model")
    weights = w.truncated_model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    w.pickle_model = _copy(w.model, root / "pickle-model")
    (w.pickle_model / "model.safetensors").unlink()
    (w.pickle_model / "pytorch_model.bin").write_bytes(pickle.dumps(Unpickled(w.marker)))
    w.remote_model = _copy(w.model, root / "remote-code-model")  # its config names Python files to run
    for module, base in [("configuration_evil", "LlamaConfig"), ("modeling_evil", "LlamaForCausalLM")]:
        code = f"open({str(w.marker)!r}, 'w').close()\nfrom transformers import {base}\n"
        (w.remote_model / f"{module}.py").write_text(code + f"class Evil({base}):\n    pass\n")
    _edit_json(
        w.remote_model / "config.json",
        model_type="evil",
        auto_map={"AutoConfig": "configuration_evil.Evil", "AutoModelForCausalLM": "modeling_evil.Evil"},
    )
    w.broken_config_model = _copy(w.model, root / "broken-config-model")
    (w.broken_config_model / "config.json").write_text('{"model_type": "llama", ')
    w.unknown_arch_model = _copy(w.model, root / "unknown-arch-model")
    _edit_json(w.unknown_arch_model / "config.json", model_type="no_such_architecture")
    w.other_model = save_tiny_model_dir(root / "other-model", hidden_size=48)

    w.pickle_adapter = root / "pickle-adapter"  # adapter_model.bin only
    w.pickle_adapter.mkdir()
    shutil.copy(w.adapter / "adapter_config.json", w.pickle_adapter)
    (w.pickle_adapter / "adapter_model.bin").write_bytes(pickle.dumps(Unpickled(w.marker)))
    w.hub_remote_adapter = _copy(w.adapter, root / "hub-remote-adapter")
    _edit_json(
        w.hub_remote_adapter / "adapter_config.json",
        base_model_name_or_path="evil-org/remote-code-model",
        trust_remote_code=True,
        auto_map={"AutoModelForCausalLM": "modeling_evil.Evil"},
    )
    w.remote_adapter = _copy(w.adapter, root / "remote-code-adapter")  # on the local remote-code model
    _edit_json(w.remote_adapter / "adapter_config.json", base_model_name_or_path=str(w.remote_model))
    w.class_adapter = _copy(w.adapter, root / "foreign-class-adapter")  # no task_type: auto_mapping decides
    _edit_json(
        w.class_adapter / "adapter_config.json",
        task_type=None,
        auto_mapping={"base_model_class": "Evil", "parent_library": "modeling_evil"},
    )
    w.nan_adapter = _copy(w.adapter, root / "nan-adapter")
    tensors = load_file(w.nan_adapter / "adapter_model.safetensors")
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, w.nan_adapter / "adapter_model.safetensors")
    w.huge_adapter = _copy(w.adapter, root / "huge-adapter")  # finite, but B @ A overflows to inf
    save_file(
        {k: torch.full_like(t, 1e30) for k, t in tensors.items()},
        w.huge_adapter / "adapter_model.safetensors",
    )
    w.truncated_adapter = _copy(w.adapter, root / "truncated-adapter")
    weights = w.truncated_adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    w.latin1_adapter = _copy(w.adapter, root / "latin1-adapter")
    config = (w.latin1_adapter / "adapter_config.json").read_text()
    (w.latin1_adapter / "adapter_config.json").write_bytes(
        config.replace("{", '{"note": "caf\xe9",', 1).encode("latin-1")
    )
    w.other_adapter = _lora_adapter(w.other_model, root / "other-base-adapter")
    w.other_adapter_same_name = _copy(w.other_adapter, root / "other-base-adapter-renamed")
    _edit_json(w.other_adapter_same_name / "adapter_config.json", base_model_name_or_path=str(w.model))

    w.latin1_data = root / "latin1.jsonl"
    w.latin1_data.write_bytes(b'{"prompt": "caf\xe9", "completion": "x"}\n')
    w.empty_data = root / "empty.jsonl"
    w.empty_data.write_text("")
    w.latin1_prompts = root / "prompts.txt"
    w.latin1_prompts.write_bytes(b"caf\xe9 au lait\n")
    return w


def job(w: SimpleNamespace, **changes) -> dict:
    """A valid one-step training job on the tiny model, with ``changes`` (a dict value updates a section)."""
    base = {
        "base_model": str(w.model),
        "data": {"train": str(w.data)},
        "output_dir": "out",
        "training": {"max_steps": 1, "batch_size": 2, "precision": "fp32"},
        "evaluation": {"accuracy_after": False},
    }
    for key, value in changes.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and key in base else value
    return base


def config_file(content: bytes | str | dict, name: str = "job.yaml") -> Callable[[Path], str]:
    """A builder that writes ``content`` (a mapping is dumped as YAML) into the case's directory."""

    def write(tmp: Path) -> str:
        path = tmp.parent / f"{tmp.name}-{name}"  # beside the working directory, which stays empty
        if isinstance(content, dict):
            path.write_text(yaml.safe_dump(content), encoding="utf-8")
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return str(path)

    return write


@dataclass
class Case:
    id: str
    argv: Callable[[SimpleNamespace, Path], list[str]]  # (inputs, the case's empty directory) -> argv
    expect: str  # a substring of the error message


def cli(template: str) -> Callable[[SimpleNamespace, Path], list[str]]:
    """argv from ``template``: words split at spaces, ``{name}`` replaced by the input ``w.name``."""
    return lambda w, tmp: [word.format(**vars(w)) for word in template.split()]


def train(content: Callable[[SimpleNamespace], bytes | str | dict]) -> Callable:
    return lambda w, tmp: ["train", config_file(content(w))(tmp), "--no-progress"]


def inspect(content: bytes | str) -> Callable:
    return lambda w, tmp: ["inspect", config_file(content)(tmp)]


EVAL = "eval --data {data} --base-model {model}"
GENERATE = "generate --prompt hi --max-new-tokens 2"
COMBINE = "combine {adapter} {adapter} --weights 1 1"
CASES = [
    # -- train: the config file itself
    Case("train-config-random-bytes", train(lambda w: bytes(range(128, 256))), "must be UTF-8"),
    Case("train-config-latin1", train(lambda w: b"base_model: caf\xe9\xff\n"), "line 1, column 16 (byte offset 15)"),
    Case("train-config-empty", train(lambda w: ""), "is empty"),
    Case("train-config-only-comments", train(lambda w: "# nothing here\n"), "is empty"),
    Case("train-config-list", train(lambda w: "- base_model: x\n"), "at the top level, got list"),
    Case("train-config-scalar", train(lambda w: "hello\n"), "at the top level, got str"),
    Case("train-config-directory", cli("train {root}"), "is a directory"),
    Case("train-config-missing", cli("train {root}/nope.yaml"), "does not exist"),
    Case("train-config-bad-yaml", train(lambda w: "training: [1, 2\n"), "is not valid YAML"),
    Case("train-config-key-twice", train(lambda w: "method: lora\nmethod: ia3\n"), "given twice"),
    Case("train-set-bad-value", lambda w, tmp: [*train(job)(w, tmp), "--set", "training.batch_size=two"], "must be an integer"),
    # -- train: device and output directory, checked before the model loads
    Case("train-device-tpu", train(lambda w: job(w, training={"device": "tpu"})), "'training.device' is 'tpu'"),
    Case("train-device-missing-gpu", train(lambda w: job(w, training={"device": "cuda:7"})), "this machine does not have"),
    Case("train-output-dir-is-file", train(lambda w: job(w, output_dir=str(w.data))), "exists and is a file"),
    Case("train-output-dir-under-file", train(lambda w: job(w, output_dir=str(w.data / "run"))), "lies under"),
    Case("train-output-dir-empty", train(lambda w: job(w, output_dir="")), "'output_dir' is empty"),
    # -- train: models and data
    Case("train-base-truncated", train(lambda w: job(w, base_model=str(w.truncated_model))), "still being copied"),
    Case("train-base-pickle-only", train(lambda w: job(w, base_model=str(w.pickle_model))), "no *.safetensors"),
    Case("train-base-remote-code", train(lambda w: job(w, base_model=str(w.remote_model))), "--trust-remote-code"),
    Case("train-base-is-file", train(lambda w: job(w, base_model=str(w.data))), "is a file"),
    Case("train-data-latin1", train(lambda w: job(w, data={"train": str(w.latin1_data)})), "not valid utf-8"),
    Case("train-data-empty", train(lambda w: job(w, data={"train": str(w.empty_data)})), "empty.jsonl"),
    Case("train-data-missing", train(lambda w: job(w, data={"train": str(w.root / "no.jsonl")})), "does not exist"),
    Case("train-data-directory", train(lambda w: job(w, data={"train": str(w.root)})), "unsupported file type"),
    # -- eval
    Case("eval-device-tpu", cli(f"{EVAL} --device tpu"), "--device is 'tpu'"),
    Case("eval-json-directory", cli(f"{EVAL} --json {{root}}"), "is a directory"),
    Case("eval-json-under-file", cli(f"{EVAL} --json {{data}}/r.json"), "is a file"),
    Case("eval-batch-size-0", cli(f"{EVAL} --batch-size 0"), "--batch-size must be at least 1, got 0"),
    Case("eval-max-new-tokens-negative", cli(f"{EVAL} --max-new-tokens -1"), "--max-new-tokens must be at least 1"),
    Case("eval-config-latin1", lambda w, tmp: ["eval", config_file(b"x: caf\xe9\n")(tmp)], "must be UTF-8"),
    Case("eval-pickle-adapter", cli(f"{EVAL} --adapter {{pickle_adapter}}"), "a pickle file"),
    Case("eval-adapter-config-latin1", cli(f"{EVAL} --adapter {{latin1_adapter}}"), "is not valid JSON"),
    Case("eval-other-base-adapter", cli(f"{EVAL} --adapter {{other_adapter}}"), "wrong shape"),
    Case("eval-truncated-base", cli("eval --data {data} --base-model {truncated_model}"), "truncated"),
    Case("eval-hub-remote-adapter", cli("eval --data {data} --adapter {hub_remote_adapter}"), "HF_HUB_OFFLINE"),
    # -- generate and chat
    Case("generate-device-missing-gpu", cli(f"{GENERATE} --base-model {{model}} --device cuda:7"), "'cuda:7'"),
    Case("generate-prompts-latin1", cli("generate --base-model {model} --prompts-file {latin1_prompts}"), "byte 0xe9 at line 1"),
    Case("generate-pickle-adapter", cli(f"{GENERATE} --adapter {{pickle_adapter}}"), "never unpickles"),
    Case("generate-hub-remote-adapter", cli(f"{GENERATE} --adapter {{hub_remote_adapter}}"), "HF_HUB_OFFLINE"),
    Case("generate-remote-code-adapter", cli(f"{GENERATE} --adapter {{remote_adapter}}"), "--trust-remote-code"),
    Case("generate-other-base-adapter", cli(f"{GENERATE} --base-model {{model}} --adapter {{other_adapter}}"), "wrong shape"),
    Case("generate-truncated-adapter", cli(f"{GENERATE} --adapter {{truncated_adapter}}"), "truncated"),
    Case("generate-truncated-base", cli(f"{GENERATE} --base-model {{truncated_model}}"), "model.safetensors is not a readable"),
    Case("generate-run-dir-as-adapter", cli(f"{GENERATE} --adapter {{run_dir}}"), "did you mean"),
    Case("chat-device-tpu", cli("chat --base-model {model} --device tpu"), "--device is 'tpu'"),
    # -- merge
    Case("merge-nan-adapter", cli("merge {nan_adapter} merged"), "NaN or inf"),
    Case("merge-nan-adapter-unsafe", cli("merge {nan_adapter} merged --no-safe"), "NaN or inf"),
    Case("merge-overflowing-adapter", cli("merge {huge_adapter} merged"), "cannot merge"),
    Case("merge-pickle-adapter", cli("merge {pickle_adapter} merged"), "never unpickles"),
    Case("merge-hub-remote-adapter", cli("merge {hub_remote_adapter} merged"), "HF_HUB_OFFLINE"),
    Case("merge-remote-code-adapter", cli("merge {remote_adapter} merged"), "--trust-remote-code"),
    Case("merge-foreign-base-class", cli("merge {class_adapter} merged"), "not a transformers class"),
    Case("merge-other-base-adapter", cli("merge {other_adapter} merged --base-model {model}"), "wrong shape"),
    Case("merge-truncated-adapter", cli("merge {truncated_adapter} merged"), "truncated"),
    Case("merge-truncated-base", cli("merge {adapter} merged --base-model {truncated_model}"), "truncated"),
    Case("merge-out-under-file", cli("merge {adapter} {data}/merged"), "lies under"),
    Case("merge-out-is-file", cli("merge {adapter} {data}"), "is not a directory"),
    # -- combine
    Case("combine-nan-adapter", cli("combine {nan_adapter} {adapter} --weights 1 1 --out c"), "NaN or inf"),
    Case("combine-nan-adapter-linear", cli("combine {nan_adapter} {adapter} --weights 1 1 --type linear --out c"), "NaN or inf"),
    Case("combine-nan-weight", cli("combine {adapter} {adapter} --weights nan 1 --out c"), "must be finite"),
    Case("combine-pickle-adapter", cli("combine {pickle_adapter} --weights 1 --out c"), "never unpickles"),
    Case("combine-hub-remote-adapter", cli("combine {hub_remote_adapter} --weights 1 --out c"), "HF_HUB_OFFLINE"),
    Case("combine-other-base-adapter", cli("combine {adapter} {other_adapter_same_name} --weights 1 1 --out c"), "wrong shape"),
    Case("combine-truncated-adapter", cli("combine {adapter} {truncated_adapter} --weights 1 1 --out c"), "truncated"),
    Case("combine-out-under-file", cli("combine {adapter} --weights 1 --out {data}/c"), "lies under"),
    Case("combine-bad-density", cli(f"{COMBINE} --type ties --density 5 --out c"), "density"),
    # -- inspect
    Case("inspect-config-latin1", inspect(b"method: lor\xe0\n"), "must be UTF-8"),
    Case("inspect-config-empty", inspect(""), "is empty"),
    Case("inspect-config-list", inspect("[lora]\n"), "got list"),
    Case("inspect-config-directory", cli("inspect {root}"), "is a directory"),
    Case("inspect-broken-config-json", cli("inspect --base-model {broken_config_model}"), "config.json"),
    Case("inspect-unknown-architecture", cli("inspect --base-model {unknown_arch_model}"), "no_such_architecture"),
    Case("inspect-remote-code", cli("inspect --base-model {remote_model}"), "--trust-remote-code"),
    Case("inspect-unknown-method", cli("inspect --base-model {model} --method lorra"), "did you mean 'lora'"),
]  # fmt: skip


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt is recorded (and fails): nothing may be downloaded."""
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError(errno.ENETUNREACH, "network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def run_cli(argv: list[str], capsys) -> tuple[int | None, str]:
    """``main(argv)``'s exit code and output; an escaping exception is output as its traceback."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    except Exception:
        code, text = None, traceback.format_exc()
        captured = capsys.readouterr()
        return code, captured.out + captured.err + text
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def assert_clean_error(code: int | None, output: str, expect: str) -> str:
    """The output's error line (the whole output if none); checks exit code, message, no traceback."""
    assert "Traceback" not in output, output
    assert code not in (0, None), f"exit code {code}, expected an error naming {expect!r}:\n{output}"
    assert expect in output, output
    return output


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_a_named_error(case, w, tmp_path, monkeypatch, capsys, no_network):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # relative outputs ("out", "merged", "c") land here if anything is written
    argv = case.argv(w, work)
    code, output = run_cli(argv, capsys)
    assert_clean_error(code, output, case.expect)
    assert output.count(f"peftkit {argv[0]}: error:") == 1, output  # one error, not a cascade
    # Nothing at all: a train that fails removes the output_dir (and run lock) it made itself.
    written = [str(p.relative_to(work)) for p in work.rglob("*")]
    assert not written, f"{case.id} wrote {written}"
    assert not w.marker.exists(), f"{case.id} ran code from an input (unpickled or imported it)"
    assert not no_network, f"{case.id} tried to connect to {no_network}"


def test_device_check_names_the_gpus_this_machine_has(monkeypatch):
    """With two GPUs (simulated): cuda, cuda:1 and auto pass; cuda:2 is refused listing cpu, cuda:0, cuda:1."""
    from peftkit import preflight
    from peftkit.configuration import ConfigError
    from peftkit.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [preflight.device_problem(name, "--device") for name in ["cuda", "cuda:1", "cpu", "auto"]] == [
        None
    ] * 4
    assert preflight.auto_device() == torch.device("cuda")
    message = preflight.device_problem("cuda:2", "'training.device'")
    assert message.startswith("'training.device' is 'cuda:2', which this machine does not have; it has: ")
    assert "cpu, cuda:0, cuda:1" in message
    with pytest.raises(ConfigError, match="--device is 'gpu', which is not a device name"):
        resolve_device("gpu", "--device")


# -- a unicode path must work ---------------------------------------------------------------------


def test_unicode_config_path_trains_and_inspects(w, tmp_path, capsys):
    folder = tmp_path / "ünïcödé 配置"
    folder.mkdir()
    path = folder / "jöb.yaml"
    path.write_text(yaml.safe_dump(job(w, output_dir=str(folder / "rün"))), encoding="utf-8")
    code, output = run_cli(["train", str(path), "--no-progress"], capsys)
    assert code == 0, output
    assert (folder / "rün" / "adapter" / "adapter_model.safetensors").is_file()
    code, output = run_cli(["inspect", str(path)], capsys)
    assert code == 0 and "trainable params" in output, output


# -- faults injected: a file system that refuses writes, a disk that fills --------------------------


def _refuse_writes_under(monkeypatch, directory: Path, code: int) -> None:
    """Creating a file under ``directory`` fails with ``code`` (EROFS: read-only, EACCES: no permission)."""
    import os

    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and Path(os.fsdecode(path)).resolve().is_relative_to(directory.resolve()):
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_unwritable_output_dir_is_refused_before_the_model_loads(w, tmp_path, monkeypatch, capsys, code):
    import os

    import peftkit.models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model loaded before output_dir was checked")

    monkeypatch.setattr(peftkit.models, "load_model_and_tokenizer", no_loading)
    locked = tmp_path / "locked"
    locked.mkdir()
    _refuse_writes_under(monkeypatch, locked, code)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job(w, output_dir=str(locked / "run"))))
    code_, output = run_cli(["train", str(path), "--no-progress"], capsys)
    assert_clean_error(code_, output, f"'output_dir' {locked / 'run'} is not writable")
    assert os.strerror(code) in output and not list(locked.iterdir())
    code_, output = run_cli(["merge", str(w.adapter), str(locked / "merged")], capsys)
    assert_clean_error(code_, output, f"OUT_DIR {locked / 'merged'} is not writable")


def test_an_os_error_while_writing_names_the_path(w, tmp_path, monkeypatch, capsys):
    """An OSError that no check foresaw (here: the final rename of a merge) is one line naming the path."""
    import os

    real_replace = os.replace
    out = tmp_path / "merged"

    def read_only(src, dst, *args, **kwargs):
        if Path(dst) == out:
            raise OSError(errno.EROFS, "Read-only file system", str(src), str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", read_only)
    code, output = run_cli(["merge", str(w.adapter), str(out)], capsys)
    assert_clean_error(code, output, "Read-only file system")
    assert str(out) in output and "[EROFS]" in output
    assert len([line for line in output.splitlines() if "error:" in line]) == 1
    assert not list(tmp_path.iterdir())  # the temporary directory was removed


def _disk_full(kind: str):
    from safetensors import SafetensorError

    if kind == "oserror":
        return OSError(errno.ENOSPC, "No space left on device")
    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize(("kind", "fail_at"), [("oserror", 2), ("safetensors", 2), ("safetensors", 1)])
def test_disk_full_while_checkpointing_says_what_to_do_and_resume_works(
    w, tmp_path, monkeypatch, capsys, kind, fail_at
):
    import peftkit.train.checkpoint as checkpoint

    real_save = checkpoint.save_file

    def save_file(tensors, filename, *args, **kwargs):
        if f"step-{fail_at:06d}" in Path(filename).parent.name:
            raise _disk_full(kind)
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    out = tmp_path / "run"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job(w, output_dir=str(out), training={"max_steps": 3, "save_every": 1})))
    code, output = run_cli(["train", str(path), "--no-progress"], capsys)
    error = f"no space left on device while writing checkpoint step {fail_at} to {out / 'checkpoints'}"
    assert_clean_error(code, output, error)
    assert "MB)" in output and "free space and run with --resume" in output
    last = "the last complete checkpoint is step 1" if fail_at == 2 else "no complete checkpoint yet"
    assert last in output
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{s:06d}" for s in range(1, fail_at)]

    monkeypatch.setattr(checkpoint, "save_file", real_save)
    code, output = run_cli(["train", str(path), "--no-progress", "--resume"], capsys)
    assert code == 0, output
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_auto_peft_model_on_a_truncated_base_names_the_file(tmp_path):
    """A base loaded by its saved class (an adapter without task_type) reports a cut-short weights
    file as load_model_and_tokenizer does, not as a raw SafetensorError."""
    from transformers import AutoModelForCausalLM

    from peftkit import AutoPeftModel, LoraConfig, get_peft_model
    from peftkit.errors import ModelLoadError

    base_dir = save_tiny_model_dir(tmp_path / "base")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(target_modules=["q_proj"])
    )
    model.save_pretrained(tmp_path / "adapter")
    weights = base_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        AutoPeftModel.from_pretrained(tmp_path / "adapter")
