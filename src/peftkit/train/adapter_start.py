"""The adapter a run trains: a new one from the job's method section, or ``init_adapter``'s.

``init_adapter: DIR`` continues from a saved adapter (an SFT -> DPO pipeline, or more SFT on a
new data set): its saved config and weights are loaded trainable, so the method and its options
are the saved adapter's; a job whose ``method`` differs is refused rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError


def check_init_adapter(job: Any) -> None:
    """Before any model loads: ``init_adapter`` names a saved adapter. (Not a config check: a
    shipped example may name the adapter another example writes.)"""
    if job.init_adapter is not None and not (Path(job.init_adapter) / "adapter_config.json").is_file():
        raise PeftkitError(
            f"'init_adapter' is {job.init_adapter}, which has no adapter_config.json: give the directory "
            "of a saved adapter (e.g. runs/my-run/adapter), or train the run that writes it first"
        )


def attach_adapter(job: Any, model: Any, method_config: Any) -> Any:
    """``model`` wrapped with the adapter training starts from (trainable)."""
    from peftkit import get_peft_model

    if job.init_adapter is None:
        return get_peft_model(model, method_config)
    from peftkit.methods import get_method
    from peftkit.methods.base import PeftConfig
    from peftkit.peft_model import PeftModel

    saved = PeftConfig.from_pretrained(job.init_adapter)
    expected = get_method(job.method).config_cls
    if not isinstance(saved, expected):
        raise PeftkitError(
            f"init_adapter {job.init_adapter} is a {saved.peft_type} adapter but the job's method is "
            f"{job.method}: set method to the adapter's (its options come from the saved adapter)"
        )
    saved_task = getattr(saved.task_type, "value", saved.task_type)
    if saved_task not in (None, job.task.value):
        raise PeftkitError(
            f"init_adapter {job.init_adapter} was trained for task {saved_task} but this job's task is "
            f"{job.task.value}: start from an adapter of the same task, or drop init_adapter"
        )
    config = dataclasses.replace(saved, task_type=job.task)
    return PeftModel.from_pretrained(model, job.init_adapter, config=config, is_trainable=True)
