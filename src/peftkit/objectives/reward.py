"""Reward models: a one-output sequence-classification head on the base, trained on preference pairs.

::

    pair (prompt, chosen, rejected) -> two rows, prompt + chosen and prompt + rejected, rendered
    with the chat template as for DPO (objectives/base.py) -> one forward pass over 2B rows
    score = the head's output at the last real token (the model's own pooling, as transformers'
    *ForSequenceClassification and TRL's RewardTrainer use it)
    loss_sum = sum over pairs of -log sigmoid(score_chosen - score_rejected) (Bradley-Terry)

:func:`score_texts` scores text with a saved reward model (what ``peftkit score`` runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from peftkit.data.preference_collate import collate_pairs
from peftkit.methods.base import TaskType
from peftkit.objectives.base import PreferenceTask
from peftkit.objectives.losses import reward_loss, reward_metrics
from peftkit.tasks.base import inference


class RewardTask(PreferenceTask):
    objective = "reward"
    task_type = TaskType.SEQ_CLS
    loader_task = "seq_cls"

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_labels": 1, "id2label": {0: "reward"}, "label2id": {"reward": 0}}

    def collate(self, examples: Sequence[Any], pad_token_id: int) -> dict[str, torch.Tensor]:
        batch = collate_pairs(examples, pad_token_id)
        del batch["labels"]  # the head scores whole rows
        return batch

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].shape[0]) // 2

    def scores(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        scores = (
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()
        )
        pairs = scores.shape[0] // 2
        return scores[:pairs], scores[pairs:]

    def loss_sum(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        chosen, rejected = self.scores(model, batch)
        losses = reward_loss(
            chosen, rejected, center_rewards_coefficient=self.preference.center_rewards_coefficient
        )
        self.keep_metrics(reward_metrics(chosen, rejected), chosen.shape[0])
        return losses.sum(), int(chosen.shape[0])

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
        """Held-out pairwise accuracy (chosen scored strictly higher) and mean margin."""
        size = batch_size or eval_cfg.batch_size
        chosen, rejected = [], []
        with inference(model, autocast_dtype):
            for batch in self.device_batches(model, examples, size, tokenizer.pad_token_id):
                c, r = self.scores(model, batch)
                chosen.append(c.cpu())
                rejected.append(r.cpu())
        c, r = torch.cat(chosen), torch.cat(rejected)
        return {
            "pairwise_accuracy": float((c > r).float().mean()),
            "mean_margin": float((c - r).mean()),
            "n": len(examples),
        }

    def metric_lines(self, metrics: dict[str, Any]) -> list[str]:
        return [
            f"pairwise accuracy {metrics['pairwise_accuracy']:.3f} (chosen scored higher), "
            f"mean margin {metrics['mean_margin']:.4f}"
        ]
