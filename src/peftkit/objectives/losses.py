"""Preference-optimisation and reward-model losses as pure functions of sequence log-probabilities.

The training loop computes, per example, the log-probability of the completion tokens under the
policy (and, for DPO and KTO, under the frozen reference), then calls one of these functions. They
return per-example losses rather than a mean because the loop normalises over the whole optimizer
step (gradient accumulation), so only it knows the right denominator.

Each function follows its paper and TRL 1.16's implementation (the class and method are named in
each docstring; ``tests/test_preference_losses.py`` checks both). Conventions that differ between
losses, and that the caller must get right:

* DPO (all loss types) and KTO take log-probabilities *summed* over completion tokens;
  DPO's ``ipo`` also needs the completion lengths, to average per token as TRL does.
* SimPO and ORPO take log-probabilities *averaged* over completion tokens (their papers' length
  normalisation; TRL's CPO and ORPO trainers compute them with ``average_log_prob=True``).
* Reward models take one scalar score per sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from peftkit.train.batching import IGNORE_INDEX

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
"""The ``loss_type`` values :func:`dpo_loss` accepts (the same names as TRL's DPOConfig)."""


@dataclass(frozen=True)
class PreferenceLoss:
    """Per-pair losses of a paired preference objective, and what TRL logs about them.

    ``chosen_rewards`` / ``rejected_rewards`` are the implicit rewards (detached); ``extra`` holds
    further per-pair metrics under the names TRL logs them (ORPO's ``log_odds_ratio`` ...)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class KTOLoss:
    """Per-example KTO losses, in input order, with the implicit rewards and the KL estimate used."""

    losses: torch.Tensor
    rewards: torch.Tensor
    desirable: torch.Tensor
    kl: torch.Tensor


def _float(x: torch.Tensor) -> torch.Tensor:
    # Sequence log-probs are sums of hundreds of terms; differences of them in bf16/fp16 keep
    # only 2-3 significant digits. float64 inputs stay float64.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# -- log-probabilities of label tokens -------------------------------------------------------------


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, *, average: bool = False) -> torch.Tensor:
    """Per-row sum (or mean) of the log-probabilities of the label tokens.

    ``token_logps`` is ``[batch, seq]``: the log-probability of each label token, already aligned
    with its label (however the caller computed it, e.g. in chunks, without materialising
    ``[batch, seq, vocab]`` log-softmax). ``mask`` is true where there is a label. Masked positions
    may hold anything (padding garbage, -inf): they are selected out, not multiplied by zero.
    A row without labels averages to 0 rather than NaN (TRL's DPO clamps the count the same way).
    """
    mask = mask.bool()
    token_logps = _float(token_logps)
    total = torch.where(mask, token_logps, token_logps.new_zeros(())).sum(-1)
    if not average:
        return total
    return total / mask.sum(-1).clamp(min=1)


def token_logps_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the next-token labels of a causal LM, and the label mask.

    Logits at position t predict label t+1, so both come back one shorter than the input. This
    materialises ``[batch, seq, vocab]`` log-softmax: it is the reference the chunked computation in
    the training loop is tested against, not what the loop should run on a real vocabulary."""
    labels = labels[:, 1:]
    logits = _float(logits[:, :-1])
    mask = labels != ignore_index
    safe_labels = labels.masked_fill(~mask, 0)  # any valid index; the mask drops these positions
    picked = logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return picked - logits.logsumexp(-1), mask


def sequence_logps_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX, average: bool = False
) -> torch.Tensor:
    """:func:`sequence_logps` from a causal LM's logits and labels (TRL's ``get_batch_logps``)."""
    token_logps, mask = token_logps_from_logits(logits, labels, ignore_index=ignore_index)
    return sequence_logps(token_logps, mask, average=average)


# -- DPO and its variants --------------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> PreferenceLoss:
    """DPO-family loss per pair, from completion log-probs summed over tokens.

    With ``d = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)``:

    * ``sigmoid`` (Rafailov et al. 2023): ``-log σ(β d)``; with ``label_smoothing = ε > 0`` the
      conservative DPO of Mitchell (2023), ``-(1-ε) log σ(β d) - ε log σ(-β d)``. TRL 1.16's DPO
      trainer ignores ``label_smoothing`` for ``sigmoid`` (its CPO trainer keeps this form).
    * ``ipo`` (Azar et al. 2023, Eq. 17): ``(d̄ - 1/(2β))²`` where ``d̄`` uses log-ratios divided by
      the completion lengths (``chosen_lengths`` / ``rejected_lengths``, required), as TRL does: the
      IPO authors confirmed their results use this per-token form.
    * ``hinge`` (SLiC, Zhao et al. 2023): ``relu(1 - β d)``.
    * ``robust`` (Chowdhury et al. 2024): ``[-(1-ε) log σ(β d) + ε log σ(-β d)] / (1 - 2ε)`` with
      ``ε = label_smoothing`` the rate of flipped labels, in [0, 0.5).

    Matches the ``loss_type`` branches of TRL 1.16's ``DPOTrainer._compute_loss`` (default
    ``f_divergence_type="reverse_kl"``, no ``ld_alpha``, no WPO weighting). The rewards are
    ``β (policy - ref)`` of the summed log-probs for every loss type, as TRL logs them.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo loss_type must be one of {list(DPO_LOSS_TYPES)}, not {loss_type!r}")
    if loss_type in ("ipo", "hinge") and label_smoothing != 0.0:
        raise ValueError(f"label_smoothing is not used by the {loss_type} loss: set it to 0.0")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"robust DPO needs 0 <= label_smoothing < 0.5 (the flip rate), not {label_smoothing}"
        )
    chosen_logratios = _float(policy_chosen_logps) - _float(ref_chosen_logps)
    rejected_logratios = _float(policy_rejected_logps) - _float(ref_rejected_logps)
    delta = chosen_logratios - rejected_logratios

    if loss_type == "sigmoid":
        losses = _smoothed_logistic(beta * delta, label_smoothing)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("the ipo loss needs chosen_lengths and rejected_lengths (completion tokens)")
        # An empty completion counts as one token, as in TRL (no division by zero).
        chosen_per_token = chosen_logratios / chosen_lengths.clamp(min=1)
        rejected_per_token = rejected_logratios / rejected_lengths.clamp(min=1)
        losses = (chosen_per_token - rejected_per_token - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:  # robust
        eps = label_smoothing
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    return PreferenceLoss(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def _smoothed_logistic(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``-log σ(x)`` when labels are flipped with probability ``label_smoothing`` (cDPO)."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


# -- reference-free: SimPO and ORPO ----------------------------------------------------------------


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    chosen_nll: torch.Tensor | None = None,
    nll_weight: float = 0.0,
) -> PreferenceLoss:
    """SimPO (Meng et al. 2024) per pair: ``-log σ(β (c̄ - r̄) - γ)``, no reference model.

    ``c̄`` and ``r̄`` are the policy's log-probs *averaged* over completion tokens (the paper's
    length normalisation). ``gamma`` is the target reward margin itself (TRL's ``simpo_gamma``),
    not the paper code's ``gamma_beta_ratio`` (``gamma = gamma_beta_ratio * beta``).
    ``label_smoothing`` smooths as in conservative DPO. CPO-SimPO adds ``nll_weight`` (TRL's
    ``cpo_alpha``) times the chosen completion's NLL; TRL adds it to the batch mean, so a scalar
    ``chosen_nll`` reproduces TRL's loss exactly after averaging.

    Matches TRL 1.16's ``trl.experimental.cpo.CPOTrainer.cpo_loss`` with ``loss_type="simpo"`` and
    AlphaPO's ``alpha=0`` (not supported here); rewards are ``β c̄`` and ``β r̄``.
    """
    if nll_weight != 0.0 and chosen_nll is None:
        raise ValueError("simpo_loss needs chosen_nll when nll_weight (CPO's cpo_alpha) is not 0")
    chosen, rejected = _float(policy_chosen_logps), _float(policy_rejected_logps)
    losses = _smoothed_logistic(beta * (chosen - rejected) - gamma, label_smoothing)
    extra = {}
    if chosen_nll is not None:
        losses = losses + nll_weight * chosen_nll
        extra["nll_loss"] = chosen_nll.detach().expand_as(losses)
    return PreferenceLoss(losses, beta * chosen.detach(), beta * rejected.detach(), extra)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for x < 0, switching formula at -ln 2 to avoid cancellation (Mächler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    *,
    beta: float = 0.1,
) -> PreferenceLoss:
    """ORPO (Hong et al. 2024) per pair: ``chosen_nll - β log σ(log odds(c̄) - log odds(r̄))``.

    ``c̄``, ``r̄`` are log-probs averaged over completion tokens, so ``p = exp(c̄)`` is the per-token
    geometric mean probability and ``log odds = c̄ - log(1 - exp(c̄))``. ``beta`` is the paper's λ.
    ``chosen_nll`` is the SFT term; TRL computes it as the token-mean cross-entropy over the prompt
    *and* chosen completion of the whole batch, so pass that scalar to reproduce TRL's loss.

    Matches TRL 1.16's ``trl.experimental.orpo.ORPOTrainer.odds_ratio_loss`` (with its stable
    ``log1mexp``) and ``get_batch_loss_metrics`` (``loss = nll - mean(β log σ(log_odds))``).
    ``extra`` holds TRL's ``log_odds_ratio`` (``log σ(log_odds)``), ``log_odds_chosen`` (the log odds
    ratio itself, despite the name) and ``nll_loss``.
    """
    chosen, rejected = _float(policy_chosen_logps), _float(policy_rejected_logps)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    losses = chosen_nll - beta * ratio
    extra = {
        "log_odds_ratio": ratio.detach(),
        "log_odds_chosen": log_odds.detach(),
        "nll_loss": torch.as_tensor(chosen_nll).detach().expand_as(losses),
    }
    return PreferenceLoss(losses, beta * chosen.detach(), beta * rejected.detach(), extra)


# -- KTO -------------------------------------------------------------------------------------------


def kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point: the batch KL(policy || ref) estimated on mismatched pairs, detached.

    The inputs are summed log-probs of completions paired with *other* examples' prompts (TRL
    shifts completions by one within the batch). The mean log-ratio is clamped at 0 because a KL
    divergence cannot be negative, and detached because the paper does not backpropagate through
    it. TRL 1.16 (``KTOTrainer._compute_loss``) averages per device, then across devices, then clamps.
    """
    return (_float(policy_kl_logps) - _float(ref_kl_logps)).mean().detach().clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLoss:
    """KTO (Ethayarajh et al. 2024, Eq. 7) per example, from summed completion log-probs.

    With ``r = policy - ref`` and ``z = kl`` (:func:`kl_estimate`, treated as a constant):
    desirable examples lose ``w_d (1 - σ(β (r - z)))``, undesirable ones ``w_u (1 - σ(β (z - r)))``.
    TRL 1.16's ``KTOTrainer._compute_loss`` (``loss_type="kto"``) reduces with a plain mean over
    all examples of these weighted losses (not normalised by the weights); it lists desirable
    examples first, here they stay in input order. Rewards are ``β r`` (without ``z``).
    """
    desirable = desirable.bool()
    logratios = _float(policy_logps) - _float(ref_logps)
    kl = torch.as_tensor(kl, dtype=logratios.dtype).detach()
    chosen_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    rejected_losses = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    losses = torch.where(desirable, chosen_losses, rejected_losses)
    return KTOLoss(losses, beta * logratios.detach(), desirable, kl)


