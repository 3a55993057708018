"""An LLM judge (``reward.judge``): a local causal language model asked to grade an answer, or to
pick the better of two.

::

    score     "... Question: {prompt} Answer: {completion} How good is the answer, from 0 to 10?"
              reply "7", "7/10", "Score: 7.5", "**8**" -> the first number -> reward = grade / 10
    pairwise  "... Answer 1: {first} Answer 2: {second} Which answer is ... better? ... 1 or 2"
              reply "1", "Answer 2", "B", "the first" -> which one won
              every two answers i, j of a prompt are compared in both orders (i first, then j
              first), which cancels the judge's bias for a position; an answer's reward is the
              share of its comparisons (those whose verdict could be read) that it won

The judge's prompt goes through the tokenizer's chat template as one user message (plain text when
it has none) and is answered greedily, in batches. A prompt or answer given as messages is shown as
its text (the last user message; the assistant's answer). A verdict that cannot be read (no number,
a grade outside 0..max_score, both or neither of 1 and 2) counts in ``unparseable`` (once per answer
in score mode, once per comparison in pairwise mode) and gives no score: it never stops training.
The judge's prompt is not truncated: it must fit the judge model's context.
"""

from __future__ import annotations

import re
from itertools import permutations
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.evaluation import generate_completions
from peftkit.judges.base import Judge, Scores, completion_text, load_args, prompt_text
from peftkit.rlaif.config import LLMJudgeConfig

# The question and answers first, the instruction last: small instruct models (SmolLM2-135M) tend to
# answer the question itself when the instruction comes first.
SCORE_TEMPLATE = (
    "Here is a question and an answer to it.\n\nQuestion: {prompt}\n\nAnswer: {completion}\n\n"
    "How good is the answer, from 0 (wrong or useless) to {max_score} (correct and helpful)? "
    "Reply with one number only."
)
PAIRWISE_TEMPLATE = (
    "Here is a question and two answers to it.\n\nQuestion: {prompt}\n\nAnswer 1: {first}\n\n"
    "Answer 2: {second}\n\nWhich answer is correct and more helpful, answer 1 or answer 2? "
    "Reply with 1 or 2 only."
)

_NUMBER = re.compile(r"-?(?:\d+(?:[.,]\d+)?|[.,]\d+)")
_FIELD = re.compile(r"\{(prompt|completion|first|second|max_score)\}")
_ORDINAL = re.compile(r"\b(first|second)\b", re.IGNORECASE)
_LETTER = re.compile(r"(?<![\w'])([AB])(?![\w'])")


def parse_score(reply: str, max_score: float) -> float | None:
    """The grade in ``reply``: its first number, if within [0, max_score]; else None."""
    found = _NUMBER.search(reply or "")
    if found is None:
        return None
    try:
        grade = float(found.group().replace(",", "."))
    except ValueError:
        return None
    return grade if 0 <= grade <= max_score else None


def parse_pairwise(reply: str) -> int | None:
    """Which answer ``reply`` picks: 0 (the first shown) or 1 (the second), None when it names
    neither or both. Numbers 1 / 2 decide first; without them the words first / second; without
    those the letters A / B."""
    text = reply or ""
    numbers = set()
    for token in _NUMBER.findall(text):
        try:
            numbers.add(float(token.replace(",", ".")))
        except ValueError:
            continue
    picks = [{1.0: 0, 2.0: 1}[n] for n in numbers if n in (1.0, 2.0)]
    if not picks:
        picks = [0 if w.lower() == "first" else 1 for w in _ORDINAL.findall(text)]
    if not picks:
        picks = [0 if letter == "A" else 1 for letter in _LETTER.findall(text)]
    chosen = set(picks)
    return chosen.pop() if len(chosen) == 1 else None


def render(template: str, **values: str) -> str:
    """``template`` with its ``{prompt}``-style fields filled in one pass: other braces stay as they
    are, and a brace inside a filled-in answer is never filled again."""
    return _FIELD.sub(lambda m: values.get(m.group(1), m.group(0)), template)


