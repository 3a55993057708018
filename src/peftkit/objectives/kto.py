"""KTO: unpaired rows (prompt, completion, label true/false), Ethayarajh et al. 2024.

::

    batch of B rows -> B rows + B "KL" rows (each prompt with the previous row's completion,
                       data/preference_collate.py)
    reference log-probs of both (no gradients), policy log-probs of the KL rows (no gradients,
    as TRL) and of the rows (with gradients)
    z0 = max(0, mean(policy - reference) over the KL rows), detached: the micro-batch's reference
    point (TRL: per device batch, averaged over processes, so under torchrun the two differ)
    loss_sum = sum of the per-row losses (objectives/losses.kto_loss) / rows of the optimizer step
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from peftkit.data.preference_collate import collate_unpaired
from peftkit.objectives.base import PreferenceTask
from peftkit.objectives.losses import kl_estimate, kto_loss, kto_metrics
from peftkit.objectives.sequence import completion_logps, reference_logps
from peftkit.tasks.base import inference


class KTOTask(PreferenceTask):
    objective = "kto"
    formats = ("kto",)

    def collate(self, examples: Sequence[Any], pad_token_id: int) -> dict[str, torch.Tensor]:
        if len(examples) > 1:
            return collate_unpaired(examples, pad_token_id)
        # A lone row (an epoch's last micro-batch when the rows do not divide by the batch size,
        # or one process's share of it) has no other row's completion: its KL row is itself, as
        # TRL's rotation gives a batch of one. Its z0 is then its own log-ratio (clamped at 0).
        batch = collate_unpaired(examples, pad_token_id, kl=False)
        batch.update({f"kl_{key}": batch[key] for key in ("input_ids", "attention_mask", "labels")})
        return batch

    def loss_sum(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        result, logps = self._result(model, batch)
        self.keep_metrics(kto_metrics(result, logps), logps.shape[0])
        return result.losses.sum(), int(logps.shape[0])

    def _result(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[Any, torch.Tensor]:
        ref = reference_logps(self.reference, model, batch)
        ref_kl = reference_logps(self.reference, model, batch, key="_kl")
        with torch.no_grad():
            kl_rows = {k: batch[f"kl_{k}"] for k in ("input_ids", "attention_mask", "labels")}
            policy_kl = completion_logps(model, kl_rows)[0]
        logps = completion_logps(model, batch)[0]
        p = self.preference
        result = kto_loss(
            logps,
            ref,
            batch["desirable"],
            kl_estimate(policy_kl, ref_kl),
            beta=self.beta,
            desirable_weight=p.desirable_weight,
            undesirable_weight=p.undesirable_weight,
        )
        return result, logps

    def validation(
        self, model: Any, examples: Sequence[Any], *, batch_size: int, **options: Any
    ) -> dict[str, float]:
        """As every task's, in chunks of at least 2 rows: a lone last chunk (3 rows in chunks of 2)
        would have no other row's completion to make its KL row from."""
        size = max(2, batch_size)
        while len(examples) > 1 and len(examples) % size == 1:
            size += 1
        return super().validation(model, examples, batch_size=size, **options)

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
        """Held-out: the share of rows whose implicit reward has the label's sign (> 0 for desirable,
        < 0 for undesirable), and the mean reward of each side."""
        size = max(2, batch_size or eval_cfg.batch_size)
        rewards, desirable = [], []
        with inference(model, autocast_dtype):
            for batch in self.device_batches(model, examples, size, tokenizer.pad_token_id):
                logps = completion_logps(model, batch)[0]
                ref = reference_logps(self.reference, model, batch) if self.reference is not None else logps
                rewards.append((self.beta * (logps - ref)).float().cpu())
                desirable.append(batch["desirable"].cpu())
        r, d = torch.cat(rewards), torch.cat(desirable)
        right = torch.where(d, r > 0, r < 0)
        out: dict[str, Any] = {"kto_accuracy": float(right.float().mean()), "n": len(examples)}
        for side, selected in (("desirable", d), ("undesirable", ~d)):
            if selected.any():
                out[f"mean_reward_{side}"] = float(r[selected].mean())
        return out

    def metric_lines(self, metrics: dict[str, Any]) -> list[str]:
        sides = ", ".join(
            f"mean reward {side} {metrics[f'mean_reward_{side}']:.4f}"
            for side in ("desirable", "undesirable")
            if f"mean_reward_{side}" in metrics
        )
        return [f"KTO accuracy {metrics['kto_accuracy']:.3f} (implicit reward has the label's sign), {sides}"]
