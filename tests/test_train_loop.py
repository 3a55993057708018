"""The training loop on a tiny model: it learns, accumulates by tokens, and resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit.train.checkpoint import list_checkpoints
from peftkit.train.config import build_job_config
from peftkit.train.loop import run_training

pytestmark = pytest.mark.usefixtures("single_thread")

ROWS = [
    {"prompt": f"word {w} is", "completion": label}
    for w, label in [
        ("good", "positive"),
        ("bad", "negative"),
        ("fine", "neutral"),
        ("great", "positive"),
        ("awful", "negative"),
        ("okay", "neutral"),
        ("nice", "positive"),
        ("poor", "negative"),
    ]
] * 6


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def job(tiny_model_dir, data_file, out, **training):
    settings = {
        "max_steps": 8,
        "batch_size": 4,
        "learning_rate": 1e-2,
        "precision": "fp32",
        "seed": 7,
        "warmup_steps": 2,
        "group_by_length": False,
    }
    settings.update(training)
    return build_job_config(
        {
            "base_model": str(tiny_model_dir),
            "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": "all-linear"},
            "data": {"train": str(data_file), "test_size": 8},
            "training": settings,
            "evaluation": {"accuracy_after": False},
            "output_dir": str(out),
        }
    )


def adapter_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_reduces_loss_and_writes_outputs(tiny_model_dir, data_file, tmp_path):
    run_training(job(tiny_model_dir, data_file, tmp_path, max_steps=30), progress=False)
    losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    for name in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "loss.png",
        "train_config.yaml",
        "eval_results.json",
    ]:
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


def test_gradient_accumulation_matches_large_batch(tiny_model_dir, data_file, tmp_path):
    big = job(tiny_model_dir, data_file, tmp_path / "big", batch_size=4)
    big.method_config.lora_dropout = 0.0
    small = job(tiny_model_dir, data_file, tmp_path / "small", batch_size=2, gradient_accumulation_steps=2)
    small.method_config.lora_dropout = 0.0
    run_training(big, progress=False)
    run_training(small, progress=False)
    a, b = adapter_weights(tmp_path / "big"), adapter_weights(tmp_path / "small")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_resume_ends_with_the_same_adapter(tiny_model_dir, data_file, tmp_path):
    run_training(job(tiny_model_dir, data_file, tmp_path / "straight", save_every=3), progress=False)
    interrupted = job(tiny_model_dir, data_file, tmp_path / "resumed", save_every=3)
    assert run_training(interrupted, progress=False, stop_after_step=5) == {"interrupted_at": 5}
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step-000003"]
    run_training(interrupted, resume=True, progress=False)
    a, b = adapter_weights(tmp_path / "straight"), adapter_weights(tmp_path / "resumed")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [r["step"] for r in read_metrics(tmp_path / "resumed") if "loss" in r]
    assert steps == list(range(1, 9))


def test_existing_run_is_not_silently_overwritten(tiny_model_dir, data_file, tmp_path):
    from peftkit.errors import PeftkitError

    run_training(job(tiny_model_dir, data_file, tmp_path, max_steps=2), progress=False)
    with pytest.raises(PeftkitError, match="--resume"):
        run_training(job(tiny_model_dir, data_file, tmp_path, max_steps=2), progress=False)
    run_training(job(tiny_model_dir, data_file, tmp_path, max_steps=2), progress=False, overwrite=True)


def test_overwrite_keeps_the_old_run_until_the_new_one_starts(tiny_model_dir, data_file, tmp_path):
    from peftkit.errors import TargetModulesError

    run_training(job(tiny_model_dir, data_file, tmp_path, max_steps=2, save_every=1), progress=False)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    broken = job(tiny_model_dir, data_file, tmp_path, max_steps=2)
    broken.method_config.target_modules = ["no_such_module"]
    with pytest.raises(TargetModulesError):
        run_training(broken, progress=False, overwrite=True)
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    # A new run that is interrupted leaves only its own files: no old adapter next to its config.
    new = job(tiny_model_dir, data_file, tmp_path, max_steps=4, save_every=100)
    assert run_training(new, progress=False, overwrite=True, stop_after_step=1) == {"interrupted_at": 1}
    assert not (tmp_path / "adapter").exists() and not list_checkpoints(tmp_path)
    assert "max_steps: 4" in (tmp_path / "train_config.yaml").read_text()
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == [1]


def test_adapter_records_a_relative_base_directory_as_absolute(
    tiny_model_dir, data_file, tmp_path, monkeypatch
):
    monkeypatch.chdir(tiny_model_dir.parent)
    run_training(
        job(Path(tiny_model_dir.name), data_file, tmp_path, max_steps=1, warmup_steps=0), progress=False
    )
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())


def test_resume_refuses_a_changed_config_and_names_the_keys(tiny_model_dir, data_file, tmp_path):
    from peftkit.errors import PeftkitError

    run = job(tiny_model_dir, data_file, tmp_path, save_every=2)
    run_training(run, progress=False, stop_after_step=3)
    changed = job(tiny_model_dir, data_file, tmp_path, save_every=2, learning_rate=5e-3)
    changed.method_config.r = 8
    with pytest.raises(PeftkitError, match=r"lora.r \(4 -> 8\), training.learning_rate \(0.01 -> 0.005\)"):
        run_training(changed, progress=False, resume=True)
    with pytest.raises(PeftkitError, match="pass one of them"):
        run_training(run, progress=False, resume=True, overwrite=True)
    # what does not change the training may change: logging, checkpoint cadence, evaluation
    same = job(tiny_model_dir, data_file, tmp_path, save_every=3, log_every=2)
    same.evaluation.show_samples = 0
    run_training(same, progress=False, resume=True)
    assert (tmp_path / "adapter").is_dir()


def test_interrupted_save_leaves_no_complete_checkpoint(tiny_model_dir, data_file, tmp_path, monkeypatch):
    import peftkit.train.checkpoint as checkpoint

    real = checkpoint.save_file

    def crash_on_rng(tensors, filename, *args, **kwargs):
        if filename.endswith("rng.safetensors"):
            raise KeyboardInterrupt("killed during save")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", crash_on_rng)
    with pytest.raises(KeyboardInterrupt):
        run_training(job(tiny_model_dir, data_file, tmp_path, save_every=2), progress=False)
    assert list_checkpoints(tmp_path) == []
    assert not list((tmp_path / "checkpoints").glob("step-*[0-9]"))


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_adapter(tiny_model_dir, data_file, tmp_path):
    """A real SIGKILL of `peftkit train`, then `--resume`, against an uninterrupted run."""
    import yaml

    def write_config(out: Path) -> Path:
        raw = job(tiny_model_dir, data_file, out, max_steps=60, save_every=5, num_threads=1).to_yaml_dict()
        path = out.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(raw))
        return path

    cmd = [sys.executable, "-m", "peftkit", "train", "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run([*cmd, str(write_config(tmp_path / "straight"))], check=True, env=env, capture_output=True)

    config = write_config(tmp_path / "killed")
    proc = subprocess.Popen(
        [*cmd, str(config)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not list_checkpoints(tmp_path / "killed") and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "adapter").exists(), "run finished before it could be killed"
    subprocess.run([*cmd, str(config), "--resume"], check=True, env=env, capture_output=True)
    a, b = adapter_weights(tmp_path / "straight"), adapter_weights(tmp_path / "killed")
    for key in a:
        assert torch.equal(a[key], b[key]), key


RESUME_METHODS = {
    # the adapter file holds the encoder's output, not the encoder: resume needs the training state
    "p_tuning": {"num_virtual_tokens": 4, "encoder_hidden_size": 16, "encoder_dropout": 0.1},
    "prefix_tuning": {"num_virtual_tokens": 4, "prefix_projection": True, "encoder_hidden_size": 16},
    "bottleneck": {"bottleneck_size": 4},
}


@pytest.mark.parametrize("method", RESUME_METHODS)
def test_resume_is_exact_for_methods_whose_file_is_not_their_state(
    method, tiny_model_dir, data_file, tmp_path
):
    def make(out):
        config = job(tiny_model_dir, data_file, out, save_every=3).to_yaml_dict()
        config.pop("lora")
        config.update(method=method, **{method: {"task_type": "CAUSAL_LM", **RESUME_METHODS[method]}})
        return build_job_config(config)

    run_training(make(tmp_path / "straight"), progress=False)
    interrupted = make(tmp_path / "resumed")
    run_training(interrupted, progress=False, stop_after_step=5)
    run_training(interrupted, resume=True, progress=False)
    a, b = adapter_weights(tmp_path / "straight"), adapter_weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_precision_where_bf16_is_not_native(monkeypatch, capsys):
    """auto picks fp32 on a CPU without native bf16; an explicit bf16 is honoured there (emulated:
    same results, slower) with a note; a device that cannot run bf16 at all is refused."""
    import peftkit.models
    from peftkit.errors import PeftkitError
    from peftkit.precision import resolve_autocast

    monkeypatch.setattr(peftkit.models, "bf16_supported", lambda device: False)
    cpu = torch.device("cpu")
    assert resolve_autocast("auto", cpu) is None and resolve_autocast("fp32", cpu) is None
    assert resolve_autocast("bf16", cpu) is torch.bfloat16
    assert "no native bfloat16" in capsys.readouterr().err
    with pytest.raises(PeftkitError, match="does not support bfloat16: use fp32"):
        resolve_autocast("bf16", torch.device("cuda"))
    monkeypatch.setattr(peftkit.models, "bf16_supported", lambda device: True)
    assert resolve_autocast("auto", cpu) is torch.bfloat16 and resolve_autocast("fp32", cpu) is None


@pytest.mark.parametrize(
    "train, message",
    [
        (None, "no training data: set data.train"),
        ("missing.jsonl", "missing.jsonl does not exist"),
        ("notes.txt", "unsupported file type '.txt'"),
        ("builtin:tweet-sentimnt", "unknown built-in data set"),
    ],
)
def test_data_problems_are_reported_before_the_model_loads(
    tiny_model_dir, tmp_path, monkeypatch, train, message
):
    import peftkit.cli.main as cli_main
    import peftkit.models
    from peftkit.errors import DataError

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(peftkit.models, "load_model_and_tokenizer", forbidden)
    monkeypatch.setattr(peftkit.models, "load_model", forbidden, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    config = {
        "base_model": str(tiny_model_dir),
        "data": {"train": train},
        "output_dir": str(tmp_path / "out"),
    }
    with pytest.raises(DataError, match=message):
        run_training(build_job_config(config), progress=False)
    (tmp_path / "eval.yaml").write_text(json.dumps({**config, "data": {"test": train}}))
    if train is not None:  # eval too: the split it reads is checked before the model loads
        assert cli_main.main(["eval", str(tmp_path / "eval.yaml"), "--no-adapter"]) == 2
