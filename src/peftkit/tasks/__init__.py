"""Task types beyond causal language modelling: how a task's data is encoded, batched, scored and evaluated.

One :class:`~peftkit.tasks.base.Task` subclass per PEFT ``TaskType``, in :data:`TASKS`. The
training loop and ``peftkit eval`` get one with :func:`get_task` and call its hooks only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.methods.base import TaskType
from peftkit.tasks.base import TASK_FILE, Task, TaskExample
from peftkit.tasks.causal_lm import CausalLMTask
from peftkit.tasks.classification import ClassificationTask
from peftkit.tasks.question_answering import QuestionAnsweringTask
from peftkit.tasks.seq2seq import Seq2SeqTask
from peftkit.tasks.token_classification import TokenClassificationTask

TASKS: dict[TaskType, type[Task]] = {
    TaskType.CAUSAL_LM: CausalLMTask,
    TaskType.SEQ_CLS: ClassificationTask,
    TaskType.TOKEN_CLS: TokenClassificationTask,
    TaskType.QUESTION_ANS: QuestionAnsweringTask,
    TaskType.SEQ_2_SEQ_LM: Seq2SeqTask,
}
"""The task types that can be trained and evaluated from the CLI."""

NOT_TRAINABLE = {
    TaskType.FEATURE_EXTRACTION: "FEATURE_EXTRACTION has no training objective (it returns hidden "
    "states, there is nothing to compare them with): train a task with a head, e.g. SEQ_CLS, and use "
    "PeftModelForFeatureExtraction from Python for embeddings"
}


def get_task(
    task_type: TaskType | str | None, objective: str = "sft", preference: Any = None, job: Any = None
) -> Task:
    """A fresh task object for ``task_type`` (None: CAUSAL_LM), or for an ``objective`` (dpo, kto,
    orpo, simpo, reward, online_dpo, grpo: ``peftkit.objectives``) with its ``preference`` options
    (and, for the online ones, ``job``'s reward and sampling sections)."""
    if objective not in (None, "sft"):
        from peftkit.objectives import objective_task

        return objective_task(objective, preference, job)
    kind = TaskType(task_type) if task_type is not None else TaskType.CAUSAL_LM
    if kind in NOT_TRAINABLE:
        raise PeftkitError(NOT_TRAINABLE[kind])
    return TASKS[kind]()


def save_task(task: Task, directory: str | Path) -> None:
    """Write the task's metadata (type, label names) next to a saved adapter."""
    from peftkit.io import write_json

    write_json(Path(directory) / TASK_FILE, task.metadata())


def load_task(adapter_dir: str | Path, default: TaskType | str | None = None) -> Task:
    """The task an adapter was trained for: its TASK_FILE, else its config's task_type, else ``default``.

    Label names come from TASK_FILE; without one a classifier's labels must come from the data.
    """
    path = Path(adapter_dir) / TASK_FILE
    meta: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    task_type = meta.get("task_type")
    if task_type is None:
        config = Path(adapter_dir) / "adapter_config.json"
        if config.is_file():
            task_type = json.loads(config.read_text()).get("task_type")
    preference = None
    if meta.get("objective") not in (None, "sft"):
        from peftkit.configuration import from_dict
        from peftkit.objectives import PreferenceConfig

        preference = from_dict(PreferenceConfig, meta.get("preference") or {})
    task = get_task(task_type or default, meta.get("objective") or "sft", preference)
    task.restore_metadata(meta)
    return task


def require_loader(adapter_dir: str | Path, loader_task: str, command: str) -> None:
    """Refuse an adapter trained for a head other than ``loader_task`` (e.g. a classifier in
    ``peftkit generate``) with an error that says what to use instead."""
    meta = Path(adapter_dir) / TASK_FILE
    config = Path(adapter_dir) / "adapter_config.json"
    source = meta if meta.is_file() else config
    task_type = json.loads(source.read_text()).get("task_type") if source.is_file() else None
    if task_type is None or task_type not in {t.value for t in TaskType}:
        return
    kind = TaskType(task_type)
    if kind in TASKS and TASKS[kind].loader_task == loader_task:
        return
    raise PeftkitError(
        f"{adapter_dir} was trained for task {kind.value}, but `peftkit {command}` generates text with a "
        f"causal language model (CAUSAL_LM adapters only); measure this adapter with "
        f"`peftkit eval --adapter {adapter_dir}` instead"
    )


__all__ = [
    "NOT_TRAINABLE",
    "TASKS",
    "TASK_FILE",
    "Task",
    "TaskExample",
    "get_task",
    "load_task",
    "require_loader",
    "save_task",
]
