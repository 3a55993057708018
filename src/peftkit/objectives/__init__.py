"""Training objectives beyond next-token prediction: preference optimisation, reward modelling and
learning from AI feedback (online DPO, GRPO: ``online``, ``online_dpo``, ``grpo``, ``grpo_loss``).

``losses`` holds the math as pure functions of sequence log-probabilities (DPO and its variants,
SimPO, ORPO, KTO, Bradley-Terry reward loss) and the metrics TRL logs for them; ``sequence`` the
completion log-probabilities and the reference model; one module per objective family
(``pairwise``: dpo, orpo, simpo; ``kto``; ``reward``) holds its task, the hooks the one training
loop calls (``peftkit.tasks.Task``). :data:`OBJECTIVE_TASKS` is the registry.
"""

from typing import Any

from peftkit.objectives.config import OBJECTIVES, ONLINE_OBJECTIVES, PreferenceConfig
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


def objective_tasks() -> dict[str, Any]:
    """objective name -> its task class (imported on first use: the tasks import the loop's helpers)."""
    from peftkit.objectives.grpo import GRPOTask
    from peftkit.objectives.kto import KTOTask
    from peftkit.objectives.online_dpo import OnlineDPOTask
    from peftkit.objectives.pairwise import DPOTask, ORPOTask, SimPOTask
    from peftkit.objectives.reward import RewardTask

    return {
        "dpo": DPOTask,
        "kto": KTOTask,
        "orpo": ORPOTask,
        "simpo": SimPOTask,
        "reward": RewardTask,
        "online_dpo": OnlineDPOTask,
        "grpo": GRPOTask,
    }


def objective_task(objective: str, preference: PreferenceConfig | None = None, job: Any = None) -> Any:
    """A fresh task object for an ``objective`` (not ``sft``); the online ones (ONLINE_OBJECTIVES)
    also take ``job``'s reward and sampling sections and its config file's directory."""
    cls = objective_tasks()[objective]
    if objective not in ONLINE_OBJECTIVES:
        return cls(preference)
    if job is None:
        return cls(preference)
    return cls(preference, job.reward, job.sampling, getattr(job, "source_dir", None))


__all__ = [
    "OBJECTIVES",
    "PreferenceConfig",
    "objective_task",
    "objective_tasks",
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
