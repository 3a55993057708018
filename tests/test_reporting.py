"""`logging.report_to: [tensorboard]`: TensorBoard shows what metrics.jsonl holds, step by step,
also after a resume; a reporter that is unknown or not installed is a config error."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import TINY_ROWS
from peftkit.configuration import ConfigError
from peftkit.train.config import build_job_config, load_job_config
from peftkit.train.loop import run_training

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS * 2))
    return path


@pytest.fixture(autouse=True)
def event_files_sort_in_writing_order(monkeypatch):
    """Readers take a directory's event files in name order: time in seconds, host, pid, then a
    per-process counter, whose 10 sorts before 9. A test's runs share a second and a pid; the
    counter restarts per test so that they never reach 10."""
    from tensorboard.summary.writer import event_file_writer

    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(0))


def job(model_dir, data_file, out, *, logging=None, **training):
    settings = {"max_steps": 6, "batch_size": 4, "learning_rate": 1e-2, "precision": "fp32", "seed": 7}
    settings.update(training)
    return build_job_config(
        {
            "base_model": str(model_dir),
            "lora": {"r": 2, "target_modules": ["q_proj", "v_proj"]},
            "data": {"train": str(data_file), "test_size": 4, "val_size": 4},
            "training": settings,
            "evaluation": {"accuracy_after": False},
            "logging": {"report_to": ["tensorboard"]} if logging is None else logging,
            "output_dir": str(out),
        }
    )


def jsonl_series(out: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as {key: [(step, value), ...]}, each value rounded to float32 as TensorBoard
    stores scalars."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step":
                series.setdefault(key, []).append((record["step"], float(np.float32(value))))
    return series


def tensorboard_series(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard's reader shows for ``log_dir``: every scalar tag as [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    reader.Reload()
    return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


def expected_tags(series: dict[str, list]) -> dict[str, list]:
    return {("eval/" if key.startswith("val_") else "train/") + key: points for key, points in series.items()}


def test_tensorboard_shows_the_metrics_jsonl_values_step_by_step(tiny_model_dir, data_file, tmp_path):
    run_training(job(tiny_model_dir, data_file, tmp_path, eval_every=2), progress=False)
    series = jsonl_series(tmp_path)
    assert [step for step, _ in series["val_loss"]] == [2, 4, 6]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "epoch"} <= series.keys()
    shown = tensorboard_series(tmp_path / "tensorboard")
    assert shown == expected_tags(series)
    assert [step for step, _ in shown["train/loss"]] == list(range(1, 7))


def test_resume_shows_each_step_once_with_the_resumed_values(tiny_model_dir, data_file, tmp_path):
    interrupted = job(tiny_model_dir, data_file, tmp_path, save_every=2, eval_every=2)
    assert run_training(interrupted, progress=False, stop_after_step=3) == {"interrupted_at": 3}
    before = tensorboard_series(tmp_path / "tensorboard")
    assert [step for step, _ in before["train/loss"]] == [1, 2, 3]
    run_training(interrupted, resume=True, progress=False)  # from the step-2 checkpoint
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    shown = tensorboard_series(tmp_path / "tensorboard")
    assert shown == expected_tags(jsonl_series(tmp_path))
    assert [step for step, _ in shown["train/loss"]] == list(range(1, 7))
    assert [step for step, _ in shown["eval/val_loss"]] == [2, 4, 6]
    assert shown["train/step_time_s"][:2] == before["train/step_time_s"][:2]  # kept from the first run
    # step 3 ran twice; the losses agree (resuming is exact), the timings tell the runs apart
    assert shown["train/step_time_s"][2] != before["train/step_time_s"][2]


def test_resume_drops_points_past_the_checkpoint_that_are_not_logged_again(
    tiny_model_dir, data_file, tmp_path
):
    # log_every may change on resume: steps the interrupted run logged after its checkpoint must
    # vanish even when the resumed run does not log them again.
    run_training(job(tiny_model_dir, data_file, tmp_path, save_every=2), progress=False, stop_after_step=3)
    run_training(
        job(tiny_model_dir, data_file, tmp_path, save_every=2, log_every=2), resume=True, progress=False
    )
    shown = tensorboard_series(tmp_path / "tensorboard")
    assert [step for step, _ in shown["train/loss"]] == [1, 2, 4, 6]
    assert shown == expected_tags(jsonl_series(tmp_path))


def test_tensorboard_may_be_turned_on_when_resuming_a_run_from_before_the_logging_section(
    tiny_model_dir, data_file, tmp_path
):
    run_training(
        job(tiny_model_dir, data_file, tmp_path, logging={}, save_every=2), progress=False, stop_after_step=3
    )
    recorded = yaml.safe_load((tmp_path / "train_config.yaml").read_text())
    del recorded["logging"]  # as a run started before `logging:` existed recorded its config
    (tmp_path / "train_config.yaml").write_text(yaml.safe_dump(recorded))
    run_training(job(tiny_model_dir, data_file, tmp_path, save_every=2), resume=True, progress=False)
    shown = tensorboard_series(tmp_path / "tensorboard")
    assert [step for step, _ in shown["train/loss"]] == [3, 4, 5, 6]  # from the resumed step on


def test_without_report_to_no_tensorboard_files_are_written(tiny_model_dir, data_file, tmp_path):
    run_training(job(tiny_model_dir, data_file, tmp_path, logging={}, max_steps=2), progress=False)
    assert (tmp_path / "metrics.jsonl").is_file()
    assert not (tmp_path / "tensorboard").exists()


def test_logging_dir_is_where_the_event_files_go(tiny_model_dir, data_file, tmp_path):
    logging = {"report_to": ["tensorboard"], "logging_dir": str(tmp_path / "tb")}
    run_training(
        job(tiny_model_dir, data_file, tmp_path / "out", logging=logging, max_steps=2), progress=False
    )
    assert not (tmp_path / "out" / "tensorboard").exists()
    assert [step for step, _ in tensorboard_series(tmp_path / "tb")["train/loss"]] == [1, 2]


def test_overwrite_removes_the_old_runs_event_files(tiny_model_dir, data_file, tmp_path):
    run_training(job(tiny_model_dir, data_file, tmp_path, max_steps=3), progress=False)
    run_training(job(tiny_model_dir, data_file, tmp_path, max_steps=2), progress=False, overwrite=True)
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert [step for step, _ in tensorboard_series(tmp_path / "tensorboard")["train/loss"]] == [1, 2]


def test_only_the_writing_rank_opens_reporters(tmp_path):
    from peftkit.train.metrics import MetricsLog
    from peftkit.train.reporting import LoggingConfig

    with MetricsLog(tmp_path, enabled=False, reporting=LoggingConfig(report_to=["tensorboard"])) as log:
        log.log({"step": 1, "loss": 1.0})
    assert not list(tmp_path.iterdir())


def test_cutting_an_event_file_keeps_whole_records_up_to_the_step(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from peftkit.train.reporting import cut_events_after

    writer = SummaryWriter(str(tmp_path))
    for step in range(1, 6):
        writer.add_scalar("train/loss", step / 10, step)
    writer.close()
    (path,) = tmp_path.glob("events.out.tfevents.*")
    with open(path, "ab") as handle:  # what a run killed in the middle of a write leaves
        handle.write(b"\x30\x00\x00\x00\x00\x00\x00\x00\x01\x02")
    cut_events_after(path, 3)
    assert tensorboard_series(tmp_path) == {"train/loss": [(s, float(np.float32(s / 10))) for s in (1, 2, 3)]}
    size = path.stat().st_size
    cut_events_after(path, 3)  # nothing past step 3 left: the file stays as it is
    assert path.stat().st_size == size


def test_unknown_reporter_names_the_key_and_the_valid_values():
    with pytest.raises(ConfigError) as err:
        build_job_config({"logging": {"report_to": ["tensorbord"]}})
    assert "'logging.report_to[0]' must be one of 'tensorboard', got 'tensorbord'" in str(err.value)


@pytest.mark.parametrize(
    "logging, fragment",
    [
        ({"report_to": "tensorboard"}, "'logging.report_to' must be a list, got 'tensorboard'"),
        ({"report_to": ["tensorboard", "tensorboard"]}, "'logging.report_to' lists a reporter twice"),
        ({"logging_dir": " "}, "'logging.logging_dir' is empty"),
        ({"report_too": []}, "unknown key 'logging.report_too': did you mean 'report_to'?"),
    ],
)
def test_malformed_logging_section_is_a_config_error(logging, fragment):
    with pytest.raises(ConfigError) as err:
        build_job_config({"logging": logging})
    assert fragment in str(err.value)


def test_report_to_is_a_list_override(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": "x.jsonl"}, "output_dir": str(tmp_path / "out")}))
    job_config = load_job_config(path, ["logging.report_to=[tensorboard]"])
    assert job_config.logging.report_to == ["tensorboard"]
    assert job_config.to_yaml_dict()["logging"] == {"report_to": ["tensorboard"], "logging_dir": None}


def test_missing_tensorboard_is_refused_before_the_model_loads(
    tiny_model_dir, data_file, tmp_path, monkeypatch
):
    import peftkit.models

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the reporters were checked")

    monkeypatch.setattr(peftkit.models, "load_model_and_tokenizer", no_loading)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what `import tensorboard` meets when absent
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": str(data_file)}, "output_dir": str(tmp_path / "out")}))
    with pytest.raises(
        ConfigError, match=r"pip install tensorboard \(or pip install 'peftkit\[tensorboard\]'\)"
    ):
        load_job_config(path, ["logging.report_to=[tensorboard]"])
    load_job_config(path)  # nothing asked of tensorboard: nothing refused
    # the Python API (run_training without load_job_config) checks it too, before loading
    with pytest.raises(ConfigError, match="'logging.report_to' lists tensorboard, which is not installed"):
        run_training(job(tiny_model_dir, data_file, tmp_path / "api"), progress=False)
