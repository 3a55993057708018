"""The job config's ``objective`` and ``preference`` section: what the model is trained to prefer.

::

    objective: dpo          # sft (default) | dpo | kto | orpo | simpo | reward | online_dpo | grpo
    preference:
      beta: 0.1
      loss_type: sigmoid    # dpo: sigmoid | ipo | hinge | robust
      reference: auto       # auto | precompute | none

Option names follow TRL's configs (``DPOConfig``, ``KTOConfig``, ``CPOConfig``, ``ORPOConfig``,
``RewardConfig``) where TRL has them. Defaults are TRL 1.16's for each objective, except that one
``beta`` serves all: ``null`` picks the objective's usual value (0.1; SimPO 2.0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

OBJECTIVES = ("sft", "dpo", "kto", "orpo", "simpo", "reward", "online_dpo", "grpo")
"""The values of the job's ``objective`` key (kept equal to the Literal below; a test checks)."""

Objective = Literal["sft", "dpo", "kto", "orpo", "simpo", "reward", "online_dpo", "grpo"]

REFERENCE_OBJECTIVES = ("dpo", "kto", "online_dpo", "grpo")
"""Objectives that compare the policy with a frozen reference model (grpo only where beta > 0)."""

ONLINE_OBJECTIVES = ("online_dpo", "grpo")
"""Objectives that sample answers from the model in every step and learn from their judges' scores."""

DEFAULT_BETA = {"dpo": 0.1, "kto": 0.1, "orpo": 0.1, "simpo": 2.0, "online_dpo": 0.1, "grpo": 0.0}


@dataclass
class PreferenceConfig:
    """Options of the preference objectives (``objective: dpo | kto | orpo | simpo | reward``)."""

    beta: float | None = field(
        default=None,
        metadata={
            "help": "Strength of the preference term. dpo / kto / online_dpo: the KL penalty's beta (higher: "
            "stay closer to the reference); grpo: the weight of the KL to the reference (0: no reference "
            "pass); simpo: the reward scale; orpo: the odds-ratio weight (the paper's lambda). null: the "
            "objective's usual value (0.1; simpo 2.0; grpo 0.0, as TRL's GRPOConfig). Unused by reward."
        },
    )
    epsilon: float = field(
        default=0.2, metadata={"help": "grpo: the clipping band's lower half-width (TRL's epsilon)."}
    )
    epsilon_high: float | None = field(
        default=None,
        metadata={
            "help": "grpo: the band's upper half-width (DAPO's clip-higher, e.g. 0.28); null: epsilon."
        },
    )
    scale_rewards: Literal["group", "batch", "none"] = field(
        default="group",
        metadata={
            "help": "grpo: divide each answer's advantage (reward minus its group's mean) by the std of its "
            "group's rewards (group, the GRPO paper), of the step's rewards on this process (batch), or not "
            "at all (none, Dr. GRPO). TRL's scale_rewards."
        },
    )
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = field(
        default="sigmoid",
        metadata={
            "help": "dpo: sigmoid (the DPO paper), ipo (squared loss on per-token log-ratios), hinge (SLiC), "
            "robust (noisy-label DPO, uses label_smoothing)."
        },
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "dpo sigmoid / robust, simpo: the assumed share of pairs whose labels are flipped, in "
            "[0, 0.5) (conservative DPO). Note TRL's DPOTrainer ignores it for sigmoid; peftkit applies it."
        },
    )
    simpo_gamma: float = field(
        default=0.5, metadata={"help": "simpo: the target reward margin gamma (TRL's simpo_gamma)."}
    )
    desirable_weight: float = field(
        default=1.0, metadata={"help": "kto: weight of the desirable (label: true) examples' loss."}
    )
    undesirable_weight: float = field(
        default=1.0, metadata={"help": "kto: weight of the undesirable (label: false) examples' loss."}
    )
    center_rewards_coefficient: float | None = field(
        default=None,
        metadata={
            "help": "reward: add coef * (score_chosen + score_rejected)^2 to keep scores centred on 0 "
            "(Eisenstein et al. 2023); null: off."
        },
    )
    reference: Literal["auto", "precompute", "none"] = field(
        default="auto",
        metadata={
            "help": "dpo / kto: the frozen model the policy is compared with. auto: the model training "
            "starts from, computed alongside each step without gradients: the base with the adapter "
            "disabled for a new adapter; the starting adapter, frozen, with init_adapter; a frozen copy of "
            "the starting weights for full fine-tuning. precompute (dpo): the reference log-probs of every "
            "training pair are computed once before training and stored with the run (reused on resume): "
            "no reference pass and no second copy of the weights during training. none: for orpo, simpo "
            "and reward, which have no reference (auto means none there)."
        },
    )
    max_prompt_len: int | None = field(
        default=None,
        metadata={
            "help": "Keep at most this many of a prompt's last tokens; a prompt + completion longer than "
            "data.max_seq_len cuts the prompt from the left, but to no fewer than max_prompt_len tokens "
            "(unset: half of max_seq_len), then the completions from the right. Chosen and rejected always "
            "share one prompt."
        },
    )

    def validate(self) -> list[str]:
        problems = []
        if self.beta is not None and self.beta < 0:
            problems.append(f"'preference.beta' must be >= 0, got {self.beta}")
        if self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            problems.append("'preference.epsilon' and 'preference.epsilon_high' must be > 0")
        if not 0 <= self.label_smoothing < 0.5:
            problems.append(
                f"'preference.label_smoothing' must be in [0, 0.5) (the share of flipped labels), "
                f"got {self.label_smoothing}"
            )
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(self, name) <= 0:
                problems.append(f"'preference.{name}' must be > 0, got {getattr(self, name)}")
        if self.max_prompt_len is not None and self.max_prompt_len < 1:
            problems.append(f"'preference.max_prompt_len' must be >= 1, got {self.max_prompt_len}")
        return problems

    def beta_for(self, objective: str) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA.get(objective, 0.1)


