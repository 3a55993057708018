"""Where the per-step training metrics go besides ``metrics.jsonl`` (the job file's ``logging:``).

    logging:
      report_to: [tensorboard]   # event files for `tensorboard --logdir OUTPUT_DIR/tensorboard`
      logging_dir: null          # null: OUTPUT_DIR/tensorboard

A reporter receives every record :class:`peftkit.train.metrics.MetricsLog` writes, on the process
that writes ``metrics.jsonl`` (rank 0 under torchrun), and nothing else: ``metrics.jsonl`` stays
the record of the run; a reporter is a view of it in the tool people watch.

trackio is not offered: ``pip install trackio`` pulls a web-server stack (gradio_client, uvicorn,
starlette, websockets, uvloop, httptools, watchfiles, orjson, brotli: 14 packages besides trackio
0.43.0, checked with ``pip install --dry-run``) and would downgrade pillow, too much for a sink.
"""

from __future__ import annotations

import numbers
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from peftkit.configuration import ConfigError

DEFAULT_LOGGING_SUBDIR = "tensorboard"
EVENT_FILE_SUFFIX = ".peftkit"  # marks the event files a run may cut back on resume: only its own
INSTALL_HINT = "pip install tensorboard (or pip install 'peftkit[tensorboard]')"


@dataclass
class LoggingConfig:
    """Reporters that show the training metrics as they are written."""

    report_to: list[Literal["tensorboard"]] = field(
        default_factory=list,
        metadata={
            "help": "A list of where the per-step metrics also go (output_dir/metrics.jsonl is always "
            "written): [] or [tensorboard] (event files in logging_dir; needs `pip install tensorboard`). "
            "The same numbers as metrics.jsonl, by step, tagged train/<key> (loss, lr, grad_norm, ...) "
            "and eval/<key> (val_loss, ...). trackio is not supported: it installs a web-server stack."
        },
    )
    logging_dir: str | None = field(
        default=None,
        metadata={
            "help": "Directory for the reporters' files (null: output_dir/tensorboard); view it with "
            "`tensorboard --logdir DIR`. A relative path is read from the directory you run peftkit in. "
            "One per run, like output_dir: a run that starts or resumes cuts the event files peftkit "
            "wrote there back to its first step, as it does metrics.jsonl."
        },
    )

    def validate(self) -> list[str]:
        problems = []
        if len(set(self.report_to)) != len(self.report_to):
            problems.append(f"'logging.report_to' lists a reporter twice: {self.report_to!r}")
        if self.logging_dir is not None and not self.logging_dir.strip():
            problems.append(
                "'logging.logging_dir' is empty: set a directory, or null for output_dir/tensorboard"
            )
        return problems


def logging_dir(config: LoggingConfig, output_dir: str | Path) -> Path:
    return (
        Path(config.logging_dir).expanduser()
        if config.logging_dir
        else Path(output_dir) / DEFAULT_LOGGING_SUBDIR
    )


def reporter_problems(config: LoggingConfig, output_dir: str | Path) -> list[str]:
    """What stops the chosen reporters on this machine: a package not installed, or an unwritable
    ``logging_dir`` (checked before any model loads, like the device and ``output_dir``)."""
    if not config.report_to:
        return []
    from peftkit.preflight import writable_dir_problem

    try:
        import tensorboard  # noqa: F401 - only whether it is there; the writer imports it when used
    except ImportError:
        return [f"'logging.report_to' lists tensorboard, which is not installed: {INSTALL_HINT}"]
    problem = writable_dir_problem(logging_dir(config, output_dir), "'logging.logging_dir'")
    return [problem] if problem else []


def check_reporters(config: LoggingConfig, output_dir: str | Path) -> None:
    if problems := reporter_problems(config, output_dir):
        raise ConfigError(problems)


class MetricsSink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def tag(key: str) -> str:
    """``loss`` -> ``train/loss``, ``val_loss`` -> ``eval/val_loss``: TensorBoard draws each part
    before the slash as its own section, and the key stays the one metrics.jsonl uses."""
    return f"{'eval' if key.startswith('val_') else 'train'}/{key}"


class TensorBoardSink:
    """Each numeric value of a record as a TensorBoard scalar at the record's step, in a new event
    file in ``directory`` per run and per resume.

    First, peftkit's earlier event files there are cut back to ``resume_step``, as metrics.jsonl
    is: what an interrupted run logged after its last checkpoint is trained and logged again, and
    every TensorBoard reader must show each step once. A ``purge_step`` marker in the new file, the
    usual answer, did not do it: ``tensorboard --logdir`` 2.21 (both ``--load_fast`` modes) still
    showed the interrupted run's points that the resumed run did not log again (checked by hand);
    its Rust data server replaces a tag's old points only when the tag is logged again at or
    before their step, and a changed ``training.log_every`` skips steps."""

    def __init__(self, directory: Path, *, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        for path in directory.glob(f"events.out.tfevents.*{EVENT_FILE_SUFFIX}"):
            cut_events_after(path, resume_step)
        self._writer = SummaryWriter(str(directory), filename_suffix=EVENT_FILE_SUFFIX)

    def write(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                self._writer.add_scalar(tag(key), value, global_step=record["step"])
        # on disk at once, as metrics.jsonl is: a live viewer sees each step, a crash loses nothing
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def cut_events_after(path: Path, step: int) -> None:
    """Truncate event file ``path`` before its first event past ``step`` (peftkit writes events in
    step order), or before a record a killed run left half-written.

    A record is a little-endian uint64 length, a 4-byte CRC of it, the serialized ``Event``, and a
    4-byte CRC of that; truncating at a record boundary leaves a valid file, whose CRCs still hold.
    """
    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto.event_pb2 import Event

    data = memoryview(path.read_bytes())
    offset = 0
    while offset + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        end = offset + 12 + length + 4
        if end > len(data):
            break
        try:
            if Event.FromString(data[offset + 12 : end - 4]).step > step:
                break
        except DecodeError:
            break
        offset = end
    if offset < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(offset)


SINKS = {"tensorboard": TensorBoardSink}  # each name LoggingConfig.report_to accepts


def open_sinks(
    config: LoggingConfig, output_dir: str | Path, *, resume_step: int | None
) -> list[MetricsSink]:
    """The sinks ``config`` asks for, for a run whose first new step is ``resume_step + 1``."""
    directory = logging_dir(config, output_dir)
    return [SINKS[name](directory, resume_step=resume_step or 0) for name in config.report_to]