class LLMJudge(Judge):
    """A causal LM that grades answers (``mode: score``) or compares them (``mode: pairwise``)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        cfg: LLMJudgeConfig | None = None,
        *,
        batch_size: int = 16,
        autocast_dtype: Any = None,
    ):
        self.cfg = cfg or LLMJudgeConfig()
        self.model, self.tokenizer = model, tokenizer
        self.name = self.cfg.name
        self.batch_size, self.autocast_dtype = batch_size, autocast_dtype
        self.unparseable = 0
        default = SCORE_TEMPLATE if self.cfg.mode == "score" else PAIRWISE_TEMPLATE
        self.template = self.cfg.template or default

    def judge_text(self, prompt: Any, *answers: Any) -> str:
        """What the judge reads for ``prompt`` and one answer (score) or two (pairwise)."""
        values = {"prompt": prompt_text(prompt), "max_score": f"{self.cfg.max_score:g}"}
        if self.cfg.mode == "score":
            values["completion"] = completion_text(answers[0])
        else:
            values["first"], values["second"] = completion_text(answers[0]), completion_text(answers[1])
        return render(self.template, **values)

    def encode(self, text: str) -> list[int]:
        from peftkit.loading import encode_chat, encode_plain, has_chat_template

        if has_chat_template(self.tokenizer):
            return encode_chat(self.tokenizer, [{"role": "user", "content": text}])
        return encode_plain(self.tokenizer, text)

    def verdicts(self, texts: list[str]) -> list[str]:
        """The judge's replies to ``texts`` (greedy, batched)."""
        if not texts:
            return []
        return generate_completions(
            self.model,
            self.tokenizer,
            [self.encode(t) for t in texts],
            max_new_tokens=self.cfg.max_new_tokens,
            batch_size=self.batch_size,
            autocast_dtype=self.autocast_dtype,
            progress=False,
        )

    def score_groups(self, prompts: list, groups: list[list], columns: dict[str, list]) -> Scores:
        if self.cfg.mode == "score":
            return self._grades(prompts, groups)
        return self._win_rates(prompts, groups)

    def _grades(self, prompts: list, groups: list[list]) -> Scores:
        texts = [self.judge_text(p, c) for p, group in zip(prompts, groups) for c in group]
        replies = iter(self.verdicts(texts))
        out: Scores = []
        for group in groups:
            row: list[float | None] = []
            for _ in group:
                grade = parse_score(next(replies), self.cfg.max_score)
                self.unparseable += grade is None
                row.append(None if grade is None else grade / self.cfg.max_score)
            out.append(row)
        return out

    def _win_rates(self, prompts: list, groups: list[list]) -> Scores:
        # every ordered pair (i, j), i != j: i shown first; both orders of each pair are judged
        pairs = [(g, i, j) for g, group in enumerate(groups) for i, j in permutations(range(len(group)), 2)]
        replies = self.verdicts(
            [self.judge_text(prompts[g], groups[g][i], groups[g][j]) for g, i, j in pairs]
        )
        wins = [[0] * len(group) for group in groups]
        judged = [[0] * len(group) for group in groups]
        for (g, i, j), reply in zip(pairs, replies):
            pick = parse_pairwise(reply)
            if pick is None:
                self.unparseable += 1
                continue
            judged[g][i] += 1
            judged[g][j] += 1
            wins[g][(i, j)[pick]] += 1
        return [[w / n if n else None for w, n in zip(ws, ns)] for ws, ns in zip(wins, judged)]


def load_llm_judge(
    cfg: LLMJudgeConfig,
    *,
    device: str = "auto",
    precision: str = "fp32",
    threads: int | None = None,
    batch_size: int = 16,
) -> LLMJudge:
    """Load the judge's model (and adapter) for inference, as ``peftkit generate`` loads models.

    ``cfg.model`` is the base model; with an adapter and ``model`` left at its default, the
    adapter's recorded base model is used instead."""
    from peftkit.loading import adapter_base_model, load_model_from_args

    problems = cfg.validate()
    if problems:
        from peftkit.configuration import ConfigError

        raise ConfigError(problems)
    base = cfg.model
    if cfg.adapter is not None:
        _check_adapter(cfg.adapter)
        if base == LLMJudgeConfig.model:
            base = adapter_base_model(cfg.adapter)
    args = load_args(
        base_model=base, adapter=cfg.adapter, device=device, precision=precision, threads=threads
    )
    model, tokenizer = load_model_from_args(args, task="causal_lm")
    return LLMJudge(model, tokenizer, cfg, batch_size=batch_size, autocast_dtype=args.autocast_dtype)


def _check_adapter(adapter: str) -> None:
    from peftkit.loading import read_adapter_config
    from peftkit.tasks import load_task

    if not Path(adapter).is_dir():
        raise PeftkitError(f"reward.judge.adapter: the adapter directory {adapter} does not exist")
    read_adapter_config(adapter)
    task = load_task(adapter)
    if task.loader_task != "causal_lm":
        raise PeftkitError(
            f"reward.judge.adapter: {adapter} was trained for task {task.task_type.value} (objective "
            f"{getattr(task, 'objective', 'sft')}), but the LLM judge writes its verdict with a causal "
            "language model; put reward models and classifiers in reward.models instead"
        )
