"""DPO, ORPO and SimPO: objectives on preference pairs (prompt, chosen, rejected).

::

    batch of B pairs -> 2B rows (all chosen, then all rejected) -> ONE forward pass; in training
                        steps and validation, where exact, B rows [prompt | chosen | rejected]
                        (objectives/pair_layout.py, training.shared_prefix): each prompt
                        computed once, same log-probs
    policy log-probs: summed over each completion's tokens (dpo), averaged per token (orpo, simpo)
    reference log-probs (dpo): a pass without gradients first (objectives/sequence.py), or the
    precomputed ones the batch carries
    loss_sum = sum of the per-pair losses (objectives/losses.py); the loop divides by the pairs of
               the whole optimizer step, so accumulation and processes do not change the loss

ORPO's SFT term is, per pair, the mean NLL of the chosen completion's tokens (the paper's
L_SFT); TRL's ORPOTrainer instead averages the NLL over the prompt and chosen tokens of the whole
batch, which depends on batch boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from peftkit.data.preference_collate import collate_pairs
from peftkit.objectives.base import PreferenceTask
from peftkit.objectives.losses import PreferenceLoss, dpo_loss, orpo_loss, preference_metrics, simpo_loss
from peftkit.objectives.pair_layout import SharedPrompt, shared_prompt_for
from peftkit.objectives.sequence import completion_logps, reference_logps
from peftkit.tasks.base import inference


class PairwiseTask(PreferenceTask):
    """dpo / orpo / simpo (``objective`` set by the subclass)."""

    shared_prompt: SharedPrompt | None = None  # one row per pair, once the loop turned it on
    _shared_prompt_for: SharedPrompt | str | None = None  # start_reference's finding for the model

    def start_reference(
        self, model: Any, *, init_adapter: str | bool | None = None, **run: Any
    ) -> str | None:
        """Also decide, with the model as training starts, whether its pairs can run one row each;
        :meth:`use_shared_prefix`, which the loop calls next, turns that on (or keeps it off)."""
        line = super().start_reference(model, init_adapter=init_adapter, **run)
        self._shared_prompt_for = shared_prompt_for(model)
        return line

    def use_shared_prefix(self, shared_prefix: Any) -> None:
        """``shared_prefix``: the SFT shared-prefix object (train/shared_prefix.py), or None where
        ``training.shared_prefix`` is off or its conditions (no dropout, no packing, a method acting
        per position) fail: then every pair keeps two rows."""
        found, self._shared_prompt_for = self._shared_prompt_for, None
        self.shared_prompt = None
        if shared_prefix is None or found is None:
            return
        if isinstance(found, str):
            shared_prefix.say(f"training.shared_prefix: two rows per preference pair: {found}")
            return
        found.say = shared_prefix.say
        self.shared_prompt = found
        shared_prefix.say("training.shared_prefix: one row per preference pair, each prompt computed once")

    def collate(
        self, examples: Sequence[Any], pad_token_id: int, *, one_row: bool = True
    ) -> dict[str, torch.Tensor]:
        """The two-row batch; with the one-row tensors too where the layout is on and ``one_row``."""
        batch = collate_pairs(examples, pad_token_id)
        if self.shared_prompt is not None and one_row:  # the two-row tensors stay: tokens/s counts them
            batch.update(self.shared_prompt.collate(examples, pad_token_id))
        if all(e.ref is not None for e in examples):  # preference.reference: precompute
            batch["ref_logps"] = torch.tensor(
                [e.ref[0] for e in examples] + [e.ref[1] for e in examples], dtype=torch.float32
            )
        return batch

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].shape[0]) // 2

    def loss_sum(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        shared = self.shared_prompt
        ref = (
            reference_logps(self.reference, model, batch, shared_prompt=shared)
            if self.uses_reference
            else None
        )
        logps, counts = completion_logps(model, batch, shared)
        result = self.pair_loss(logps, counts, ref)
        pairs = logps.shape[0] // 2
        chosen, rejected = logps[:pairs], logps[pairs:]
        self.keep_metrics(preference_metrics(result, chosen, rejected), pairs)
        return result.losses.sum(), pairs

    def pair_loss(
        self, logps: torch.Tensor, counts: torch.Tensor, ref: torch.Tensor | None
    ) -> PreferenceLoss:
        raise NotImplementedError

    def rewards(
        self, model: Any, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per pair: chosen and rejected implicit rewards, and the per-token log-prob difference.
        Always from two rows: the held-out numbers before and after training and those of
        ``peftkit eval`` (which never lays pairs out in one row) then come from the same layout, so
        bf16 rounding cannot flip a near-zero margin between them."""
        has_reference = self.reference is not None or "ref_logps" in batch
        ref = reference_logps(self.reference, model, batch) if self.uses_reference and has_reference else None
        logps, counts = completion_logps(model, batch)
        if ref is None and self.uses_reference:  # before training: the model is its own reference
            ref = logps
        result = self.pair_loss(logps, counts, ref)
        average = logps / counts.clamp(min=1)
        pairs = logps.shape[0] // 2
        return result.chosen_rewards, result.rejected_rewards, average[:pairs] - average[pairs:]

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
        """Held-out preference accuracy (implicit reward margin > 0), mean margin, and the share of
        pairs whose chosen completion has the higher per-token log-probability."""
        size = batch_size or eval_cfg.batch_size
        pad_id = tokenizer.pad_token_id
        chosen, rejected, likelihood = [], [], []
        with inference(model, autocast_dtype):
            for batch in self.device_batches(model, examples, size, pad_id, one_row=False):
                c, r, d = self.rewards(model, batch)
                chosen.append(c.float().cpu())
                rejected.append(r.float().cpu())
                likelihood.append(d.float().cpu())
        c, r, d = torch.cat(chosen), torch.cat(rejected), torch.cat(likelihood)
        return {
            "preference_accuracy": float((c > r).float().mean()),
            "mean_margin": float((c - r).mean()),
            "likelihood_accuracy": float((d > 0).float().mean()),
            "n": len(examples),
        }

    def metric_lines(self, metrics: dict[str, Any]) -> list[str]:
        return [
            f"preference accuracy {metrics['preference_accuracy']:.3f} (implicit reward margin > 0), "
            f"mean margin {metrics['mean_margin']:.4f}, chosen more likely per token "
            f"{metrics['likelihood_accuracy']:.3f}"
        ]


