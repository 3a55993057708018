"""What every judge shares: the :class:`Judge` interface, the weighted sum of several judges
(:class:`Judges`), and the helpers that flatten groups of answers and read text out of messages.

::

    prompts  [p0, p1]                       one per prompt
    groups   [[a00, a01, a02], [a10, a11]]  the sampled answers of each prompt (any sizes)
    columns  {"answer": ["4", "paris"]}     the data's other columns, one value per prompt
        -> each judge: [[s00, s01, s02], [s10, s11]]   a score, or None (no score) per answer
        -> Judges: total = sum of weight * score over the judges that scored the answer

A prompt is text or chat messages (``[{role, content}]``); an answer is text, or, when the prompt
is messages, ``[{"role": "assistant", "content": ...}]`` (TRL's convention).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from peftkit.errors import PeftkitError

Prompt = str | list[dict[str, str]]
Completion = str | list[dict[str, str]]
Scores = list[list[float | None]]


class Judge:
    """Scores each sampled answer of each prompt; ``None`` where it gives no score."""

    name: str = "judge"
    """Its metric name: ``rewards/<name>/mean``."""
    unparseable: int = 0
    """Verdicts that could not be read so far (an LLM judge's); 0 for the other judges."""

    def score_groups(
        self, prompts: list[Prompt], groups: list[list[Completion]], columns: dict[str, list]
    ) -> Scores:
        """One score per answer of each prompt's group, in the group's order (None: skipped).
        ``columns``: the data's other columns, one value per prompt."""
        raise NotImplementedError


@dataclass
class GroupScores:
    """What :meth:`Judges.score_groups` returns."""

    total: Scores
    """Weighted sum over the judges that scored each answer; None where no judge scored it."""
    per_judge: dict[str, Scores]
    """Each judge's own (unweighted) scores, by its unique name (:attr:`Judges.names`)."""
    unparseable: dict[str, int]
    """Per judge: the verdicts it could not read in this call."""


class Judges:
    """Several judges and their weights: the reward of an answer is the weighted sum of the scores
    of the judges that scored it.

    A judge that gives an answer no score (None, or NaN) is left out of that answer's sum: the
    others' weighted scores still add up, and the total is None only when no judge scored it.
    (TRL sums with ``nansum``, which counts a missing score as 0; leaving it out instead keeps a
    judge that only applies to some answers, e.g. a math checker on math prompts, from pulling
    the others' answers towards 0.)
    """

    def __init__(self, judges: list[Judge], weights: list[float] | None = None):
        if not judges:
            raise PeftkitError("Judges needs at least one judge")
        weights = [1.0] * len(judges) if weights is None else [float(w) for w in weights]
        if len(weights) != len(judges):
            raise PeftkitError(
                f"got {len(weights)} weight(s) for {len(judges)} judge(s): give one weight per judge"
            )
        bad = [w for w in weights if not math.isfinite(w)]
        if bad:
            raise PeftkitError(f"judge weights must be finite numbers, got {bad[0]}")
        self.judges = list(judges)
        self.weights = weights
        self.names = unique_names([str(getattr(j, "name", "") or type(j).__name__) for j in judges])
        for name in self.names:
            if "/" in name or not name.strip():
                raise PeftkitError(
                    f"judge name {name!r} cannot name a metric (rewards/<name>/mean): use a name without "
                    "'/' (e.g. reward.models[].name: tweet-clf:positive)"
                )

    def score_groups(
        self, prompts: list[Prompt], groups: list[list[Completion]], columns: dict[str, list] | None = None
    ) -> GroupScores:
        columns = dict(columns or {})
        check_inputs(prompts, groups, columns)
        per_judge: dict[str, Scores] = {}
        unparseable: dict[str, int] = {}
        for judge, name in zip(self.judges, self.names):
            before = getattr(judge, "unparseable", 0)
            scores = judge.score_groups(prompts, groups, columns)
            per_judge[name] = _checked(scores, groups, name)
            unparseable[name] = getattr(judge, "unparseable", 0) - before
        total: Scores = []
        for g, group in enumerate(groups):
            row: list[float | None] = []
            for i in range(len(group)):
                scored = [
                    (w, per_judge[n][g][i])
                    for w, n in zip(self.weights, self.names)
                    if per_judge[n][g][i] is not None
                ]
                row.append(sum(w * s for w, s in scored) if scored else None)
            total.append(row)
        return GroupScores(total, per_judge, unparseable)


def unique_names(names: list[str]) -> list[str]:
    """``names`` with clashes renamed: the second ``x`` becomes ``x_2``, the third ``x_3``."""
    out: list[str] = []
    for name in names:
        candidate, n = name, 1
        while candidate in out:
            n += 1
            candidate = f"{name}_{n}"
        out.append(candidate)
    return out


def check_inputs(prompts: Sequence[Any], groups: Sequence[Any], columns: dict[str, Any]) -> None:
    if len(prompts) != len(groups):
        raise PeftkitError(
            f"got {len(prompts)} prompts but {len(groups)} groups of answers: give one group per prompt"
        )
    for key, values in columns.items():
        if len(values) != len(prompts):
            raise PeftkitError(
                f"column {key!r} has {len(values)} value(s) for {len(prompts)} prompts: give one value per prompt"
            )


def _checked(scores: Any, groups: Sequence[Sequence[Any]], name: str) -> Scores:
    """A judge's scores as plain floats (NaN: None), in the groups' shape, or a clear error."""
    shape = [len(g) for g in groups]
    got = (
        [len(row) if isinstance(row, (list, tuple)) else None for row in scores]
        if isinstance(scores, (list, tuple))
        else None
    )
    if got != shape:
        raise PeftkitError(f"judge {name} returned scores of shape {got}, expected {shape} (one per answer)")
    return [[_as_score(s) for s in row] for row in scores]


def _as_score(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


# -- groups and messages ---------------------------------------------------------------------


def flatten(
    prompts: Sequence[Prompt], groups: Sequence[Sequence[Completion]]
) -> tuple[list, list, list[int]]:
    """``(prompts, completions, owner)``: one row per answer, in group order; ``owner[k]`` is the
    index of row k's prompt."""
    flat_prompts, flat_completions, owner = [], [], []
    for index, (prompt, group) in enumerate(zip(prompts, groups)):
        for completion in group:
            flat_prompts.append(prompt)
            flat_completions.append(completion)
            owner.append(index)
    return flat_prompts, flat_completions, owner


def regroup(values: Sequence[Any], groups: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """Flat ``values`` (one per answer, in group order) cut back into the groups' shape."""
    out, start = [], 0
    for group in groups:
        out.append(list(values[start : start + len(group)]))
        start += len(group)
    return out


def message_text(value: Any, role: str) -> str:
    """The text of a prompt (``role`` user) or an answer (``role`` assistant): a string as it is;
    messages: the content of the last ``role`` message (else of the last message)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return _content(value)
    if isinstance(value, (list, tuple)):
        messages = [m for m in value if isinstance(m, dict)]
        for message in reversed(messages):
            if message.get("role", message.get("from")) in (
                role,
                {"user": "human", "assistant": "gpt"}[role],
            ):
                return _content(message)
        return _content(messages[-1]) if messages else ""
    return "" if value is None else str(value)


def _content(message: dict[str, Any]) -> str:
    content = message.get("content", message.get("value", ""))
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def prompt_text(prompt: Prompt) -> str:
    return message_text(prompt, "user")


def completion_text(completion: Completion) -> str:
    return message_text(completion, "assistant")


# -- loading models ------------------------------------------------------------------------------


def precision_name(autocast_dtype: Any) -> str:
    """The ``--precision`` meaning ``autocast_dtype``: None is fp32, torch.bfloat16 is bf16; a
    precision name (auto, bf16, fp32) passes through."""
    import torch

    if autocast_dtype is None:
        return "fp32"
    if isinstance(autocast_dtype, str):
        from peftkit.precision import PRECISIONS

        if autocast_dtype not in PRECISIONS:
            raise PeftkitError(
                f"judge precision must be one of {', '.join(PRECISIONS)}, got {autocast_dtype!r}"
            )
        return autocast_dtype
    if autocast_dtype == torch.bfloat16:
        return "bf16"
    raise PeftkitError(f"judges compute in fp32 or bf16 autocast; got autocast dtype {autocast_dtype}")


def load_args(
    *, base_model: str | None, adapter: str | None, device: str, precision: str, threads: int | None
) -> argparse.Namespace:
    """The options :func:`peftkit.loading.load_model_from_args` reads (no remote code)."""
    return argparse.Namespace(
        base_model=base_model,
        adapter=adapter,
        device=device,
        precision=precision,
        dtype="float32",
        threads=threads,
        trust_remote_code=False,
    )
