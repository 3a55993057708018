"""QUESTION_ANS: extractive QA, SQuAD style: predict the answer's first and last context token.

A context longer than ``data.max_seq_len`` is split into overlapping windows, as transformers'
``run_qa.py`` does (``return_overflowing_tokens=True, stride=data.doc_stride``)::

    row: question + context (700 tokens), max_seq_len 384, doc_stride 128
    window 0   [CLS] question [SEP] context[  0 : 370] [SEP]      target [0, 0]   ([CLS]: no answer here)
    window 1   [CLS] question [SEP] context[242 : 612] [SEP]      target [s, e]   (answer fully inside)
    window 2   [CLS] question [SEP] context[484 : 700] [SEP]      target [0, 0]
                                    <-128-> consecutive windows share doc_stride context tokens

    training   every window is one feature with its own target (a batch holds windows, so its
               memory is bounded by batch_size x max_seq_len whatever the context's length)
    loss       sum over windows of (CE(start) + CE(end)) / 2 / windows in the optimizer step
               (transformers' own `start_positions=` loss is the batch mean of the same terms)
    eval       per example: the best valid span over all of its windows
               (qa_spans.best_span_over_windows) -> SQuAD exact match and F1 (0-100) per example

A row stays one example for ``max_train_examples``, splitting and the data summary: its windows
are consecutive ``TaskExample``s with ``window`` 0, 1, ... (see ``peftkit.data.splits``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from peftkit.configuration import ConfigError
from peftkit.methods.base import TaskType
from peftkit.tasks.base import Task, TaskEncoder, TaskExample, encoder_inputs


class QAEncoder(TaskEncoder):
    """(question, context) rows -> one TaskExample per window of the context."""

    def __init__(self, task: Task, tokenizer: Any, cfg: Any):
        super().__init__(task, tokenizer, cfg)
        limit, stride = cfg.max_seq_len, cfg.doc_stride
        if limit is not None and stride >= limit:
            raise ConfigError(
                f"'doc_stride' ({stride}) must be smaller than 'max_seq_len' ({limit}) minus the question: "
                f"lower data.doc_stride (e.g. to {limit // 4}) or raise data.max_seq_len",
                "data",
            )

    def room_problems(self, questions: list[str]) -> list[str | None]:
        """Per question, why no window can hold it with ``doc_stride`` context tokens to spare, or None.

        A window holds ``max_seq_len - question - special tokens`` context tokens; consecutive
        windows overlap by ``doc_stride`` of them, so at least ``doc_stride + 1`` must fit.
        """
        limit, stride = self.cfg.max_seq_len, self.cfg.doc_stride
        if limit is None:
            return [None] * len(questions)
        specials = self.tokenizer.num_special_tokens_to_add(pair=True)
        lengths = [len(ids) for ids in self.tokenizer(questions, add_special_tokens=False)["input_ids"]]
        problems: list[str | None] = []
        for length in lengths:
            room = limit - length - specials
            problems.append(
                None
                if room > stride
                else f"the question takes {length} tokens (+{specials} special) of max_seq_len={limit}, "
                f"leaving {max(room, 0)} context tokens per window, but windows overlap by "
                f"doc_stride={stride}: lower data.doc_stride below {max(room, 1)} or raise data.max_seq_len"
            )
        return problems

    def encode_fields(self, rows: list[dict[str, Any]]) -> list[list[TaskExample] | str]:
        from peftkit.tasks.qa_spans import answer_token_span

        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("question answering needs a fast tokenizer (it maps tokens to characters)")
        out: list[list[TaskExample] | str] = list(self.room_problems([r["question"] for r in rows]))
        good = [i for i, problem in enumerate(out) if problem is None]
        if not good:
            return out
        limit = self.cfg.max_seq_len
        encoded = self.tokenizer(
            [rows[i]["question"] for i in good],
            [rows[i]["context"] for i in good],
            truncation="only_second" if limit is not None else False,
            max_length=limit,
            stride=self.cfg.doc_stride if limit is not None else 0,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
        windows: dict[int, list[TaskExample]] = {i: [] for i in good}
        for feature, which in enumerate(encoded["overflow_to_sample_mapping"]):
            i = good[which]
            row = rows[i]
            offsets, sequence_ids = encoded["offset_mapping"][feature], encoded.sequence_ids(feature)
            texts, starts = row["answers"]["text"], row["answers"]["answer_start"]
            span = (0, 0)  # [CLS]: no answer in this window (or none at all)
            if texts:
                span = answer_token_span(offsets, sequence_ids, starts[0], starts[0] + len(texts[0]))
            extra = {
                "offsets": [tuple(o) for o in offsets],
                "sequence_ids": sequence_ids,
                "context": row["context"],
                "gold": list(texts) or [""],
            }
            if "token_type_ids" in encoded:
                extra["token_type_ids"] = encoded["token_type_ids"][feature]
            answer = texts[0] if texts else ""
            window = len(windows[i])
            windows[i].append(
                TaskExample(encoded["input_ids"][feature], list(span), "", answer, extra, window)
            )
        for i in good:
            if rows[i]["answers"]["text"] and all(w.target == [0, 0] for w in windows[i]):
                self.stats.truncated += 1  # the answer is not entirely inside any window
            out[i] = windows[i]
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
        """Score every window, then answer each example with its best span over its windows."""
        from peftkit.tasks.metrics import squad_scores
        from peftkit.tasks.qa_spans import best_span_over_windows

        size = batch_size or eval_cfg.batch_size
        starts: list[torch.Tensor] = []  # one (window_len,) row per window, on the CPU
        ends: list[torch.Tensor] = []
        outputs = self.logits(model, examples, size, tokenizer.pad_token_id, autocast_dtype)
        for first, out in zip(range(0, len(examples), size), outputs):
            for row, e in enumerate(examples[first : first + size]):
                n = len(e.input_ids)
                starts.append(out.start_logits[row, :n].float().cpu())
                ends.append(out.end_logits[row, :n].float().cpu())
        groups = window_groups(examples)
        predictions = [
            best_span_over_windows(
                [starts[i] for i in group],
                [ends[i] for i in group],
                [examples[i].extra["offsets"] for i in group],
                [examples[i].extra["sequence_ids"] for i in group],
                examples[group[0]].extra["context"],
                max_answer_length=self.max_answer_length,
            )
            for group in groups
        ]
        firsts = [examples[group[0]] for group in groups]
        scores = squad_scores(predictions, [e.extra["gold"] for e in firsts])
        samples = [
            {"prediction": p, "answer": e.answer}
            for p, e in zip(predictions[: eval_cfg.show_samples], firsts)
        ]
        return {**scores, "n": len(groups), "windows": len(examples), "samples": samples}

    def metric_lines(self, metrics: dict[str, Any]) -> list[str]:
        lines = [
            f"exact match {metrics['exact_match']:.1f}, F1 {metrics['f1']:.1f} (SQuAD, 0-100; "
            f"{metrics['n']} examples in {metrics.get('windows', metrics['n'])} windows)"
        ]
        lines += [f"  {s['prediction']!r} (expected {s['answer']!r})" for s in metrics.get("samples", [])]
        return lines


def window_groups(examples: Sequence[Any]) -> list[list[int]]:
    """Indices of the windows of each example: a new example starts at every ``window == 0``."""
    groups: list[list[int]] = []
    for i, e in enumerate(examples):
        if getattr(e, "window", 0) == 0 or not groups:
            groups.append([])
        groups[-1].append(i)
    return groups
