"""Training objectives beyond next-token prediction: preference optimisation and reward modelling.

``losses`` holds the math as pure functions of sequence log-probabilities (DPO and its variants,
SimPO, ORPO, KTO, Bradley-Terry reward loss) and the metrics TRL logs for them.
"""

from peftkit.objectives.losses import (
    DPO_LOSS_TYPES,
    KTOLoss,
    PreferenceLoss,
    dpo_loss,
    kl_estimate,
    kto_loss,
    kto_metrics,
    orpo_loss,
    pairwise_accuracy,
    preference_metrics,
    reward_loss,
    reward_metrics,
    sequence_logps,
    sequence_logps_from_logits,
    simpo_loss,
    token_logps_from_logits,
)

__all__ = [
    "DPO_LOSS_TYPES",
    "KTOLoss",
    "PreferenceLoss",
    "dpo_loss",
    "kl_estimate",
    "kto_loss",
    "kto_metrics",
    "orpo_loss",
    "pairwise_accuracy",
    "preference_metrics",
    "reward_loss",
    "reward_metrics",
    "sequence_logps",
    "sequence_logps_from_logits",
    "simpo_loss",
    "token_logps_from_logits",
]