def objective_problems(objective: str, preference: PreferenceConfig, explicit: set[str]) -> list[str]:
    """What does not fit ``objective``: options of another objective that were set (``explicit``:
    the keys the user wrote under ``preference``), a reference mode it has no use for."""
    problems = []
    if objective == "sft":
        if explicit:
            problems.append(
                "section 'preference' is given but 'objective' is sft (the default): set objective to "
                f"one of {', '.join(o for o in OBJECTIVES if o != 'sft')}, or remove the section"
            )
        return problems
    used = {
        "dpo": {"beta", "loss_type", "label_smoothing", "reference", "max_prompt_len"},
        "kto": {"beta", "desirable_weight", "undesirable_weight", "reference", "max_prompt_len"},
        "orpo": {"beta", "max_prompt_len", "reference"},
        "simpo": {"beta", "simpo_gamma", "label_smoothing", "max_prompt_len", "reference"},
        "reward": {"center_rewards_coefficient", "max_prompt_len", "reference"},
        "online_dpo": {"beta", "loss_type", "label_smoothing", "reference", "max_prompt_len"},
        "grpo": {"beta", "epsilon", "epsilon_high", "scale_rewards", "reference", "max_prompt_len"},
    }[objective]
    if preference.beta == 0 and objective != "grpo":
        problems.append(
            f"'preference.beta' is 0 but objective {objective} needs a positive beta (only grpo may drop "
            "its KL term with beta: 0)"
        )
    for name in sorted(explicit - used):
        problems.append(
            f"'preference.{name}' is set but objective {objective} does not use it (it uses: "
            f"{', '.join(sorted(used))}); remove it or change the objective"
        )
    if objective in ONLINE_OBJECTIVES and preference.reference == "precompute":
        problems.append(
            f"'preference.reference' is precompute but objective {objective} scores answers it samples "
            "during training, which cannot be computed ahead: use reference: auto"
        )
    elif objective == "grpo" and preference.beta_for("grpo") == 0:
        pass  # no reference: any value of preference.reference is moot
    elif objective in REFERENCE_OBJECTIVES:
        if preference.reference == "none":
            problems.append(
                f"'preference.reference' is none but objective {objective} compares the policy with a "
                "reference model: use auto or precompute (orpo and simpo need no reference)"
            )
        if objective == "kto" and preference.reference == "precompute":
            problems.append(
                "'preference.reference' is precompute but objective kto estimates its KL term on rows "
                "made within each batch (each prompt with another row's completion), which cannot be "
                "computed ahead: use reference: auto"
            )
    elif preference.reference == "precompute":
        problems.append(
            f"'preference.reference' is precompute but objective {objective} uses no reference model: "
            "remove the option"
        )
    return problems


def objective_fit(job: Any, method: str) -> list[str]:
    """Task, method and run settings of ``job`` (a TrainJobConfig) an objective cannot work with, and why."""
    from peftkit.methods.base import TaskType

    problems = []
    if job.objective == "reward" and job.task != TaskType.SEQ_CLS:
        problems.append(
            f"objective reward trains a one-output sequence-classification head, but 'task' is "
            f"{job.task.value}: remove 'task' or set task: SEQ_CLS"
        )
    if job.objective not in ("sft", "reward") and job.task != TaskType.CAUSAL_LM:
        problems.append(
            f"objective {job.objective} scores the completions' log-probabilities under a language model, "
            f"but 'task' is {job.task.value}: set task: CAUSAL_LM"
        )
    if job.objective == "kto" and job.training.batch_size < 2:
        problems.append(
            "'training.batch_size' is 1 but objective kto estimates its reference point on each prompt "
            "paired with another row's completion of the same micro-batch: set it to 2 or more"
        )
    if job.objective != "sft":
        if job.training.packing:
            problems.append(
                f"'training.packing' is true but objective {job.objective} needs each completion's own "
                "log-probability (chosen and rejected share a prompt): set training.packing: false"
            )
        if job.distributed == "fsdp":  # auto picks fsdp for full fine-tuning: refused in setup then
            problems.append(
                f"'distributed' is fsdp but objective {job.objective} is not supported with sharded "
                "parameters yet: set distributed: ddp (ignored in a single process)"
            )
    if job.objective in ONLINE_OBJECTIVES:
        limit, longest = job.data.max_seq_len, job.sampling.max_completion_length
        if limit is not None and limit <= longest:
            problems.append(
                f"'data.max_seq_len' ({limit}) leaves no room for a prompt before an answer of up to "
                f"sampling.max_completion_length ({longest}) tokens: raise max_seq_len or lower "
                "max_completion_length"
            )
    if job.init_adapter is not None:
        if method == "full":
            problems.append(
                "'init_adapter' starts from a saved adapter, but method is full (no adapter): to continue "
                "from a fully fine-tuned model, set base_model to its directory"
            )
    return problems


def online_problems(objective: str, reward: Any, given: set[str]) -> list[str]:
    """The ``reward`` / ``sampling`` sections (``given``: those the job wrote) against the objective."""
    if objective not in ONLINE_OBJECTIVES:
        return [
            f"section '{name}' is given but objective {objective} does not sample answers: set objective to "
            f"{' or '.join(ONLINE_OBJECTIVES)}, or remove the section"
            for name in sorted(given)
        ]
    if reward.count() == 0:
        return [
            f"objective {objective} learns from judges of the answers it samples, but section 'reward' names "
            "none: add reward.functions (module:function), reward.models (a reward model or a classifier "
            "with its label) or reward.judge (an LLM judge)"
        ]
    return []
