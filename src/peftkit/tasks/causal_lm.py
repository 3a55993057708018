"""CAUSAL_LM: next-token prediction on the completion tokens, accuracy by greedy generation.

::

    rows (instruction / chat / prompt_completion / text) --data.Encoder--> input_ids, labels
    loss  = sum of cross-entropy over label tokens (train.loss.lm_loss_sum: the output layer runs
            only where there are labels)          / number of label tokens in the optimizer step
    eval  = generate for each prompt, compare with the expected answer (first word by default)

This is the behaviour peftkit had before task types existed, unchanged: the hooks only call it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from peftkit.data.encode import Encoder
from peftkit.data.formats import LM_FORMATS
from peftkit.methods.base import TaskType
from peftkit.tasks.base import Task
from peftkit.tasks.predictions import record, summarised
from peftkit.train.batching import collate, count_label_tokens
from peftkit.train.loss import lm_loss_sum
from peftkit.train.packing import pack
from peftkit.train.shared_prefix import SharedPrefix


class CausalLMTask(Task):
    task_type = TaskType.CAUSAL_LM
    loader_task = "causal_lm"
    formats = LM_FORMATS
    generative = True
    has_perplexity = True
    supports_packing = True
    shared_prefix: SharedPrefix | None = None

    def metadata(self) -> dict[str, Any]:
        return {"task_type": self.task_type.value}

    def encoder(self, tokenizer: Any, cfg: Any) -> Encoder:
        return Encoder(tokenizer, cfg)

    def collate(self, examples: Sequence[Any], pad_token_id: int) -> dict[str, torch.Tensor]:
        return collate(examples, pad_token_id)

    def pack(
        self, examples: Sequence[Any], pad_token_id: int, capacity: int | None
    ) -> dict[str, torch.Tensor]:
        longest = max(len(e.input_ids) for e in examples)
        return pack(examples, pad_token_id, max(capacity or 0, longest))

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return count_label_tokens(batch)

    def use_shared_prefix(self, shared_prefix: SharedPrefix | None) -> None:
        self.shared_prefix = shared_prefix

    def loss_sum(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return lm_loss_sum(model, batch, self.shared_prefix)

    def validation(
        self,
        model: Any,
        examples: Sequence[Any],
        *,
        batch_size: int,
        pad_token_id: int,
        autocast_dtype: torch.dtype | None,
    ) -> dict[str, float]:
        from peftkit.evaluation import evaluate_loss

        out = evaluate_loss(
            model, examples, batch_size=batch_size, pad_token_id=pad_token_id, autocast_dtype=autocast_dtype
        )
        return {"val_loss": out["loss"], "val_perplexity": out["perplexity"]}

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
        from peftkit.evaluation import evaluate_generation, evaluate_loss

        if all(e.answer is None for e in examples):  # e.g. the text format: nothing to compare with
            out = evaluate_loss(
                model,
                examples,
                batch_size=batch_size or eval_cfg.batch_size,
                pad_token_id=tokenizer.pad_token_id,
                autocast_dtype=autocast_dtype,
            )
            return {**out, "n": len(examples), "samples": [], "note": NO_ANSWERS}
        out = evaluate_generation(
            model,
            tokenizer,
            examples,
            max_new_tokens=eval_cfg.max_new_tokens,
            batch_size=batch_size or eval_cfg.batch_size,
            match=eval_cfg.match,
            match_options=eval_cfg.match_options(),
            autocast_dtype=autocast_dtype,
        )
        rows = [e for e in examples if e.answer is not None]  # evaluate_generation's, in its order
        predictions = [prediction_record(e, s) for e, s in zip(rows, out["samples"])]
        return {
            "accuracy": out["accuracy"],
            "n": out["n"],
            **summarised(predictions, mode=eval_cfg.match, options=eval_cfg.match_options()),
            "samples": predictions[: eval_cfg.show_samples],
            "predictions": predictions,  # all of them: written to predictions*.jsonl, not the results
        }

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
        """``peftkit eval``: token loss / perplexity, plus accuracy by generation where rows have answers."""
        from peftkit.evaluation import evaluate_loss

        pad_id = tokenizer.pad_token_id
        results: dict[str, Any] = dict(
            evaluate_loss(
                model, examples, batch_size=batch_size, pad_token_id=pad_id, autocast_dtype=autocast_dtype
            )
        )
        if any(e.answer is not None for e in examples):
            gen = self.evaluate(
                model,
                tokenizer,
                examples,
                eval_cfg=eval_cfg,
                autocast_dtype=autocast_dtype,
                batch_size=batch_size,
            )
            results.update(
                accuracy=gen["accuracy"],
                accuracy_n=gen["n"],
                **{k: gen[k] for k in ("summary", "summary_lines", "samples", "predictions")},
            )
        return results

    def metric_lines(self, metrics: dict[str, Any]) -> list[str]:
        lines = []
        if "loss" in metrics:
            lines.append(
                f"loss {metrics['loss']:.4f}  perplexity {metrics['perplexity']:.3f}  "
                f"({metrics['tokens']} label tokens)"
            )
        if "accuracy" in metrics:
            n = metrics.get("accuracy_n", metrics.get("n"))
            lines.append(f"accuracy {metrics['accuracy']:.3f} on {n} examples")
            lines += metrics.get("summary_lines", [])
            lines += ["  " + _format_sample(s) for s in metrics.get("samples", [])]
        if "note" in metrics:
            lines.append(metrics["note"])
        return lines

    def report_lines(self, results: dict[str, Any]) -> list[str]:
        lines = []
        before, after = results.get("before"), results.get("after")
        for when, out in (("before:", before), ("after: ", after)):  # aligned
            if not out:
                continue
            if "accuracy" in out:
                lines.append(f"held-out accuracy {when} {out['accuracy']:.3f}  (n={out['n']})")
                lines += ["  " + line for line in out.get("summary_lines", [])]
            else:  # no expected answers (see NO_ANSWERS)
                lines.append(
                    f"held-out loss {when} {out['loss']:.4f}  perplexity {out['perplexity']:.3f}  (n={out['n']})"
                )
        if after and after["samples"]:
            lines.append("sample predictions (prompt -> prediction):")
            lines += ["  " + _format_sample(sample) for sample in after["samples"]]
        notes = [out["note"] for out in (before, after) if out and "note" in out]
        return lines + notes[:1]


NO_ANSWERS = (
    "accuracy by generation skipped: the held-out rows have no expected answers (text format), so "
    "only loss and perplexity are measured"
)
"""Why a held-out split of rows without answers gets loss / perplexity but no accuracy."""


def prediction_record(example: Any, sample: Any) -> dict[str, Any]:
    """One line of predictions*.jsonl: where the row came from, the prompt as the user wrote it
    (the data file's last user message; the templated prompt where a row has none), the expected
    and the predicted answer, and whether they matched."""
    prompt = getattr(example, "prompt", None) or sample.prompt
    return record(example.origin, prompt, sample.answer, sample.prediction, sample.correct)


def _format_sample(sample: dict[str, Any]) -> str:
    """The user's prompt (its end, if long), the prediction and the expected answer."""
    text = " ".join(str(sample["prompt"]).split())
    text = text if len(text) <= 70 else "..." + text[-67:]
    mark = "ok" if sample["correct"] else "wrong"
    return f"{text!r} -> {sample['predicted']!r} (expected {sample['expected']!r}, {mark})"
