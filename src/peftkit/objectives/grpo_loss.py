"""GRPO (group relative policy optimisation, Shao et al. 2024) and online DPO's pair choice: the math.

Each prompt gets G sampled answers ("a group"), each scored by a reward r. No value model: the
group is the baseline::

    A_i = r_i - mean(group)                          scale_rewards="none" (Dr. GRPO)
    A_i = (r_i - mean(group)) / (std(group) + 1e-4)  scale_rewards="group" (GRPO, TRL's default)
    A_i = (r_i - mean(group)) / (std(batch) + 1e-4)  scale_rewards="batch" (the mean stays per group)

std is Bessel-corrected (divides by count - 1), as TRL's ``nanstd``. An answer scored NaN (no
score) is left out of its group's mean and std and gets A = 0: it moves nothing. "batch" needs
the rewards of every process, as TRL gathers them before normalising.

Every completion token t of answer i carries A_i. With the sampling policy's log-prob ``old``
(equal to the current one, detached, when each batch of answers is used for one step) and a
reference model's ``ref``::

    ratio_t    = exp(logp_t - old_t)
    loss_t     = -min(ratio_t * A_i, clamp(ratio_t, 1 - eps_low, 1 + eps_high) * A_i)   (PPO clip)
    loss_t    += beta * kl_t,   kl_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1           (k3)

k3 (Schulman's "approximating KL") is non-negative and an unbiased estimate of KL(policy || ref)
for tokens sampled from the policy. At ratio 1, d loss_t / d logp_t = -A_i + beta * (1 - exp(ref_t - logp_t)).
TRL 1.16 by default (``use_bias_correction_kl=True``) multiplies kl_t by ratio_t: the same value
on-policy, but the gradient gains beta * kl_t; ``kl_ratio_weighted=True`` does the same here.

Normalisation. The training code sums loss_t over a micro-batch's tokens and divides by the
completion tokens of the whole optimizer step, over all micro-batches and processes. That is TRL
1.16's ``loss_type="dapo"``, its default: ``_compute_loss`` divides each micro-batch's sum by
num_items_in_batch / processes x accumulation steps / steps_per_generation, where
num_items_in_batch counts the completion tokens of the generation batch over all processes, and
DDP then averages over processes. With steps_per_generation == gradient_accumulation_steps (TRL's
default) the divisor is the step's total token count. Every token then weighs the same whatever
the micro-batch size, accumulation steps or process count, so those cannot change the update (a
per-sequence or per-micro-batch mean, TRL's "grpo" / "bnpo", weighs a token by how many tokens
share its sequence or micro-batch). When one generation batch spans several optimizer steps, TRL
divides by the average token count per step of that generation batch instead of this step's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

SCALE_REWARDS = ("group", "batch", "none")
STD_EPSILON = 1e-4  # TRL's: keeps zero-variance groups finite (their centred rewards are all 0)


@dataclass(frozen=True)
class GroupAdvantages:
    advantages: Tensor  # [N], 0 where the reward is NaN
    valid: Tensor  # [N] bool: the answer has a reward
    group_std: Tensor  # [prompts], over valid rewards; 0 with fewer than two
    zero_std_fraction: float  # share of groups whose valid rewards are all equal: they teach nothing
    mean: float  # over valid rewards (NaN if none)
    std: float  # over valid rewards, Bessel-corrected; 0 with fewer than two


@dataclass(frozen=True)
class GRPOTokenLoss:
    per_token: Tensor  # [n], differentiable; sum it and divide by the step's token count
    kl: Tensor | None  # [n], what beta multiplies (x ratio if kl_ratio_weighted); None when beta == 0
    low_clipped: Tensor  # [n] bool: ratio below 1 - eps_low with A < 0 (no gradient)
    high_clipped: Tensor  # [n] bool: ratio above 1 + eps_high with A > 0 (no gradient)
    region_clipped: Tensor  # [n] bool: either


def _nanstd(values: Tensor, dim: int | None = None) -> Tensor:
    """Bessel-corrected std over the non-NaN entries; 0 where fewer than two."""
    keep = dict(dim=dim, keepdim=True) if dim is not None else {}
    mean = torch.nanmean(values, **keep)
    # mean of squares times count / (count - 1), the order of TRL's nanstd, so float results agree
    variance = torch.nanmean((values - mean) ** 2, **keep)
    count = (~torch.isnan(values)).sum(**keep)
    variance = torch.where(
        count > 1, variance * (count / (count - 1).clamp(min=1)), torch.zeros_like(variance)
    )
    std = variance.sqrt()
    return std.squeeze(dim) if dim is not None else std


def group_advantages(
    rewards: Tensor, group_size: int, scale_rewards: str = "group", *, batch_std: float | None = None
) -> GroupAdvantages:
    """Advantages of ``rewards`` ([prompts * group_size], each prompt's answers consecutive).
    ``batch_std``: for scale_rewards batch, the std over the whole batch where ``rewards`` are only
    a part of it (one process's); None: the std of ``rewards``."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, not {scale_rewards!r}")
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be flat with a multiple of group_size={group_size} entries")
    valid = ~torch.isnan(rewards)
    groups = rewards.view(-1, group_size)
    group_mean = torch.nanmean(groups, dim=1)  # NaN for a group without rewards: all its answers get 0
    group_std = _nanstd(groups, dim=1)

    centred = rewards - group_mean.repeat_interleave(group_size)
    if scale_rewards == "group":
        centred = centred / (group_std.repeat_interleave(group_size) + STD_EPSILON)
    elif scale_rewards == "batch":
        scale = _nanstd(rewards) if batch_std is None else torch.tensor(batch_std, dtype=rewards.dtype)
        centred = centred / (scale + STD_EPSILON)
    advantages = torch.where(valid, centred, torch.zeros_like(centred))

    # Exact equality, not std ~ 0: a group of identical rewards can have a float std of 1e-17.
    # A group with at most one valid reward counts too (highest <= lowest): it has no spread either.
    highest = torch.where(valid, rewards, -math.inf).view(-1, group_size).amax(dim=1)
    lowest = torch.where(valid, rewards, math.inf).view(-1, group_size).amin(dim=1)
    return GroupAdvantages(
        advantages=advantages,
        valid=valid,
        group_std=group_std,
        zero_std_fraction=(highest <= lowest).float().mean().item(),
        mean=torch.nanmean(rewards).item(),
        std=_nanstd(rewards).item(),
    )


def grpo_token_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    ref_logps: Tensor | None,
    token_advantages: Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    kl_ratio_weighted: bool = False,
) -> GRPOTokenLoss:
    """Per-token clipped GRPO loss over flat completion tokens ([n] each; see the module docstring).

    ``old_logps`` None: the answers were sampled by the current policy (one step per batch), ratio
    is exp(logps - logps.detach()): 1 in value, with the gradient of logps. ``kl_ratio_weighted``
    multiplies the KL term by the ratio (TRL's ``use_bias_correction_kl``, default True in TRL
    1.16): the same value on-policy, but its gradient gains beta * kl.
    """
    if (ref_logps is None) != (beta == 0):
        raise ValueError("ref_logps is needed exactly when beta != 0")
    if epsilon_high is None:
        epsilon_high = epsilon_low
    if old_logps is None:
        old_logps = logps.detach()
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    # min of the two: the clip only ever removes incentive, never adds it (pessimistic bound)
    per_token = -torch.min(ratio * token_advantages, clipped_ratio * token_advantages)

    kl = None
    if beta != 0:
        log_ref_ratio = ref_logps - logps
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
        if kl_ratio_weighted:
            kl = kl * ratio
        per_token = per_token + beta * kl

    # TRL's definitions: a token counts as clipped only where the clip takes its gradient away
    low_clipped = (ratio < 1 - epsilon_low) & (token_advantages < 0)
    high_clipped = (ratio > 1 + epsilon_high) & (token_advantages > 0)
    return GRPOTokenLoss(per_token, kl, low_clipped, high_clipped, low_clipped | high_clipped)


def best_and_worst(scores: Sequence[float | None]) -> tuple[int, int] | None:
    """Online DPO's (chosen, rejected) among one prompt's answers: the highest and lowest score.

    None and NaN are unscored and skipped. None when fewer than two are scored or all scored are
    equal: a tie teaches nothing. Among equal best (or worst) scores the first index wins.
    """
    scored = [(i, s) for i, s in enumerate(scores) if s is not None and not math.isnan(s)]
    if len(scored) < 2:
        return None
    best = max(scored, key=lambda pair: pair[1])  # max and min keep the first of equal keys
    worst = min(scored, key=lambda pair: pair[1])
    if best[1] == worst[1]:
        return None
    return best[0], worst[0]
