"""The counts of a label-pairs run (:mod:`peftkit.rlaif.label_pairs`) and their summary.

The counts travel in the output's state file (:mod:`peftkit.rlaif.label_state`), so a resumed
run continues them and its summary speaks for the whole file, not only its own batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Why a prompt gave no pair (LabelReport counts each).
DROP_REASONS = ("ties", "unscored", "empty", "identical")


@dataclass
class LabelReport:
    """What :func:`~peftkit.rlaif.label_pairs.label_pairs` did (over every run on the file: a
    resumed run continues the counts)."""

    out: str
    prompts_total: int = 0  # prompts in the split
    prompts_target: int = 0  # of them, the first this run was to label (limit)
    prompts_done: int = 0
    resumed_at: int = 0  # prompts done before this run
    pairs: int = 0
    ties: int = 0
    unscored: int = 0
    empty: int = 0
    identical: int = 0
    answers: int = 0
    empty_answers: int = 0
    truncated_answers: int = 0  # cut at sampling.max_completion_length
    margin_sum: float = 0.0  # sum of score_chosen - score_rejected over the pairs
    unparseable: dict[str, int] = field(default_factory=dict)  # per judge: verdicts not read
    notes: list[str] = field(default_factory=list)

    @property
    def dropped(self) -> int:
        return self.ties + self.unscored + self.empty + self.identical

    @property
    def mean_margin(self) -> float | None:
        return self.margin_sum / self.pairs if self.pairs else None

    @property
    def finished(self) -> bool:
        return self.prompts_done >= self.prompts_total

    def counts(self) -> dict[str, Any]:
        keys = ("pairs", *DROP_REASONS, "answers", "empty_answers", "truncated_answers", "margin_sum")
        return {**{k: getattr(self, k) for k in keys}, "unparseable": dict(self.unparseable)}

    def restore(self, counts: dict[str, Any]) -> None:
        for key, value in counts.items():
            if key == "unparseable":
                self.unparseable = {str(k): int(v) for k, v in value.items()}
            elif hasattr(self, key):
                setattr(self, key, type(getattr(self, key))(value))

    def summary(self) -> str:
        done = self.prompts_done
        left = self.prompts_total - done
        state = "all" if left == 0 else f"{done:,} of {self.prompts_total:,}"
        lines = [f"label-pairs: {state} prompts labelled -> {self.pairs:,} pairs in {self.out}"]
        if self.resumed_at:
            lines.append(f"  resumed after prompt {self.resumed_at:,}")
        reasons = ", ".join(f"{getattr(self, r):,} {r}" for r in DROP_REASONS)
        lines.append(f"  prompts without a pair: {self.dropped:,} ({reasons})")
        margin = self.mean_margin
        if margin is not None:
            lines.append(f"  mean margin (score_chosen - score_rejected): {margin:.4f}")
        if self.answers:
            lines.append(
                f"  answers: {self.answers:,} sampled, {self.truncated_answers:,} cut at "
                f"sampling.max_completion_length, {self.empty_answers:,} empty"
            )
        verdicts = ", ".join(f"{name} {n:,}" for name, n in self.unparseable.items() if n)
        if verdicts:
            lines.append(f"  unparseable verdicts: {verdicts}")
        if left:
            lines.append(f"  {left:,} prompts left: run again with --resume to continue")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
