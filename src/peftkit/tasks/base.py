"""What the training loop and ``peftkit eval`` need to know about a task type, as hooks.

::

    job.task (TaskType) --get_task--> Task
        prepare(data cfg)           label set (classification / tagging), before the model loads
        loader_task, model_kwargs   which transformers Auto class, which from_pretrained kwargs
        encoder(tokenizer, cfg)     rows (Samples) -> examples, file:line errors for bad rows
        collate(examples, pad)      examples -> tensors
        loss_sum(model, batch)      (sum of the loss, what it averages over): the loop divides the
                                    sum of a whole optimizer step by the total count, so gradient
                                    accumulation is exact whatever the batch boundaries
        evaluate(...)               held-out metrics dict;  report_lines(results) what to print

The loop and the CLI only call these hooks: adding a task type is one module and one line in
:data:`peftkit.tasks.TASKS`, with no ``if task == ...`` anywhere else.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from peftkit.data.encode import EncodeStats
from peftkit.errors import PeftkitError
from peftkit.methods.base import TaskType

IGNORE_INDEX = -100
TASK_FILE = "peftkit_task.json"
"""Written next to the adapter: the task type and its label names, which PEFT's files do not keep."""


@dataclass
class TaskExample:
    """One encoded example of a non-LM task.

    ``target`` is what the loss compares with: a class id (SEQ_CLS), one id per token with
    ``IGNORE_INDEX`` off the first sub-token of each word (TOKEN_CLS), ``[start, end]`` token
    positions (QUESTION_ANS), or target token ids (SEQ_2_SEQ_LM). ``extra`` keeps what only
    evaluation needs (offsets, the context, gold answers, token_type_ids for the model).

    A row too long for one sequence (QA's long contexts) becomes several consecutive examples,
    its windows, numbered by ``window`` (0, 1, ...): training uses each window on its own, while
    counting rows (``max_train_examples``, splits, summaries) and evaluation group them back.
    """

    input_ids: list[int]
    target: Any
    origin: str
    answer: str | None = None  # label name / answer text / target text, for summaries and metrics
    extra: dict[str, Any] = field(default_factory=dict)
    window: int = 0  # index of this window among its row's; 0 for the row's first (or only) one

    def __len__(self) -> int:
        return len(self.input_ids)


class TaskEncoder:
    """Base of the non-LM encoders: batch-tokenize samples, count truncations, report bad rows."""

    use_template = False

    def __init__(self, task: Task, tokenizer: Any, cfg: Any):
        self.task = task
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.stats = EncodeStats()

    def encode(self, samples: list[Any], on_error: Any) -> list[TaskExample]:
        examples: list[TaskExample] = []
        for sample, encoded in zip(samples, self.encode_fields([s.fields for s in samples])):
            if isinstance(encoded, str):
                on_error(sample.origin, encoded)
                continue
            for example in encoded if isinstance(encoded, list) else [encoded]:
                example.origin = sample.origin
                examples.append(example)
        return examples

    def encode_fields(self, rows: list[dict[str, Any]]) -> list[Any]:
        """Per row: one example, a list of its windows' examples, or a string saying what is wrong."""
        raise NotImplementedError

    def tokenize(self, *texts: list[Any], **kwargs: Any) -> Any:
        limit = self.cfg.max_seq_len
        return self.tokenizer(
            *texts, truncation=limit is not None, max_length=limit, add_special_tokens=True, **kwargs
        )


