"""SEQ_2_SEQ_LM: an encoder-decoder (T5, BART) maps a source text to a target text.

::

    {source, target} -> encoder input_ids = source tokens, labels = target tokens + eos
    model(input_ids, attention_mask, labels) -> logits (batch, target_len, vocab)
            (the model shifts labels right itself to make the decoder's inputs)
    loss  = sum of cross-entropy over target tokens / target tokens in the optimizer step
    eval  = loss / perplexity over target tokens, and the exact match of greedy generations
            (each batch generates up to its longest reference target + GENERATION_MARGIN tokens)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from peftkit.methods.base import TaskType
from peftkit.tasks.base import IGNORE_INDEX, Task, TaskEncoder, TaskExample, inference, pad
from peftkit.tasks.predictions import input_text, record, summarised

GENERATION_MARGIN = 4
"""Tokens generated beyond a batch's longest reference target (which already ends with eos)."""


def generation_budget(examples: Sequence[TaskExample], minimum: int) -> int:
    """New tokens to generate for ``examples``: at least the longest target (eos included) + a margin.

    Exact match needs the whole target; a fixed budget (``evaluation.max_new_tokens``, 8 by
    default, meant for short causal-LM answers) would cut longer targets and score a right model
    0. Generating at least ``len(target)`` tokens (eos included) also means an over-long output
    is never clipped into a false match; the margin shows a little of what comes after in the
    samples. Greedy decoding does not depend on the budget, only where it stops, so the budget
    reveals nothing about the reference to the model. ``minimum`` (max_new_tokens) still applies.
    """
    return max(minimum, max(len(e.target) for e in examples) + GENERATION_MARGIN)


class Seq2SeqEncoder(TaskEncoder):
    def encode_fields(self, rows: list[dict[str, Any]]) -> list[TaskExample | str]:
        sources = self.tokenize([r["source"] for r in rows])["input_ids"]
        targets = self.tokenize(text_target=[r["target"] for r in rows])["input_ids"]
        eos, limit = self.tokenizer.eos_token_id, self.cfg.max_seq_len
        out: list[TaskExample | str] = []
        for row, source, target in zip(rows, sources, targets):
            if eos is not None and target[-1:] != [eos]:  # T5 adds eos itself; plain tokenizers do not
                target = target + [eos] if limit is None or len(target) < limit else target[:-1] + [eos]
            if limit is not None and (len(source) >= limit or len(target) >= limit):
                self.stats.truncated += 1
            out.append(TaskExample(source, target, "", row["target"]))
        return out


class Seq2SeqTask(Task):
    task_type = TaskType.SEQ_2_SEQ_LM
    loader_task = "seq2seq_lm"
    formats = ("source_target",)
    generative = True
    has_perplexity = True

    def encoder(self, tokenizer: Any, cfg: Any) -> Seq2SeqEncoder:
        return Seq2SeqEncoder(self, tokenizer, cfg)

    def collate(self, examples: Sequence[TaskExample], pad_token_id: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": pad([e.input_ids for e in examples], pad_token_id),  # (batch, source_len)
            "attention_mask": pad([[1] * len(e.input_ids) for e in examples], 0),
            "labels": pad([e.target for e in examples], IGNORE_INDEX),  # (batch, target_len)
        }

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss_sum(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        logits = model(**batch).logits  # (batch, target_len, vocab)
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
        size = batch_size or eval_cfg.batch_size
        pad_id = tokenizer.pad_token_id
        val = self.validation(
            model, examples, batch_size=size, pad_token_id=pad_id, autocast_dtype=autocast_dtype
        )
        predictions: list[str] = []
        with inference(model, autocast_dtype):
            for start in range(0, len(examples), size):
                chunk = examples[start : start + size]
                batch = self.to_device(self.collate(chunk, pad_id), model)
                generated = model.generate(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    max_new_tokens=generation_budget(chunk, eval_cfg.max_new_tokens),
                    do_sample=False,
                )
                predictions += [
                    t.strip() for t in tokenizer.batch_decode(generated, skip_special_tokens=True)
                ]
        correct = [
            " ".join(p.split()) == " ".join(str(e.answer).split()) for p, e in zip(predictions, examples)
        ]
        samples = [{"prediction": p, "answer": e.answer} for p, e in zip(predictions, examples)]
        records = [
            record(e.origin, input_text(tokenizer, e), e.answer, p, ok)
            for e, p, ok in zip(examples, predictions, correct)
        ]
        loss = val["val_loss"]
        return {
            "loss": loss,
            "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "exact_match": sum(correct) / len(examples),
            "n": len(examples),
            "samples": samples[: eval_cfg.show_samples],
            **summarised(records),
            "predictions": records,
        }

    def metric_lines(self, metrics: dict[str, Any]) -> list[str]:
        lines = [
            f"loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.3f}, "
            f"exact match of greedy generations {metrics['exact_match']:.3f}"
        ]
        lines += metrics.get("summary_lines", [])
        lines += [f"  {s['prediction']!r} (expected {s['answer']!r})" for s in metrics.get("samples", [])]
        return lines
