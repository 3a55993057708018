"""`peftkit train` rejects bad configs and bad data with clear messages, before training starts."""

from __future__ import annotations

import json

import pytest
import yaml

from peftkit.cli.main import main

pytestmark = pytest.mark.usefixtures("single_thread")


def run_cli(args, capsys) -> tuple[int, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err


def test_mistyped_key_fails_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import peftkit.models

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(peftkit.models, "load_model_and_tokenizer", no_loading)
    path = tmp_path / "job.yaml"
    path.write_text(
        yaml.safe_dump({"data": {"train": "x.jsonl"}, "training": {"learnig_rate": 1e-3}, "lora": {"rr": 4}})
    )
    code, err = run_cli(["train", str(path)], capsys)
    assert code == 2
    assert "unknown key 'training.learnig_rate': did you mean 'learning_rate'" in err
    assert "unknown key 'lora.rr'" in err and "'r'" in err


def test_bad_override_value_is_reported(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("data: {train: x.jsonl}\n")
    code, err = run_cli(["train", str(path), "--set", "training.batch_size=zero"], capsys)
    assert code == 2 and "'training.batch_size' must be an integer, got 'zero'" in err


def test_malformed_data_row_names_file_and_line(tiny_model_dir, tmp_path, capsys):
    model_dir = tiny_model_dir
    data = tmp_path / "train.jsonl"
    rows = [json.dumps({"prompt": "a", "completion": "b"})] * 3 + ['{"prompt": "c", "completion": ']
    data.write_text("\n".join(rows) + "\n")
    job = {
        "base_model": str(model_dir),
        "data": {"train": str(data)},
        "output_dir": str(tmp_path / "out"),
        "training": {"max_steps": 1, "precision": "fp32"},
        "evaluation": {"accuracy_after": False},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    code, err = run_cli(["train", str(path), "--no-progress"], capsys)
    assert code == 2 and "train.jsonl:4" in err

    job["data"]["skip_bad_rows"] = True
    path.write_text(yaml.safe_dump(job))
    code, err = run_cli(["train", str(path), "--no-progress"], capsys)
    assert (
        code == 0
        and "skipped" in err
        and (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    )


@pytest.mark.parametrize("text", ["", "[]\n"])
def test_empty_data_is_an_error(tiny_model_dir, tmp_path, capsys, text):
    model_dir = tiny_model_dir
    data = tmp_path / ("train.jsonl" if not text else "train.json")
    data.write_text(text)
    path = tmp_path / "job.yaml"
    path.write_text(
        yaml.safe_dump(
            {"base_model": str(model_dir), "data": {"train": str(data)}, "output_dir": str(tmp_path / "out")}
        )
    )
    code, err = run_cli(["train", str(path)], capsys)
    assert code == 2 and data.name in err
