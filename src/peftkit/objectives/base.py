"""What the preference objectives share as tasks of the one training loop (``peftkit.tasks.Task``).

An objective is a task whose hooks encode preference rows, collate chosen and rejected rows into
one batch, compute its loss from completion log-probabilities, and keep the per-step metrics
TRL logs (``rewards/chosen`` ...). The loop calls :meth:`PreferenceTask.start_reference` once
the adapter exists and :meth:`PreferenceTask.step_metrics` after every optimizer step; it never
asks which objective it runs.
"""

from __future__ import annotations

from collections.abc import Sequence
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
        self._sums: dict[str, float] = {}
        self._weight = 0.0

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
        }

    def encoder(self, tokenizer: Any, cfg: Any) -> PreferenceEncoder:
        return PreferenceEncoder(self, tokenizer, cfg)

    # -- the reference model --------------------------------------------------------------------
    def start_reference(self, model: Any, *, init_adapter: bool = False, **run: Any) -> str | None:
        """The reference as training starts: ``auto`` (objectives/sequence.py), or ``precompute``d
        log-probs attached to every example (objectives/precompute.py); what it is, for the log."""
        if not self.uses_reference:
            return None
        reference = auto_reference(model, init_adapter=init_adapter)
        if self.preference.reference == "precompute":
            from peftkit.objectives.precompute import attach_reference_logps

            return attach_reference_logps(self, model, reference, **run)
        self.reference = reference
        return reference.name

    # -- per-step metrics -----------------------------------------------------------------------
    def keep_metrics(self, metrics: dict[str, float], weight: float) -> None:
        """Add one micro-batch's metric means, weighted by what they average over."""
        for name, value in metrics.items():
            self._sums[name] = self._sums.get(name, 0.0) + value * weight
        self._weight += weight

    def step_metrics(self, world: Any, device: torch.device) -> dict[str, float]:
        """The optimizer step's metrics, averaged over all its micro-batches on all ranks; reset."""
        names = sorted(self._sums)
        sums = world.sum([self._sums[n] for n in names] + [self._weight], device)
        self._sums, self._weight = {}, 0.0
        weight = sums[-1]
        return {name: value / weight for name, value in zip(names, sums[:-1])} if weight else {}

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
        saved = self._sums, self._weight
        self._sums, self._weight = {}, 0.0
        try:
            out = super().validation(
                model,
                examples,
                batch_size=batch_size,
                pad_token_id=pad_token_id,
                autocast_dtype=autocast_dtype,
            )
            out.update({f"val_{k}": v / self._weight for k, v in self._sums.items()} if self._weight else {})
        finally:
            self._sums, self._weight = saved
        return out
