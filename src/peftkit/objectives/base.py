"""What the preference objectives share as tasks of the one training loop (``peftkit.tasks.Task``).

An objective is a task whose hooks encode preference rows, collate chosen and rejected rows into
one batch, compute its loss from completion log-probabilities, and keep the per-step metrics
TRL logs (``rewards/chosen`` ...). The loop calls :meth:`PreferenceTask.start_reference` once
the adapter exists and :meth:`PreferenceTask.step_metrics` after every optimizer step; it never
asks which objective it runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from peftkit.data.preference_encode import encode_pair, encode_unpaired
from peftkit.errors import DataError
from peftkit.methods.base import TaskType
from peftkit.objectives.config import REFERENCE_OBJECTIVES, PreferenceConfig
from peftkit.objectives.sequence import Reference, auto_reference
from peftkit.tasks.base import Task, TaskEncoder


class PreferenceEncoder(TaskEncoder):
    """Rows of format ``preference`` / ``kto`` -> tokenized examples, boundary checked (file:line errors)."""

    def __init__(self, task: PreferenceTask, tokenizer: Any, cfg: Any):
        super().__init__(task, tokenizer, cfg)
        from peftkit.data.chat import has_chat_template

        self.use_template = cfg.use_chat_template and has_chat_template(tokenizer)
        task.rendering = {  # saved with the adapter: `peftkit score` renders rows the same way
            "system_prompt": cfg.system_prompt,
            "use_chat_template": cfg.use_chat_template,
            "separator": cfg.separator,
            "max_seq_len": cfg.max_seq_len,
        }

    def encode_fields(self, rows: list[dict[str, Any]]) -> list[Any]:
        options = dict(
            max_seq_len=self.cfg.max_seq_len,
            max_prompt_len=self.task.preference.max_prompt_len,
            use_chat_template=self.cfg.use_chat_template,
            separator=self.cfg.separator,
        )
        out: list[Any] = []
        for fields in rows:
            try:
                if "chosen" in fields:
                    example = encode_pair(
                        self.tokenizer, fields["prompt"], fields["chosen"], fields["rejected"], **options
                    )
                else:
                    example = encode_unpaired(
                        self.tokenizer, fields["prompt"], fields["completion"], fields["desirable"], **options
                    )
            except DataError as err:
                out.append(str(err).removeprefix("row: "))
                continue
            self.stats.truncated += example.truncated
            out.append(example)
        return out


class PreferenceTask(Task):
    """Base of the objectives' tasks: data, reference, metric bookkeeping."""

    task_type = TaskType.CAUSAL_LM
    loader_task = "causal_lm"
    formats: tuple[str, ...] = ("preference",)
    objective: str = ""
    progress_metrics = ("rewards/margins", "rewards/accuracies", "kl", "margin", "accuracy")
    supports_fsdp = False  # the reference pass and the metrics are not tested sharded yet

    def __init__(self, preference: PreferenceConfig | None = None) -> None:
        super().__init__()
        self.preference = preference or PreferenceConfig()
        self.beta = self.preference.beta_for(self.objective)
        self.reference: Reference | None = None
        self.init_adapter: str | None = None  # the adapter training started from (its reference)
        self.rendering: dict[str, Any] | None = None  # how rows became text (the data options)
        self._sums: dict[str, float] = {}
        self._weights: dict[str, float] = {}  # per metric: a micro-batch may lack one (KTO's sides)
        self._extremes: dict[str, float] = {}  # min_* / max_* metrics

    @property
    def uses_reference(self) -> bool:
        return self.objective in REFERENCE_OBJECTIVES

    def metadata(self) -> dict[str, Any]:
        from peftkit.configuration import to_dict

        return {
            "task_type": self.task_type.value,
            "labels": self.labels,
            "objective": self.objective,
            "preference": to_dict(self.preference),
            "init_adapter": self.init_adapter,
            "rendering": self.rendering,
        }

    def restore_metadata(self, meta: dict[str, Any]) -> None:
        super().restore_metadata(meta)
        self.init_adapter = meta.get("init_adapter")
        self.rendering = meta.get("rendering")

    def encoder(self, tokenizer: Any, cfg: Any) -> PreferenceEncoder:
        return PreferenceEncoder(self, tokenizer, cfg)

    # -- the reference model --------------------------------------------------------------------
    def start_reference(
        self, model: Any, *, init_adapter: str | bool | None = None, **run: Any
    ) -> str | None:
        """The reference as training starts: ``auto`` (objectives/sequence.py), or ``precompute``d
        log-probs attached to every example (objectives/precompute.py); what it is, for the log.
        ``init_adapter``: the directory of the adapter training starts from (recorded with the
        adapter, where ``peftkit eval`` finds the reference again), or None."""
        if isinstance(init_adapter, str):
            self.init_adapter = str(Path(init_adapter).resolve())
        if not self.uses_reference:
            return None
        reference = auto_reference(model, init_adapter=bool(init_adapter))
        if self.preference.reference == "precompute":
            from peftkit.objectives.precompute import attach_reference_logps

            return attach_reference_logps(self, model, reference, **run)
        self.reference = reference
        return reference.name

    def start_evaluation(self, model: Any, adapter_dir: str | None) -> str | None:
        """``peftkit eval``: the reference the adapter was trained against, loaded next to it."""
        if not self.uses_reference or adapter_dir is None:
            return None
        from peftkit.objectives.evaluation import saved_reference

        self.reference = saved_reference(model, adapter_dir, self.init_adapter)
        return self.reference.name

    # -- per-step metrics -----------------------------------------------------------------------
    def keep_metrics(self, metrics: dict[str, float], weight: float) -> None:
        """Add one micro-batch's metrics, weighted by what they average over; a metric the
        micro-batch lacks (KTO's rewards/rejected without undesirable rows) adds no weight.
        ``min_*`` / ``max_*`` metrics keep the extreme instead (the reward model's scores)."""
        for name, value in metrics.items():
            if name.startswith(("min_", "max_")):
                pick = min if name.startswith("min_") else max
                self._extremes[name] = pick(self._extremes.get(name, value), value)
                continue
            self._sums[name] = self._sums.get(name, 0.0) + value * weight
            self._weights[name] = self._weights.get(name, 0.0) + weight

    def step_metrics(self, world: Any, device: torch.device) -> dict[str, float]:
        """The optimizer step's metrics over all its micro-batches on all ranks (means, or the
        extremes); reset. Ranks exchange what they kept as objects: one rank's share may lack a
        metric another has (KTO), so fixed-length tensors of values would misalign."""
        mine = (self._sums, self._weights, self._extremes)
        self._sums, self._weights, self._extremes = {}, {}, {}
        kept: list[Any] = [mine]
        if world.distributed:
            import torch.distributed as dist

            kept = [None] * world.size
            dist.all_gather_object(kept, mine)
        return _combine(kept)

    def validation(
        self,
        model: Any,
        examples: Sequence[Any],
        *,
        batch_size: int,
        pad_token_id: int,
        autocast_dtype: torch.dtype | None,
    ) -> dict[str, float]:
        """Mean loss over the validation split, with its metrics (``val_rewards/accuracies`` ...)."""
        saved = self._sums, self._weights, self._extremes  # a step's metrics, kept apart
        self._sums, self._weights, self._extremes = {}, {}, {}
        try:
            out = super().validation(
                model,
                examples,
                batch_size=batch_size,
                pad_token_id=pad_token_id,
                autocast_dtype=autocast_dtype,
            )
            kept = [(self._sums, self._weights, self._extremes)]
            out.update({f"val_{name}": value for name, value in _combine(kept).items()})
        finally:
            self._sums, self._weights, self._extremes = saved
        return out


def _combine(kept: list[tuple[dict[str, float], dict[str, float], dict[str, float]]]) -> dict[str, float]:
    """One step's metrics from every rank's (sums, weights, extremes)."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    extremes: dict[str, float] = {}
    for rank_sums, rank_weights, rank_extremes in kept:
        for name, value in rank_sums.items():
            sums[name] = sums.get(name, 0.0) + value
            weights[name] = weights.get(name, 0.0) + rank_weights[name]
        for name, value in rank_extremes.items():
            pick = min if name.startswith("min_") else max
            extremes[name] = pick(extremes.get(name, value), value)
    means = {name: sums[name] / weights[name] for name in sums if weights[name]}
    return dict(sorted({**means, **extremes}.items()))
