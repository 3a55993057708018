"""``peftkit eval`` on an adapter trained with a preference objective.

::

    held-out rows          adapter's objective      measured as
    preference / kto       dpo, orpo, simpo, kto    the objective's metrics (preference accuracy,
                           reward                   mean margin, ...; reward: pairwise accuracy)
    prompt_completion,     dpo, orpo, simpo, kto    a causal LM: loss, perplexity and accuracy by
    instruction, chat, text                         generation, exactly as an SFT adapter
    anything else          reward                   refused: a reward model scores pairs (or texts,
                                                    with ``peftkit score``)

The data's format decides (``data.format``, the built-in's default, else the first row's keys),
so the same adapter is measured on its preference pairs and on the SFT test split without an
option. DPO and KTO compare the policy with the reference it was trained against: the base model
(adapter disabled) for a new adapter, or the ``init_adapter`` it started from, which training
records in ``peftkit_task.json`` and :func:`saved_reference` loads next to the adapter.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from peftkit.data.builtin import apply_builtin_defaults, builtin_records, is_builtin
from peftkit.data.config import DataConfig
from peftkit.data.formats import LM_FORMATS, detect_format
from peftkit.data.readers import Record, read_file, read_rows
from peftkit.errors import DataError, PeftkitError
from peftkit.methods.base import TaskType
from peftkit.objectives.sequence import AdapterOff, Reference

REFERENCE_ADAPTER = "reference"
"""The name the reference adapter is loaded under, next to the evaluated one."""


class LoadedAdapter(Reference):
    """A saved adapter loaded next to the evaluated one, active for the reference pass."""

    def __init__(self, directory: str):
        self.name = f"the adapter training started from ({directory})"

    @contextlib.contextmanager
    def active(self, model: nn.Module) -> Iterator[None]:
        previous = model.active_adapter
        model.set_adapter(REFERENCE_ADAPTER)
        try:
            yield
        finally:
            model.set_adapter(previous)


def saved_reference(model: nn.Module, adapter_dir: str, init_adapter: str | None) -> Reference:
    """The reference of an adapter trained with dpo / kto: the base model, or its ``init_adapter``
    loaded into ``model`` (a ``PeftModel``) under :data:`REFERENCE_ADAPTER`."""
    if init_adapter is None:
        return AdapterOff()
    if not (Path(init_adapter) / "adapter_config.json").is_file():
        raise PeftkitError(
            f"{adapter_dir} was trained starting from the adapter in {init_adapter}, which is its reference "
            "model for the preference metrics, but that directory has no adapter any more: put it back "
            "there, or evaluate the adapter by generation on prompt/completion rows (e.g. the SFT test split)"
        )
    device = next(model.parameters()).device
    model.load_adapter(init_adapter, adapter_name=REFERENCE_ADAPTER)
    model.to(device)
    return LoadedAdapter(init_adapter)


def evaluation_task(task: Any, data_cfg: DataConfig, split: str) -> tuple[Any, str | None]:
    """The task that measures ``task``'s adapter on ``split`` of ``data_cfg`` (module docstring),
    and a line saying why where it is not ``task`` itself. Runs before the model loads."""
    objective = getattr(task, "objective", "sft")
    if objective == "sft":
        return task, None
    fmt = data_format(data_cfg, split, task)
    if fmt in task.formats or fmt == "auto":  # auto: no row to tell; the loader says what is wrong
        return task, None
    if fmt in LM_FORMATS and task.task_type == TaskType.CAUSAL_LM:
        from peftkit.tasks import get_task

        note = (
            f"the adapter was trained with objective {objective}; the {split} rows are {fmt} rows, so it "
            "is evaluated as a causal LM (loss, perplexity, accuracy by generation), like an SFT adapter"
        )
        return get_task(TaskType.CAUSAL_LM), note
    if objective == "reward":
        raise PeftkitError(
            f"the adapter is a reward model (objective reward), measured by its pairwise accuracy on "
            f"preference rows (prompt, chosen, rejected), but the {split} rows are {fmt} rows: evaluate it "
            "on preference data (--data pairs.jsonl, or a config whose data are preference pairs), or score "
            "texts with `peftkit score`"
        )
    raise PeftkitError(
        f"the adapter was trained with objective {objective} on {' / '.join(task.formats)} rows, but the "
        f"{split} rows are {fmt} rows: evaluate it on {' / '.join(task.formats)} rows, or on prompt / "
        "completion rows (accuracy by generation)"
    )


def data_format(data_cfg: DataConfig, split: str, task: Any) -> str:
    """The format of ``split``'s rows: ``data.format`` (built-in defaults applied), else detected from
    the first readable row among the LM and preference formats; ``auto`` when no row tells."""
    cfg = apply_builtin_defaults(data_cfg, task.task_type.value)
    if cfg.format != "auto":
        return cfg.format
    source = {"test": cfg.test, "validation": cfg.validation}.get(split) or cfg.train
    if source is None:
        return "auto"
    record = next((r for r in itertools.islice(_records(source, cfg), 100) if r.problem is None), None)
    if record is None:
        return "auto"
    try:
        return detect_format(cfg, record, (*LM_FORMATS, "preference", "kto"))
    except DataError:
        return "auto"


def _records(source: Any, cfg: DataConfig) -> Iterator[Record]:
    if isinstance(source, list):
        return read_rows(source, "data")
    if is_builtin(source):
        return builtin_records(source, cfg.encoding, cfg.encoding_errors)[0]
    return read_file(source, cfg.encoding, cfg.encoding_errors)
