"""SEQ_CLS: one label per text (or text pair), a classification head on the pooled sequence.

::

    {text, label, [text_pair]} --tokenizer--> [CLS] text [SEP] (pair [SEP])   target = label id
    model(input_ids, attention_mask) -> logits (batch, num_labels)
    loss  = sum over examples of cross-entropy / number of examples in the optimizer step
            (transformers' own `labels=` loss is the per-batch mean of the same terms)
    eval  = accuracy, macro-F1 and per-class precision / recall / F1 of the argmax

The label set (and so the head's size) is ``data.labels`` or the sorted set of labels in the
training file, fixed before the model loads; it is saved next to the adapter for evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from peftkit.methods.base import TaskType
from peftkit.tasks.base import LabelledTask, TaskEncoder, TaskExample, encoder_inputs, label_ids
from peftkit.tasks.predictions import input_text, record, summarised


class ClassificationEncoder(TaskEncoder):
    def encode_fields(self, rows: list[dict[str, Any]]) -> list[TaskExample | str]:
        pairs = [r["text_pair"] for r in rows]
        if all(p is None for p in pairs):
            encoded = [self.tokenize([r["text"] for r in rows])]
        elif all(p is not None for p in pairs):
            encoded = [self.tokenize([r["text"] for r in rows], pairs)]
        else:  # some rows have a pair, some do not: the tokenizer takes one kind per call
            encoded = [self.tokenize([r["text"]], [r["text_pair"]] if r["text_pair"] else None) for r in rows]
        ids = [i for enc in encoded for i in enc["input_ids"]]
        types = [t for enc in encoded for t in enc.get("token_type_ids", [None] * len(enc["input_ids"]))]
        assert self.task.labels is not None
        out: list[TaskExample | str] = []
        for row, input_ids, token_types in zip(rows, ids, types):
            target = label_ids([row["label"]], self.task.labels, "")
            if isinstance(target, str):
                out.append(target)
                continue
            if self.cfg.max_seq_len is not None and len(input_ids) >= self.cfg.max_seq_len:
                self.stats.truncated += 1
            extra = {"token_type_ids": token_types} if token_types is not None else {}
            out.append(TaskExample(input_ids, target[0], "", row["label"], extra))
        return out


class ClassificationTask(LabelledTask):
    task_type = TaskType.SEQ_CLS
    loader_task = "seq_cls"
    formats = ("text_label",)
    label_field = "labels"

    def sample_labels(self, fields: dict[str, Any]) -> list[str]:
        return [fields["label"]]

    def encoder(self, tokenizer: Any, cfg: Any) -> ClassificationEncoder:
        return ClassificationEncoder(self, tokenizer, cfg)

    def collate(self, examples: Sequence[TaskExample], pad_token_id: int) -> dict[str, torch.Tensor]:
        batch = encoder_inputs(examples, pad_token_id)
        batch["labels"] = torch.tensor([e.target for e in examples], dtype=torch.long)  # (batch,)
        return batch

    def loss_sum(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits  # (batch, num_labels)
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum"), int(batch["labels"].numel())

    def predict(
        self,
        model: Any,
        examples: Sequence[TaskExample],
        batch_size: int,
        pad_token_id: int,
        autocast_dtype: torch.dtype | None,
    ) -> list[int]:
        outputs = self.logits(model, examples, batch_size, pad_token_id, autocast_dtype)
        return [int(i) for out in outputs for i in out.logits.argmax(-1).tolist()]

    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        examples: Sequence[TaskExample],
        *,
        eval_cfg: Any,
        autocast_dtype: torch.dtype | None,
        batch_size: int | None = None,
    ) -> dict[str, Any]:
        from peftkit.tasks.metrics import accuracy, macro_f1, per_class_scores

        assert self.labels is not None
        ids = self.predict(
            model, examples, batch_size or eval_cfg.batch_size, tokenizer.pad_token_id, autocast_dtype
        )
        predicted = [self.labels[i] for i in ids]
        gold = [self.labels[e.target] for e in examples]
        records = [
            record(e.origin, input_text(tokenizer, e), g, p, p == g)
            for e, p, g in zip(examples, predicted, gold)
        ]
        return {
            "accuracy": accuracy(predicted, gold),
            "macro_f1": macro_f1(predicted, gold, labels=self.labels),
            "n": len(examples),
            "per_class": {
                str(k): v for k, v in per_class_scores(predicted, gold, labels=self.labels).items()
            },
            **summarised(records, recall=False),  # per_class has the recall
            "predictions": records,
        }

    def metric_lines(self, metrics: dict[str, Any]) -> list[str]:
        lines = [f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}"]
        lines += metrics.get("summary_lines", [])
        for name, s in metrics.get("per_class", {}).items():
            lines.append(
                f"  {name}: precision {s['precision']:.3f} recall {s['recall']:.3f} f1 {s['f1']:.3f} "
                f"(support {s['support']:.0f})"
            )
        return lines
