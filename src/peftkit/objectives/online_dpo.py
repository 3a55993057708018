"""Online DPO (Guo et al. 2024, "Direct language model alignment from online AI feedback"): each
step samples answers from the policy, the judges pick the best and the worst of each prompt's,
and the pair trains with the DPO loss against the reference (objectives/pairwise.py's DPO,
two rows per pair or one where the pair layout applies).

A prompt whose scored answers all tie (or that has fewer than two scored answers, or whose best
and worst answers are the same tokens) gives no pair: it is counted (``pairs_fraction``) and
skipped. TRL's OnlineDPOTrainer samples two answers and keeps a tie as a pair with the first
answer chosen, which trains on noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from peftkit.data.preference_encode import PreferenceExample
from peftkit.objectives.grpo_loss import best_and_worst
from peftkit.objectives.online import OnlineTask, StepSamples
from peftkit.objectives.pairwise import DPOTask


@dataclass
class OnlinePair(PreferenceExample):
    placeholder: bool = False  # stands in for a micro-batch without a pair (weight 0)


class OnlineDPOTask(OnlineTask, DPOTask):
    objective = "online_dpo"
    progress_metrics = ("reward", "rewards/margins", "rewards/accuracies")

    def training_examples(self, samples: StepSamples) -> tuple[list[Any], bool]:
        pairs = []
        for prompt, answers, rewards in zip(samples.prompts, samples.answers, samples.rewards):
            found = best_and_worst(rewards)
            if found is None or answers[found[0]].ids == answers[found[1]].ids:
                continue
            best, worst = answers[found[0]].ids, answers[found[1]].ids
            pairs.append(OnlinePair(prompt.prompt_ids, best, worst, prompt.origin))
        if samples.prompts:
            self.keep_metrics({"pairs_fraction": len(pairs) / len(samples.prompts)}, len(samples.prompts))
        if pairs:
            return pairs, False
        prompt, answers = samples.prompts[0], samples.answers[0]
        first, second = answers[0].ids or [0], answers[-1].ids or [0]
        return [OnlinePair(prompt.prompt_ids, first, second, prompt.origin, placeholder=True)], True

    def collate(
        self, examples: Sequence[Any], pad_token_id: int, *, one_row: bool = True
    ) -> dict[str, torch.Tensor]:
        batch = super().collate(examples, pad_token_id, one_row=one_row)
        if any(getattr(e, "placeholder", False) for e in examples):
            batch["placeholder"] = torch.ones(1)
        return batch

    def loss_sum(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        if "placeholder" not in batch:
            return super().loss_sum(model, batch)
        kept = self._sums, self._weights, self._extremes  # a placeholder's metrics are not the step's
        self._sums, self._weights, self._extremes = {}, {}, {}
        try:
            return super().loss_sum(model, batch)
        finally:
            self._sums, self._weights, self._extremes = kept
