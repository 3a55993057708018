"""The job config's ``reward`` and ``sampling`` sections: who judges the model's answers, and how
the answers are sampled (``objective: online_dpo | grpo``, and ``peftkit label-pairs``).

::

    reward:
      functions: [my_rewards:exact_answer]          # module:function, TRL's signature
      models:                                       # reward models / classifiers
        - runs/tweet-reward/adapter                 # trained with objective: reward
        - {path: runs/tweet-classifier/adapter, label: positive}   # P(positive)
      judge: {model: smollm2-135m-instruct, mode: score}           # an LLM judge
      weights: [1.0, 0.5, 0.5]                      # one per judge, in the order above
    sampling:
      num_generations: 4
      max_completion_length: 32
      temperature: 1.0
      top_p: 1.0

Judges are built from this section by :mod:`peftkit.judges`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class RewardModelSpec:
    """A reward model or a classifier whose label probability is the reward."""

    path: str = field(
        default="",
        metadata={
            "help": "Directory of an adapter trained with objective: reward (its score is the reward), or of "
            "a sequence-classification adapter or model (then `label` names the class whose probability "
            "is the reward)."
        },
    )
    label: str | None = field(
        default=None,
        metadata={
            "help": "For a classifier: the label whose probability (softmax over the labels) is the reward, "
            "e.g. positive. null for a reward model (one output)."
        },
    )
    name: str | None = field(
        default=None,
        metadata={
            "help": "Name in the metrics (rewards/<name>/mean); null: the directory's name (and label)."
        },
    )

    def validate(self) -> list[str]:
        return [] if self.path.strip() else ["'reward.models[].path' is empty: give the model's directory"]


@dataclass
class LLMJudgeConfig:
    """A local causal language model asked to grade an answer, or to pick the better of two."""

    model: str = field(
        default="smollm2-135m-instruct",
        metadata={"help": "Built-in model name or local model directory of the judge."},
    )
    adapter: str | None = field(
        default=None, metadata={"help": "An adapter directory to load on the judge model; null: none."}
    )
    mode: Literal["score", "pairwise"] = field(
        default="score",
        metadata={
            "help": "score: the judge grades each answer from 0 to max_score (the reward is grade / "
            "max_score); pairwise: it picks the better of two answers, and an answer's reward is the share "
            "of the comparisons with its prompt's other answers that it wins."
        },
    )
    template: str | None = field(
        default=None,
        metadata={
            "help": "The judge's prompt, sent as a user message (chat template) or as text. score: with "
            "{prompt} and {completion}; pairwise: with {prompt}, {first} and {second}. null: a built-in "
            "template asking for a number (score) or for 1 or 2 (pairwise)."
        },
    )
    max_score: float = field(
        default=10.0, metadata={"help": "score mode: the highest grade the template asks for."}
    )
    max_new_tokens: int = field(default=8, metadata={"help": "Tokens the judge may write for its verdict."})
    name: str = field(default="judge", metadata={"help": "Name in the metrics (rewards/<name>/mean)."})

    def validate(self) -> list[str]:
        problems = []
        if self.max_score <= 0:
            problems.append(f"'reward.judge.max_score' must be > 0, got {self.max_score}")
        if self.max_new_tokens < 1:
            problems.append(f"'reward.judge.max_new_tokens' must be >= 1, got {self.max_new_tokens}")
        if self.template is not None:
            needed = (
                ("{prompt}", "{completion}") if self.mode == "score" else ("{prompt}", "{first}", "{second}")
            )
            missing = [p for p in needed if p not in self.template]
            if missing:
                problems.append(
                    f"'reward.judge.template' lacks {', '.join(missing)}: a {self.mode} template shows the judge "
                    f"{', '.join(needed)}"
                )
        return problems


@dataclass
class RewardConfig:
    """The judges of sampled answers; their weighted scores add up to the reward."""

    functions: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Python reward functions as module:function (the module importable, or a .py file next "
            "to the config), called as fn(prompts, completions, **columns) -> list[float | None] (TRL's "
            "signature): the data's other columns arrive as keyword arguments, None skips an answer."
        },
    )
    models: list[str | RewardModelSpec] = field(
        default_factory=list,
        metadata={"help": "Reward models or classifiers: a directory, or {path, label, name}."},
    )
    judge: LLMJudgeConfig | None = field(
        default=None, metadata={"help": "An LLM judge: {model, mode, template, ...}; null: none."}
    )
    weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "One weight per judge, in the order functions, models, judge; the reward is the weighted "
            "sum of the judges that scored an answer. null: all 1."
        },
    )
    batch_size: int = field(
        default=16, metadata={"help": "Answers scored per forward pass of a model judge."}
    )

    def count(self) -> int:
        return len(self.functions) + len(self.models) + (self.judge is not None)

    def validate(self) -> list[str]:
        problems = []
        for i, name in enumerate(self.functions):
            module, _, function = name.partition(":")
            if not module.strip() or not function.strip():
                problems.append(
                    f"'reward.functions[{i}]' is {name!r}: write module:function, e.g. my_rewards:exact_answer"
                )
        if self.weights is not None and len(self.weights) != self.count():
            problems.append(
                f"'reward.weights' has {len(self.weights)} weight(s) for {self.count()} judge(s) (functions, "
                "models, judge in that order): give one per judge, or remove weights"
            )
        if self.batch_size < 1:
            problems.append(f"'reward.batch_size' must be >= 1, got {self.batch_size}")
        return problems


@dataclass
class SamplingConfig:
    """How the model being trained writes its answers to each prompt."""

    num_generations: int = field(
        default=4,
        metadata={
            "help": "Answers sampled per prompt (TRL's num_generations): grpo compares each with its group, "
            "online_dpo pairs the best with the worst. At least 2."
        },
    )
    max_completion_length: int = field(
        default=64, metadata={"help": "Most tokens per answer; a longer answer is cut (and counted)."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (> 0)."})
    top_p: float = field(
        default=1.0, metadata={"help": "Nucleus sampling: keep the top tokens of this mass."}
    )
    top_k: int | None = field(default=None, metadata={"help": "Keep only the k likeliest tokens; null: all."})
    batch_size: int = field(
        default=32, metadata={"help": "Sequences generated together (prompts x generations), KV cache on."}
    )

    def validate(self) -> list[str]:
        problems = []
        if self.num_generations < 2:
            problems.append(
                f"'sampling.num_generations' must be >= 2 (answers are compared within a prompt), "
                f"got {self.num_generations}"
            )
        if self.max_completion_length < 1:
            problems.append(
                f"'sampling.max_completion_length' must be >= 1, got {self.max_completion_length}"
            )
        if self.temperature <= 0:
            problems.append(f"'sampling.temperature' must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"'sampling.top_p' must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            problems.append(f"'sampling.top_k' must be >= 1 or null, got {self.top_k}")
        if self.batch_size < 1:
            problems.append(f"'sampling.batch_size' must be >= 1, got {self.batch_size}")
        return problems
