"""GRPO (Shao et al. 2024, DeepSeekMath): learn from each answer's reward relative to the other
answers to the same prompt.

::

    sampling phase (objectives/online.py): G answers per prompt, a reward each
    advantage_i = (r_i - mean of its group) [/ (std of its group + 1e-4)]   (objectives/grpo_loss.py)
    one training row per scored answer: prompt + answer, labels on the answer, its advantage
    loss_sum = sum over every answer token of  -min(ratio * A, clip(ratio, 1-eps, 1+eps_high) * A)
               + beta * ratio * k3 KL to the reference          (ratio = 1 on-policy: its gradient)
    the loop divides by the answer tokens of the whole optimizer step on all processes: TRL's
    loss_type "dapo", so gradient accumulation and processes do not change the update

Answers no judge scored are left out; a group whose rewards are all equal has zero advantages
(only the KL term trains on it), as in TRL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from peftkit.data.preference_collate import collate_rows
from peftkit.objectives.grpo_loss import group_advantages, grpo_token_loss
from peftkit.objectives.online import OnlineTask, StepSamples
from peftkit.objectives.sequence import completion_token_logps
from peftkit.train.batching import IGNORE_INDEX


@dataclass
class ScoredAnswer:
    """A training row of GRPO: a prompt, one sampled answer, its advantage."""

    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float
    origin: str
    placeholder: bool = False  # stands in for a micro-batch without a scored answer (weight 0)

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


class GRPOTask(OnlineTask):
    objective = "grpo"

    shared_prefix: Any = None  # the loop's SharedPrefix where training.shared_prefix applies

    @property
    def uses_reference(self) -> bool:
        return self.beta > 0

    def use_shared_prefix(self, shared_prefix: Any) -> None:
        """The tokens all of a micro-batch's answers start with (the chat template's system turn,
        a fixed instruction) run once per micro-batch in the policy's pass (train/shared_prefix.py)."""
        self.shared_prefix = shared_prefix

    def whole_step(self, samples: StepSamples, counts: list[bool], world: Any) -> None:
        """Advantages over the whole step, so micro-batch boundaries cannot change them; with
        scale_rewards batch the std is over every process's real answers of the step (as TRL's
        over its global batch), so the number of processes cannot either."""
        size = self.sampling.num_generations
        rewards = torch.tensor(
            [math.nan if r is None else r for group in samples.rewards for r in group], dtype=torch.float32
        )
        batch_std = None
        if self.preference.scale_rewards == "batch":
            mine = [r for group, real in zip(samples.rewards, counts) if real for r in group if r is not None]
            everyone = [mine]
            if world.distributed:
                import torch.distributed as dist

                everyone = [None] * world.size
                dist.all_gather_object(everyone, mine)
            pooled = torch.tensor([r for part in everyone for r in part], dtype=torch.float32)
            batch_std = float(pooled.std()) if pooled.numel() > 1 else 0.0
        found = group_advantages(rewards, size, self.preference.scale_rewards, batch_std=batch_std)
        values = [None if not ok else float(a) for a, ok in zip(found.advantages, found.valid)]
        samples.advantages = [values[g * size : (g + 1) * size] for g in range(len(samples.rewards))]

    def training_examples(self, samples: StepSamples) -> tuple[list[Any], bool]:
        assert samples.advantages is not None, "whole_step runs first"
        rows = [
            ScoredAnswer(prompt.prompt_ids, answer.ids, advantage, prompt.origin)
            for prompt, answers, advantages in zip(samples.prompts, samples.answers, samples.advantages)
            for answer, advantage in zip(answers, advantages)
            if advantage is not None and answer.ids
        ]
        if rows:
            return rows, False
        prompt, answer = samples.prompts[0], samples.answers[0][0]
        return [
            ScoredAnswer(prompt.prompt_ids, answer.ids or [0], 0.0, prompt.origin, placeholder=True)
        ], True

    def collate(self, examples: Sequence[Any], pad_token_id: int, **_: Any) -> dict[str, torch.Tensor]:
        batch = collate_rows([(e.prompt_ids, e.completion_ids) for e in examples], pad_token_id)
        batch["advantages"] = torch.tensor([e.advantage for e in examples], dtype=torch.float32)
        if any(e.placeholder for e in examples):
            batch["placeholder"] = torch.ones(1)
        return batch

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss_sum(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        # The reference pass first: its weights must not change under the policy's backward.
        ref = self.reference.token_logps(model, batch) if self.uses_reference else None
        logps, rows = completion_token_logps(model, batch, self.shared_prefix)
        p = self.preference
        result = grpo_token_loss(
            logps,
            None,  # on-policy: the answers were sampled from these weights in this step
            ref,
            batch["advantages"].to(logps.device)[rows],
            epsilon_low=p.epsilon,
            epsilon_high=p.epsilon_high,
            beta=self.beta,
            kl_ratio_weighted=True,  # TRL 1.16's default (use_bias_correction_kl)
        )
        tokens = logps.numel()
        if "placeholder" not in batch and tokens:
            metrics = {
                "clip_ratio/low_mean": float(result.low_clipped.float().mean()),
                "clip_ratio/high_mean": float(result.high_clipped.float().mean()),
                "clip_ratio/region_mean": float(result.region_clipped.float().mean()),
            }
            if result.kl is not None:
                metrics["kl"] = float(result.kl.detach().float().mean())
            self.keep_metrics(metrics, tokens)
        return result.per_token.sum(), tokens