class Task:
    """Hooks for one task type; the defaults suit tasks whose loss averages over examples."""

    task_type: TaskType
    loader_task: str  # key of peftkit.models.TASKS
    formats: tuple[str, ...]
    generative: bool = False
    has_perplexity: bool = False
    supports_packing: bool = False  # whether :meth:`pack` exists (training.packing)
    progress_metrics: tuple[str, ...] = ()  # step_metrics keys the progress bar shows
    supports_fsdp: bool = True  # whether its loss is tested with sharded parameters (train/fsdp.py)

    def __init__(self) -> None:
        self.labels: list[str] | None = None

    # -- before the model loads -------------------------------------------------------------
    def prepare(self, data_cfg: Any, labels: list[str] | None = None) -> None:
        """Fix what the model's head depends on (the label set), from ``labels`` or the data."""

    def model_kwargs(self) -> dict[str, Any]:
        return {}

    def metadata(self) -> dict[str, Any]:
        """What to save next to the adapter (TASK_FILE) so evaluation rebuilds the same head."""
        return {"task_type": self.task_type.value, "labels": self.labels}

    def restore_metadata(self, meta: dict[str, Any]) -> None:
        """Take back what :meth:`metadata` saved (``load_task``)."""
        if meta.get("labels"):
            self.labels = list(meta["labels"])

    # -- data ---------------------------------------------------------------------------------
    def encoder(self, tokenizer: Any, cfg: Any) -> Any:
        raise NotImplementedError

    def collate(self, examples: Sequence[Any], pad_token_id: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def pack(
        self, examples: Sequence[Any], pad_token_id: int, capacity: int | None
    ) -> dict[str, torch.Tensor]:
        """Like :meth:`collate`, with several examples per row of up to ``capacity`` tokens."""
        raise NotImplementedError(f"{self.task_type.value} has no packed form")

    def use_shared_prefix(self, shared_prefix: Any) -> None:
        """Compute the prompt prefix all rows of a batch share once (train/shared_prefix.py), where
        the task's loss can; ``None`` turns it off. Only causal LM can: others ignore it."""

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """What ``loss_sum`` sums over in ``batch`` (here: its examples)."""
        return int(batch["input_ids"].shape[0])

    # -- training -----------------------------------------------------------------------------
    def start_reference(self, model: Any, **run: Any) -> str | None:
        """Set up what the loss compares ``model`` with (a preference objective's reference
        model), once the adapter training starts from exists; a line for the log, or None.
        ``run`` holds the data, run directory, world, precision and batch settings it may need."""
        return None

    def sample_step(
        self,
        model: Any,
        shards: list[tuple[list[Any], bool]],
        *,
        step: int,
        world: Any,
        global_batch_size: int,
    ) -> list[tuple[list[Any], bool]]:
        """A per-step phase before the micro-batches are collated: this step's micro-batches
        (examples, whether they count; this process's share of global micro-batches of
        ``global_batch_size`` examples) -> the ones to train on. The online objectives sample and
        judge answers here (objectives/online.py); other tasks train on the data as it is."""
        return shards

    def loss_sum(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def step_metrics(self, world: Any, device: torch.device) -> dict[str, float]:
        """Metrics of the optimizer step just taken beyond the loss (e.g. DPO's rewards), averaged
        over its micro-batches on all ranks; logged with the loss."""
        return {}

    # -- evaluation ---------------------------------------------------------------------------
    def start_evaluation(self, model: Any, adapter_dir: str | None) -> str | None:
        """``peftkit eval``, once the model and ``adapter_dir`` are loaded: set up what the metrics
        compare the model with (a preference objective's reference); a line for the output, or None."""
        return None

    def validation(
        self,
        model: Any,
        examples: Sequence[Any],
        *,
        batch_size: int,
        pad_token_id: int,
        autocast_dtype: torch.dtype | None,
    ) -> dict[str, float]:
        """Mean loss over ``examples`` (averaged the way training averages it)."""
        total, count = 0.0, 0
        with inference(model, autocast_dtype):
            for batch in self.device_batches(model, examples, batch_size, pad_token_id):
                loss, n = self.loss_sum(model, batch)
                total, count = total + float(loss), count + n
        loss = total / max(1, count)
        out = {"val_loss": loss}
        if self.has_perplexity:
            out["val_perplexity"] = math.exp(loss) if loss < 700 else math.inf
        return out

    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        examples: Sequence[Any],
        *,
        eval_cfg: Any,
        autocast_dtype: torch.dtype | None,
        batch_size: int | None = None,
    ) -> dict[str, Any]:
        """Held-out metrics after (and before) training; ``peftkit eval`` calls :meth:`eval_metrics`."""
        raise NotImplementedError

    def eval_metrics(
        self,
        model: Any,
        tokenizer: Any,
        examples: Sequence[Any],
        *,
        eval_cfg: Any,
        autocast_dtype: torch.dtype | None,
        batch_size: int,
    ) -> dict[str, Any]:
        return self.evaluate(
            model,
            tokenizer,
            examples,
            eval_cfg=eval_cfg,
            autocast_dtype=autocast_dtype,
            batch_size=batch_size,
        )

    def metric_lines(self, metrics: dict[str, Any]) -> list[str]:
        """One-line summaries of a metrics dict returned by :meth:`evaluate`."""
        return [", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))]

    def report_lines(self, results: dict[str, Any]) -> list[str]:
        lines = []
        for when in ("before", "after"):
            if results.get(when):
                first, *rest = self.metric_lines(results[when])
                lines += [f"held-out {when} (n={results[when]['n']}): {first}", *rest]
        return lines

    # -- helpers --------------------------------------------------------------------------------
    def device_batches(
        self, model: Any, examples: Sequence[Any], batch_size: int, pad_token_id: int, **collate: Any
    ) -> Iterator[dict[str, torch.Tensor]]:
        """``examples`` collated ``batch_size`` at a time, on ``model``'s device."""
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            yield self.to_device(self.collate(chunk, pad_token_id, **collate), model)

    @staticmethod
    def to_device(batch: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
        device = next(model.parameters()).device
        return {k: v.to(device) for k, v in batch.items()}

    def logits(
        self,
        model: Any,
        examples: Sequence[Any],
        batch_size: int,
        pad_token_id: int,
        autocast_dtype: torch.dtype | None,
    ) -> list[Any]:
        """The model's outputs for every example, batch by batch, on the CPU in fp32."""
        outputs = []
        with inference(model, autocast_dtype):
            for batch in self.device_batches(model, examples, batch_size, pad_token_id):
                batch.pop("labels", None)
                batch.pop("start_positions", None)
                batch.pop("end_positions", None)
                outputs.append(model(**batch))
        return outputs


def pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Right-pad integer rows into a ``(len(rows), longest)`` tensor."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
    return out


def encoder_inputs(examples: Sequence[TaskExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask (and token_type_ids when the tokenizer made them)."""
    batch = {
        "input_ids": pad([e.input_ids for e in examples], pad_token_id),
        "attention_mask": pad([[1] * len(e.input_ids) for e in examples], 0),
    }
    if all("token_type_ids" in e.extra for e in examples):
        batch["token_type_ids"] = pad([e.extra["token_type_ids"] for e in examples], 0)
    return batch


@contextlib.contextmanager
def inference(model: Any, autocast_dtype: torch.dtype | None) -> Iterator[None]:
    """Eval mode, no gradients, optional autocast; the model's train/eval mode is restored."""
    was_training = getattr(model, "training", False)
    model.eval()
    device = next(model.parameters()).device
    cast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    try:
        with torch.no_grad(), cast:
            yield
    finally:
        model.train(was_training)


def label_ids(names: Sequence[str], labels: list[str], origin: str) -> list[int] | str:
    """Ids of label ``names`` in ``labels``, or an error string naming the unknown one."""
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for name in names:
        if name not in index:
            return f"label {name!r} is not one of the model's labels ({', '.join(labels)}); add it to data.labels"
        out.append(index[name])
    return out


class LabelledTask(Task):
    """A task whose head has one output per label (classes, tags): the label set is fixed before
    the model loads, from ``data.labels`` (in id order) or the sorted labels of the training data."""

    label_field = "label"  # what the labels are called in errors ("labels", "tags")

    def sample_labels(self, fields: dict[str, Any]) -> list[str]:
        """The labels one training row carries."""
        raise NotImplementedError

    def prepare(self, data_cfg: Any, labels: list[str] | None = None) -> None:
        from peftkit.data import read_train_samples

        labels = labels or data_cfg.labels
        if not labels:
            samples = read_train_samples(data_cfg, self)
            labels = sorted({label for s in samples for label in self.sample_labels(s.fields)})
        if not labels:
            raise PeftkitError(
                f"no {self.label_field} found in the training data: check data.columns, or set data.labels"
            )
        self.labels = list(labels)

    def model_kwargs(self) -> dict[str, Any]:
        assert self.labels is not None, "call prepare() first"
        return {
            "num_labels": len(self.labels),
            "id2label": dict(enumerate(self.labels)),
            "label2id": {name: i for i, name in enumerate(self.labels)},
        }
