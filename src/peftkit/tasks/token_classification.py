"""TOKEN_CLS: one tag per word (named entities, parts of speech), a linear head on every token.

::

    tokens: [Jim, Henson, was]   tags: [B-PER, I-PER, O]
    sub-tokens:  [CLS] Jim Hen ##son was [SEP]
    target:      -100   1   2   -100   0  -100     a word's tag on its first sub-token only,
                                                 as transformers' token-classification examples do
    loss  = sum of cross-entropy over tagged sub-tokens / tagged sub-tokens in the optimizer step
    eval  = token accuracy and macro-F1 over words, entity precision / recall / F1 for BIO tags
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from peftkit.methods.base import TaskType
from peftkit.tasks.base import (
    IGNORE_INDEX,
    LabelledTask,
    TaskEncoder,
    TaskExample,
    encoder_inputs,
    label_ids,
    pad,
)


class TaggingEncoder(TaskEncoder):
    def encode_fields(self, rows: list[dict[str, Any]]) -> list[TaskExample | str]:
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("token classification needs a fast tokenizer (it maps sub-tokens back to words)")
        encoded = self.tokenize([r["tokens"] for r in rows], is_split_into_words=True)
        assert self.task.labels is not None
        out: list[TaskExample | str] = []
        for i, row in enumerate(rows):
            tag_ids = label_ids(row["tags"], self.task.labels, "")
            if isinstance(tag_ids, str):
                out.append(tag_ids)
                continue
            target, previous = [], None
            for word in encoded.word_ids(i):
                first = word is not None and word != previous
                target.append(tag_ids[word] if first else IGNORE_INDEX)
                previous = word
            kept = sum(t != IGNORE_INDEX for t in target)
            if kept < len(row["tokens"]):
                self.stats.truncated += 1
            if kept == 0:
                self.stats.dropped += 1
                continue
            extra = {"word_tags": row["tags"][:kept]}
            if "token_type_ids" in encoded:
                extra["token_type_ids"] = encoded["token_type_ids"][i]
            out.append(TaskExample(encoded["input_ids"][i], target, "", None, extra))
        return out


class TokenClassificationTask(LabelledTask):
    task_type = TaskType.TOKEN_CLS
    loader_task = "token_cls"
    formats = ("tokens_tags",)
    label_field = "tags"

    def sample_labels(self, fields: dict[str, Any]) -> list[str]:
        return list(fields["tags"])

    def encoder(self, tokenizer: Any, cfg: Any) -> TaggingEncoder:
        return TaggingEncoder(self, tokenizer, cfg)

    def collate(self, examples: Sequence[TaskExample], pad_token_id: int) -> dict[str, torch.Tensor]:
        batch = encoder_inputs(examples, pad_token_id)
        batch["labels"] = pad([e.target for e in examples], IGNORE_INDEX)  # (batch, seq)
        return batch

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss_sum(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits  # (batch, seq, num_labels)
        mask = batch["labels"] != IGNORE_INDEX
        loss = F.cross_entropy(logits[mask].float(), batch["labels"][mask], reduction="sum")
        return loss, int(mask.sum())

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
        from peftkit.tasks.metrics import token_classification_scores

        assert self.labels is not None
        size = batch_size or eval_cfg.batch_size
        outputs = self.logits(model, examples, size, tokenizer.pad_token_id, autocast_dtype)
        predicted: list[list[str]] = []
        for start, out in zip(range(0, len(examples), size), outputs):
            best = out.logits.argmax(-1).cpu()  # (batch, seq)
            for row, example in enumerate(examples[start : start + size]):
                firsts = [j for j, t in enumerate(example.target) if t != IGNORE_INDEX]
                predicted.append([self.labels[int(best[row, j])] for j in firsts])
        scores = token_classification_scores(predicted, [e.extra["word_tags"] for e in examples])
        return {**scores, "n": len(examples)}

    def metric_lines(self, metrics: dict[str, Any]) -> list[str]:
        line = f"token accuracy {metrics['token_accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}"
        if "entity_f1" in metrics:
            line += (
                f", entity F1 {metrics['entity_f1']:.3f} (precision {metrics['entity_precision']:.3f}, "
                f"recall {metrics['entity_recall']:.3f})"
            )
        return [line]
