"""The job config's ``evaluation`` section: what is measured on the held-out test split, and how
a generated answer is compared with the expected one (the modes are in :mod:`peftkit.answer_match`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peftkit.answer_match import MatchOptions, option_problems


@dataclass
class EvaluationConfig:
    """What to measure on the held-out test split before and after training."""

    accuracy_before: bool = field(
        default=False,
        metadata={
            "help": "Measure the task's metrics on the test split before training (causal LM: answer "
            "accuracy by generation; classification: accuracy and macro-F1; QA: exact match and F1)."
        },
    )
    accuracy_after: bool = field(
        default=True,
        metadata={
            "help": "Measure the task's metrics on the test split after training (see accuracy_before)."
        },
    )
    max_new_tokens: int = field(default=8, metadata={"help": "Tokens generated per test prompt."})
    # Kept equal to peftkit.answer_match.MATCH_MODES (a test checks).
    match: Literal["first_word", "exact", "contains", "first_line", "number", "regex", "choice"] = field(
        default="first_word",
        metadata={
            "help": "How a generated answer is compared with the expected one (causal LM). first_word: "
            "the first word of each, numbers by value with their sign ('-5' is not '5'); exact: the "
            "whole texts; first_line: the prediction's first non-empty line as a whole; number: the "
            "first number of each within the tolerances; contains: the answer occurs in the prediction "
            "on word boundaries ('15' does not contain '5', '-5' does not contain '5'); regex: "
            "`pattern` extracts the answer from the prediction; choice: the prediction is mapped to one "
            "of `choices` (the label it starts with, else the only one it mentions). Text is compared "
            "after Unicode NFKC, with whitespace runs collapsed and case folded."
        },
    )
    case_sensitive: bool = field(
        default=False,
        metadata={"help": "Compare text with its case (all match modes but number)."},
    )
    relative_tolerance: float = field(
        default=1e-6,
        metadata={"help": "match: number: largest difference as a fraction of the larger of the two values."},
    )
    absolute_tolerance: float = field(
        default=0.0,
        metadata={"help": "match: number: largest absolute difference (matters for answers near 0)."},
    )
    pattern: str | None = field(
        default=None,
        metadata={
            "help": "match: regex (required there): a Python regular expression searched in the "
            "prediction; its first group that took part, or the whole match, is compared with the "
            r"answer like exact. E.g. 'answer is (-?\d+)'."
        },
    )
    choices: list[str] | None = field(
        default=None,
        metadata={
            "help": "match: choice: the label set a prediction is mapped to (null: the distinct "
            "expected answers of the test split)."
        },
    )
    batch_size: int = field(default=16, metadata={"help": "Prompts per generation / evaluation batch."})
    show_samples: int = field(default=5, metadata={"help": "Sample predictions to print after evaluation."})
    general: str | None = field(
        default=None,
        metadata={
            "help": "Forgetting: perplexity on general text before and after training, to show what the "
            "task cost the model on text it was not fine-tuned on. builtin: peftkit's own general English "
            "text (about 1,800 tokens on many topics); or a .txt file (paragraphs split by blank lines) or "
            '.jsonl file ({"text": ...} per line). null: not measured.'
        },
    )

    def match_options(self) -> MatchOptions:
        """The answer-matching options of this section, for :mod:`peftkit.evaluation`."""
        return MatchOptions(
            case_sensitive=self.case_sensitive,
            relative_tolerance=self.relative_tolerance,
            absolute_tolerance=self.absolute_tolerance,
            pattern=self.pattern,
            choices=None if self.choices is None else tuple(self.choices),
        )

    def validate(self) -> list[str]:
        problems = []
        for name in ["max_new_tokens", "batch_size"]:
            if getattr(self, name) < 1:
                problems.append(f"'evaluation.{name}' must be >= 1, got {getattr(self, name)}")
        problems += [
            f"'evaluation.{name}' {text}" for name, text in option_problems(self.match, self.match_options())
        ]
        from peftkit.forgetting import source_problem

        problems.append(source_problem(self.general))
        return [p for p in problems if p]
