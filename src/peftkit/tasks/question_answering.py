"""QUESTION_ANS: extractive QA, SQuAD style: predict the answer's first and last context token.

::

    [CLS] question [SEP] context ........ answer ...... [SEP]     (context truncated to max_seq_len)
                                  start^  ^end                     target = [start, end] token ids;
                                                                   [0, 0] ([CLS]) when the answer
                                                                   is not in the window
    model -> start_logits, end_logits (batch, seq)
    loss  = sum over examples of (CE(start) + CE(end)) / 2 / examples in the optimizer step
            (transformers' own `start_positions=` loss is the batch mean of the same terms)
    eval  = best valid span (qa_spans.best_span) -> SQuAD exact match and F1 (0-100)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from peftkit.methods.base import TaskType
from peftkit.tasks.base import Task, TaskEncoder, TaskExample, encoder_inputs


class QAEncoder(TaskEncoder):
    def encode_fields(self, rows: list[dict[str, Any]]) -> list[TaskExample | str]:
        from peftkit.tasks.qa_spans import answer_token_span

        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("question answering needs a fast tokenizer (it maps tokens to characters)")
        limit = self.cfg.max_seq_len
        encoded = self.tokenizer(
            [r["question"] for r in rows],
            [r["context"] for r in rows],
            truncation="only_second" if limit is not None else False,
            max_length=limit,
            return_offsets_mapping=True,
        )
        out: list[TaskExample | str] = []
        for i, row in enumerate(rows):
            offsets, sequence_ids = encoded["offset_mapping"][i], encoded.sequence_ids(i)
            texts, starts = row["answers"]["text"], row["answers"]["answer_start"]
            span = (0, 0)
            if texts:
                span = answer_token_span(offsets, sequence_ids, starts[0], starts[0] + len(texts[0]))
                if span == (0, 0):
                    self.stats.truncated += 1  # the answer fell outside the window
            extra = {
                "offsets": [tuple(o) for o in offsets],
                "sequence_ids": sequence_ids,
                "context": row["context"],
                "gold": list(texts) or [""],
            }
            if "token_type_ids" in encoded:
                extra["token_type_ids"] = encoded["token_type_ids"][i]
            out.append(TaskExample(encoded["input_ids"][i], list(span), "", texts[0] if texts else "", extra))
        return out


class QuestionAnsweringTask(Task):
    task_type = TaskType.QUESTION_ANS
    loader_task = "question_ans"
    formats = ("qa",)
    max_answer_length = 30

    def encoder(self, tokenizer: Any, cfg: Any) -> QAEncoder:
        return QAEncoder(self, tokenizer, cfg)

    def collate(self, examples: Sequence[TaskExample], pad_token_id: int) -> dict[str, torch.Tensor]:
        batch = encoder_inputs(examples, pad_token_id)
        batch["start_positions"] = torch.tensor([e.target[0] for e in examples], dtype=torch.long)
        batch["end_positions"] = torch.tensor([e.target[1] for e in examples], dtype=torch.long)
        return batch

    def loss_sum(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        inputs = {k: v for k, v in batch.items() if k not in ("start_positions", "end_positions")}
        out = model(**inputs)
        start = F.cross_entropy(out.start_logits.float(), batch["start_positions"], reduction="sum")
        end = F.cross_entropy(out.end_logits.float(), batch["end_positions"], reduction="sum")
        return (start + end) / 2, int(batch["start_positions"].numel())

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
        from peftkit.tasks.metrics import squad_scores
        from peftkit.tasks.qa_spans import best_span

        size = batch_size or eval_cfg.batch_size
        predictions = []
        outputs = self.logits(model, examples, size, tokenizer.pad_token_id, autocast_dtype)
        for start, out in zip(range(0, len(examples), size), outputs):
            for row, e in enumerate(examples[start : start + size]):
                n = len(e.input_ids)
                predictions.append(
                    best_span(
                        out.start_logits[row, :n],
                        out.end_logits[row, :n],
                        e.extra["offsets"],
                        e.extra["sequence_ids"],
                        e.extra["context"],
                        max_answer_length=self.max_answer_length,
                    )
                )
        scores = squad_scores(predictions, [e.extra["gold"] for e in examples])
        samples = [
            {"prediction": p, "answer": e.answer}
            for p, e in zip(predictions[: eval_cfg.show_samples], examples)
        ]
        return {**scores, "n": len(examples), "samples": samples}

    def metric_lines(self, metrics: dict[str, Any]) -> list[str]:
        lines = [f"exact match {metrics['exact_match']:.1f}, F1 {metrics['f1']:.1f} (SQuAD, 0-100)"]
        lines += [f"  {s['prediction']!r} (expected {s['answer']!r})" for s in metrics.get("samples", [])]
        return lines