# -- reward models (Bradley-Terry) -----------------------------------------------------------------


def reward_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """Bradley-Terry loss per pair: ``-log σ(s_c - s_r - margin)``, scores of shape ``[pairs]``.

    ``margin`` (per pair) is Llama 2's preference-strength margin. ``center_rewards_coefficient``
    adds ``coef (s_c + s_r)²`` (Eisenstein et al. 2023) to keep scores centred on zero. Matches
    TRL 1.16's ``RewardTrainer.compute_loss``, whose mean over pairs equals the mean of these.
    """
    chosen, rejected = _float(chosen_scores), _float(rejected_scores)
    difference = chosen - rejected if margin is None else chosen - rejected - margin
    losses = -F.logsigmoid(difference)
    if center_rewards_coefficient is not None:
        losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2
    return losses


def pairwise_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """The fraction of pairs whose chosen score is strictly higher (ties count as wrong, as in TRL)."""
    return (chosen_scores > rejected_scores).float().mean()


# -- metrics, under the names TRL logs them --------------------------------------------------------


def preference_metrics(
    result: PreferenceLoss, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor
) -> dict[str, float]:
    """Means over pairs: ``rewards/{chosen,rejected,accuracies,margins}``, ``logps/{chosen,rejected}``
    and the loss's extra metrics, as TRL's DPO, CPO and ORPO trainers log them."""
    chosen, rejected = result.chosen_rewards, result.rejected_rewards
    metrics = {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
    }
    metrics.update({name: values.mean() for name, values in result.extra.items()})
    return {name: value.item() for name, value in metrics.items()}


