"""What a training run keeps in its output directory, and the results it prints at the end.

``output_dir/`` holds ``adapter/`` (the final adapter and tokenizer), ``checkpoints/``
(``train/checkpoint.py``), ``metrics.jsonl`` and its plot (``train/metrics.py``), ``tensorboard/``
(with ``logging.report_to: [tensorboard]``, ``train/reporting.py``),
``eval_results.json`` and ``train_config.yaml`` (the job as run, which ``--resume`` compares with).
While a run trains, its writing process holds ``.peftkit-train.lock`` there (``train/run_lock.py``).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from peftkit.errors import PeftkitError
from peftkit.forgetting import forgetting_lines
from peftkit.io import move_aside, remove_stale_temporaries
from peftkit.tasks import Task
from peftkit.train.checkpoint import checkpoints_dir, latest_checkpoint, list_checkpoints
from peftkit.train.distributed import World
from peftkit.train.metrics import METRICS_FILE, PLOT_FILE
from peftkit.train.reporting import DEFAULT_LOGGING_SUBDIR
from peftkit.train.run_lock import RunLock

ADAPTER_DIR = "adapter"
RESULTS_FILE = "eval_results.json"


CONFIG_FILE = "train_config.yaml"
# What a resumed run may change: none of it changes what is trained.
RESUMABLE = (
    "output_dir",
    "evaluation.",
    "logging.",
    "training.log_every",
    "training.save_every",
    "training.keep_checkpoints",
    "training.num_threads",
    "training.device",
    "training.collective_timeout_minutes",
)


@contextmanager
def claim_output_dir(output_dir: Path, world: World) -> Iterator[None]:
    """Hold ``output_dir`` for one run. The writing rank (0) locks it, so that another live run
    there is refused, by name; then it deletes what interrupted atomic writes left in the run
    (``adapter.tmp-*`` of a kill during the final save, ``checkpoints/step-*.tmp-*``, ...): with
    the lock held, none of them can be another live run's. The other ranks write nothing here.
    """
    if not world.is_main:
        yield
        return
    created = not output_dir.exists()
    with RunLock(output_dir) as lock:
        # The run's own folders whole; other folders a user keeps beside them are not looked into.
        own = [(output_dir, False), (output_dir / ADAPTER_DIR, True), (checkpoints_dir(output_dir), True)]
        for folder, recursive in own:
            for path in remove_stale_temporaries(folder, recursive=recursive):
                print(f"removed {path} (left by an interrupted save)", file=sys.stderr, flush=True)
        try:
            yield
        except BaseException:
            # A run that failed before writing anything leaves no directory it made itself (a
            # bad model or data file must not leave an empty run behind). Unlinked while held.
            if created and [p.name for p in output_dir.iterdir()] == [lock.path.name]:
                lock.path.unlink(missing_ok=True)
                lock.release()
                output_dir.rmdir()
            raise


def prepare_output_dir(
    output_dir: Path, *, resume: bool, overwrite: bool, config: dict[str, Any] | None = None
) -> Path | None:
    """Return the checkpoint to resume from; refuse to silently mix two runs in one directory.

    With ``overwrite`` nothing is deleted yet: :func:`replace_previous_run` removes the old run
    once the new one is set up, so a run that fails before training leaves the old one intact.
    With ``resume``, ``config`` (the job as ``train_config.yaml`` records it) must match the run's
    except for the ``RESUMABLE`` keys.
    """
    if resume and overwrite:
        raise PeftkitError(
            "--resume continues the run in output_dir and --overwrite replaces it: pass one of them"
        )
    checkpoint = latest_checkpoint(output_dir)
    if resume:
        if checkpoint is None:
            # Only rank 0 prepares the directory: no other process prints this too.
            print(
                f"--resume: no complete checkpoint in {output_dir}/checkpoints, starting from step 0",
                file=sys.stderr,
                flush=True,
            )
        elif config is not None:
            check_same_config(output_dir / CONFIG_FILE, config)
        return checkpoint
    has_run = list_checkpoints(output_dir) or (output_dir / ADAPTER_DIR).exists()
    if has_run and not overwrite:
        raise PeftkitError(
            f"{output_dir} already holds a run (checkpoints or an adapter): pass --resume to continue it, "
            "--overwrite to start again, or set output_dir to a new directory"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    return None


def recorded_base(base_model: str) -> str:
    """The base model as the adapter records it: a local directory as an absolute path (a relative
    one would mean another directory to a later command run elsewhere), an alias or Hub id as is."""
    path = Path(base_model).expanduser()
    return str(path.resolve()) if path.is_dir() else base_model


def replace_previous_run(output_dir: Path, keep: set[str] | frozenset[str] = frozenset()) -> None:
    """Remove what an earlier run wrote into ``output_dir`` (for ``--overwrite``), once the new run
    is set up: a later ``--resume`` must never pick up the old run's checkpoints, and an interrupted
    new run must not sit next to the old run's adapter. Other files are kept, and so are the names
    in ``keep``: what the new run's own setup already wrote (its "before" predictions ...)."""
    for name in (
        ADAPTER_DIR,
        checkpoints_dir(output_dir).name,
        RESULTS_FILE,
        METRICS_FILE,
        PLOT_FILE,
        CONFIG_FILE,
        DEFAULT_LOGGING_SUBDIR,  # TensorBoard would draw the old run's event files with the new one's
        "predictions_before.jsonl",  # train/held_out.py
        "predictions_after.jsonl",
        "reference_logps.safetensors",  # objectives/precompute.py
    ):
        if name in keep:
            continue
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(move_aside(path), ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def check_same_config(recorded: Path, config: dict[str, Any]) -> None:
    """Refuse to resume with settings that differ from the recorded run's (they would be ignored,
    or break the checkpoint's shapes), naming every changed key."""
    if not recorded.is_file():
        return  # a run from before the config was recorded: nothing to compare
    before = _leaves(yaml.safe_load(recorded.read_text()) or {})
    now = _leaves(yaml.safe_load(yaml.safe_dump(config, sort_keys=False)) or {})
    changed = [
        f"{key} ({before.get(key, '<unset>')!r} -> {now.get(key, '<unset>')!r})"
        for key in sorted(set(before) | set(now))
        if before.get(key) != now.get(key) and not key.startswith(RESUMABLE)
    ]
    if changed:
        raise PeftkitError(
            f"--resume: this config differs from the run's ({recorded}) in: {', '.join(changed)}. "
            "A resumed run continues with the settings it was started with: undo these changes, or start "
            "a new run (--overwrite, or another output_dir)"
        )


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"training.learning_rate": 0.01, ...}`` for a nested config dict."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def report(task: Task, results: dict[str, Any], plot: Path | None) -> None:
    lines = ["", "=== peftkit train: results ===", *task.report_lines(results)]
    lines += forgetting_lines(results.get("general"))
    if "validation" in results:
        lines.append(
            "validation "
            + ", ".join(f"{k.removeprefix('val_')} {v:.4f}" for k, v in results["validation"].items())
        )
    lines.append(f"adapter saved to: {results['adapter_dir']}")
    if plot:
        lines.append(f"loss curve: {plot}")
    print("\n".join(lines), flush=True)


def read_results(output_dir: Path) -> dict[str, Any]:
    path = output_dir / RESULTS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
