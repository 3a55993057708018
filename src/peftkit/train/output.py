"""What a training run keeps in its output directory, and the results it prints at the end.

``output_dir/`` holds ``adapter/`` (the final adapter and tokenizer), ``checkpoints/``
(``train/checkpoint.py``), ``metrics.jsonl`` and its plot (``train/metrics.py``),
``eval_results.json`` and ``train_config.yaml``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.tasks import Task
from peftkit.train.checkpoint import checkpoints_dir, latest_checkpoint, list_checkpoints
from peftkit.train.metrics import METRICS_FILE

ADAPTER_DIR = "adapter"
RESULTS_FILE = "eval_results.json"


def prepare_output_dir(output_dir: Path, *, resume: bool, overwrite: bool) -> Path | None:
    """Return the checkpoint to resume from; refuse to silently mix two runs in one directory."""
    checkpoint = latest_checkpoint(output_dir)
    if resume:
        if checkpoint is None:
            # Only rank 0 prepares the directory: no other process prints this too.
            print(
                f"--resume: no complete checkpoint in {output_dir}/checkpoints, starting from step 0",
                file=sys.stderr,
                flush=True,
            )
        return checkpoint
    has_run = list_checkpoints(output_dir) or (output_dir / ADAPTER_DIR).exists()
    if has_run and not overwrite:
        raise PeftkitError(
            f"{output_dir} already holds a run (checkpoints or an adapter): pass --resume to continue it, "
            "--overwrite to start again, or set output_dir to a new directory"
        )
    if overwrite:
        # A later --resume must never pick up a checkpoint of the run being replaced.
        shutil.rmtree(checkpoints_dir(output_dir), ignore_errors=True)
        for name in (RESULTS_FILE, METRICS_FILE):
            (output_dir / name).unlink(missing_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    return None


def report(task: Task, results: dict[str, Any], plot: Path | None) -> None:
    lines = ["", "=== peftkit train: results ===", *task.report_lines(results)]
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
