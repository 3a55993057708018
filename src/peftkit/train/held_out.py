"""The held-out measures of a training run: the task's metrics on the test split before and after
training (with every prediction kept in ``predictions_before.jsonl`` / ``predictions_after.jsonl``)
and, with ``evaluation.general``, the perplexity on general text (``peftkit.forgetting``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftkit.forgetting import general_perplexity
from peftkit.io import atomic_file
from peftkit.tasks import Task

PREDICTIONS_FILE = "predictions_{label}.jsonl"


def evaluate_test(
    job: Any,
    task: Task,
    model: Any,
    tokenizer: Any,
    examples: Any,
    autocast_dtype: Any,
    label: str,
    *,
    say: Callable[[str], None],
    output_dir: Path | None = None,
) -> dict[str, Any]:
    """The task's held-out metrics (causal LM: accuracy by generation), printed as they come.
    ``output_dir`` (the writing rank's): where the per-example predictions go."""
    out = task.evaluate(model, tokenizer, examples, eval_cfg=job.evaluation, autocast_dtype=autocast_dtype)
    predictions = out.pop("predictions", None)
    say(f"Held-out {label} fine-tuning ({out['n']} examples): {task.metric_lines(out)[0]}")
    for line in out.get("summary_lines", []):
        say(f"  {line}")
    if predictions is not None and output_dir is not None:
        path = output_dir / PREDICTIONS_FILE.format(label=label)
        write_predictions(path, predictions)
        out["predictions_file"] = str(path)
    return out


def write_predictions(path: str | Path, predictions: list[dict[str, Any]]) -> None:
    """One JSON object per line (origin, prompt, expected, predicted, correct), written atomically."""
    with atomic_file(Path(path), "w") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in predictions)


def general_text(job: Any, model: Any, tokenizer: Any, autocast_dtype: Any) -> dict[str, Any]:
    """``evaluation.general``'s perplexity, in evaluation batches of pieces up to max_seq_len."""
    e = job.evaluation
    return general_perplexity(
        model,
        tokenizer,
        e.general,
        batch_size=e.batch_size,
        max_len=job.data.max_seq_len,
        autocast_dtype=autocast_dtype,
    )