class DPOTask(PairwiseTask):
    objective = "dpo"

    def pair_loss(
        self, logps: torch.Tensor, counts: torch.Tensor, ref: torch.Tensor | None
    ) -> PreferenceLoss:
        assert ref is not None
        pairs = logps.shape[0] // 2
        p = self.preference
        return dpo_loss(
            logps[:pairs],
            logps[pairs:],
            ref[:pairs],
            ref[pairs:],
            beta=self.beta,
            loss_type=p.loss_type,
            label_smoothing=p.label_smoothing,
            chosen_lengths=counts[:pairs],
            rejected_lengths=counts[pairs:],
        )


class SimPOTask(PairwiseTask):
    objective = "simpo"

    def pair_loss(
        self, logps: torch.Tensor, counts: torch.Tensor, ref: torch.Tensor | None
    ) -> PreferenceLoss:
        average = logps / counts.clamp(min=1)
        pairs = logps.shape[0] // 2
        p = self.preference
        return simpo_loss(
            average[:pairs],
            average[pairs:],
            beta=self.beta,
            gamma=p.simpo_gamma,
            label_smoothing=p.label_smoothing,
        )


class ORPOTask(PairwiseTask):
    objective = "orpo"

    def pair_loss(
        self, logps: torch.Tensor, counts: torch.Tensor, ref: torch.Tensor | None
    ) -> PreferenceLoss:
        average = logps / counts.clamp(min=1)
        pairs = logps.shape[0] // 2
        return orpo_loss(average[:pairs], average[pairs:], -average[:pairs], beta=self.beta)