def kto_metrics(result: KTOLoss, policy_logps: torch.Tensor) -> dict[str, float]:
    """``kl``, and ``rewards/*``, ``logps/*`` means over the desirable (chosen) and undesirable
    (rejected) examples, as TRL's KTO trainer logs them: a side absent from the batch is not logged,
    nor is ``rewards/margins`` then (KTO logs no accuracy)."""
    metrics = {"kl": result.kl.item()}
    policy_logps = policy_logps.detach()
    for side, selected in (("chosen", result.desirable), ("rejected", ~result.desirable)):
        if selected.any():
            metrics[f"rewards/{side}"] = result.rewards[selected].mean().item()
            metrics[f"logps/{side}"] = policy_logps[selected].mean().item()
    if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics


def reward_metrics(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> dict[str, float]:
    """``accuracy``, ``margin`` and ``{min,mean,max}_reward``, as TRL's RewardTrainer logs them."""
    chosen, rejected = chosen_scores.detach(), rejected_scores.detach()
    scores = torch.cat([chosen, rejected])
    return {
        "accuracy": pairwise_accuracy(chosen, rejected).item(),
        "margin": (chosen - rejected).mean().item(),
        "min_reward": scores.min().item(),
        "mean_reward": scores.mean().item(),
        "max_reward": scores.max().item(),
    }
