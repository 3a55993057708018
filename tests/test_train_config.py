"""The job config is validated before any model loads, with errors that say what to change."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftkit.configuration import ConfigError
from peftkit.train.config import build_job_config, load_job_config
from peftkit.train.schedule import lr_multiplier

EXAMPLES = sorted(Path(__file__).resolve().parents[1].joinpath("examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_shipped_examples_validate(path):
    job = load_job_config(path)
    assert job.method_config is not None


def test_minimal_config_gets_defaults():
    job = build_job_config({"data": {"train": "x.jsonl"}})
    assert job.method == "lora" and job.base_model == "smollm2-135m-instruct"
    assert job.training.learning_rate == 2e-4
    assert job.method_config.r == 8


def _problems(raw) -> str:
    with pytest.raises(ConfigError) as info:
        build_job_config(raw)
    return str(info.value)


def test_unknown_top_level_key_names_closest():
    message = _problems({"trainig": {"max_steps": 3}})
    assert "trainig" in message and "'training'" in message


def test_unknown_nested_key_names_closest():
    message = _problems({"training": {"learnig_rate": 1e-3}})
    assert "training.learnig_rate" in message and "learning_rate" in message


def test_unknown_method_option_names_closest():
    message = _problems({"method": "lora", "lora": {"lora_alfa": 16}})
    assert "lora.lora_alfa" in message and "lora_alpha" in message


def test_unknown_method_suggests():
    assert "'lora'" in _problems({"method": "lroa"})


def test_misspelled_method_section_is_rejected():
    message = _problems({"method": "lora", "lorra": {"r": 4}})
    assert "lorra" in message and "'lora'" in message


def test_all_problems_reported_at_once():
    message = _problems(
        {"training": {"batch_size": 0, "learning_rate": -1.0, "lr_scheduler": "cosin"}, "lora": {"r": 0}}
    )
    for fragment in ["batch_size", "learning_rate", "cosin", "'cosine'", "r"]:
        assert fragment in message


def test_wrong_type_is_reported():
    message = _problems({"training": {"max_steps": "ten"}})
    assert "'training.max_steps' must be an integer" in message and "'ten'" in message


def test_overrides_apply_and_are_typed(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("data: {train: x.jsonl}\ntraining: {max_steps: 10}\n")
    job = load_job_config(cfg, ["training.max_steps=3", "lora.r=4", "training.learning_rate=1e-3"])
    assert job.training.max_steps == 3 and job.method_config.r == 4 and job.training.learning_rate == 1e-3


def test_bad_override_syntax(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("data: {train: x.jsonl}\n")
    with pytest.raises(ConfigError, match="key=value"):
        load_job_config(cfg, ["training.max_steps"])


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_job_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job_config(bad)


def test_round_trip_through_yaml_dict():
    job = build_job_config({"data": {"train": "x.jsonl"}, "lora": {"r": 4, "target_modules": ["q_proj"]}})
    again = build_job_config(job.to_yaml_dict())
    assert again.method_config.r == 4 and list(again.method_config.target_modules) == ["q_proj"]
    assert again.training == job.training


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedule_warms_up_then_decays(kind):
    values = [lr_multiplier(s, total=100, warmup=10, kind=kind, min_ratio=0.1) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert values[-1] == pytest.approx(0.1, abs=0.02)
    mid = lr_multiplier(55, total=100, warmup=10, kind=kind, min_ratio=0.0)
    assert mid == pytest.approx(0.5, abs=1e-6)


def test_a_key_given_twice_in_the_yaml_is_refused(tmp_path):
    """YAML keeps the last of two equal keys silently; the user usually edited the first."""
    path = tmp_path / "job.yaml"
    path.write_text("training:\n  learning_rate: 0.1\n  batch_size: 2\n  learning_rate: 0.2\n")
    with pytest.raises(ConfigError, match=r"key 'learning_rate' is given twice \(lines 2 and 4\): keep one"):
        load_job_config(path)
    # YAML merge keys may still be overridden by an explicit key
    path.write_text(
        "base: &t {learning_rate: 0.1, batch_size: 2}\ntraining:\n  <<: *t\n  learning_rate: 0.2\n"
    )
    from peftkit.train.config import read_yaml

    assert read_yaml(path)["training"] == {"learning_rate": 0.2, "batch_size": 2}
