"""Scoring text with a reward model (an adapter trained with ``objective: reward``).

::

    scorer = load_reward_model("runs/tweet-sentiment-reward/adapter")
    scorer.score(prompts=["I love it", "I love it"], completions=["positive", "negative"])
    # -> [2.31, -1.87]: higher is preferred
    score_texts(adapter_dir, ["<|im_start|>user\\n..."])   # load, then score, in one call

A prompt / completion is rendered exactly as training rendered its rows
(``data/preference_encode.py``): the chat template (or plain text) and the system prompt of the
training data, which the adapter records in ``peftkit_task.json``, the same truncation
(``max_seq_len``, ``preference.max_prompt_len``), right padding, and the head's output at the last
real token. Each of ``prompts`` / ``completions`` is a string or ``[{role, content}]`` messages,
as in preference rows. A ``text`` is scored as given (tokenized with the BOS the tokenizer adds,
no template, not truncated): for a chat model, give it already rendered.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftkit.configuration import from_dict
from peftkit.data.config import DataConfig
from peftkit.data.formats import RowError
from peftkit.data.preference import to_unpaired
from peftkit.data.preference_collate import collate_unpaired
from peftkit.data.preference_encode import KTOExample, _Tokens, encode_unpaired
from peftkit.data.readers import Record
from peftkit.errors import DataError, PeftkitError

Conversation = str | dict[str, Any] | list[dict[str, Any]]


def check_reward_model(adapter_dir: str | Path) -> Any:
    """The task of the reward model in ``adapter_dir``; a clear error for any other adapter."""
    from peftkit.objectives.reward import RewardTask
    from peftkit.tasks import TASK_FILE, load_task

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise PeftkitError(
            f"{adapter_dir} has no adapter_config.json: give the directory of an adapter trained with "
            "objective: reward (peftkit train saves it in OUTPUT_DIR/adapter)"
        )
    task = load_task(adapter_dir)
    if not isinstance(task, RewardTask):
        objective = getattr(task, "objective", "sft")
        hint = (
            "measure it with `peftkit eval`"
            if (Path(adapter_dir) / TASK_FILE).is_file()
            else "(no peftkit_task.json: it was not saved by `peftkit train` with objective: reward)"
        )
        raise PeftkitError(
            f"{adapter_dir} is not a reward model: it was trained for task {task.task_type.value} with "
            f"objective {objective}, but scoring needs an adapter trained with objective: reward (a one-output "
            f"head on preference pairs); {hint}"
        )
    return task


@dataclass
class RewardScorer:
    """A loaded reward model: ``score`` rows rendered as its training rendered them."""

    model: Any
    tokenizer: Any
    task: Any
    autocast_dtype: torch.dtype | None = None
    precision_label: str = "fp32"

    @property
    def data_cfg(self) -> DataConfig:
        """The training data's rendering options (the defaults where the adapter recorded none)."""
        return from_dict(DataConfig, dict(self.task.rendering or {}))

    def encode(
        self,
        texts: Sequence[str] | None = None,
        *,
        prompts: Sequence[Conversation] | None = None,
        completions: Sequence[Conversation] | None = None,
        origins: Sequence[str] | None = None,
    ) -> list[KTOExample]:
        """Token rows: ``texts`` as given, or each prompt with its completion (module docstring).
        ``origins`` name the rows in errors (default: ``text 0`` / ``row 0``, ...)."""
        if (texts is None) == (prompts is None and completions is None):
            raise ValueError("give either texts, or prompts and completions (one completion per prompt)")
        if texts is not None:
            if isinstance(texts, str):
                raise TypeError("texts must be a list of strings, not one string")
            names = list(origins or [f"text {i}" for i in range(len(texts))])
            for name, text in zip(names, texts):
                if not isinstance(text, str) or not text.strip():
                    raise DataError(f"{name}: the text to score must be a non-empty string, got {text!r:.60}")
            tokens = _Tokens(self.tokenizer, False, "")
            return [KTOExample([], tokens._ids(text), True, name) for name, text in zip(names, texts)]
        prompts, completions = list(prompts or []), list(completions or [])
        if len(prompts) != len(completions):
            raise ValueError(
                f"got {len(prompts)} prompts but {len(completions)} completions: give one of each"
            )
        cfg = self.data_cfg
        options = dict(
            max_seq_len=cfg.max_seq_len,
            max_prompt_len=self.task.preference.max_prompt_len,
            use_chat_template=cfg.use_chat_template,
            separator=cfg.separator,
        )
        names = list(origins or [f"row {i}" for i in range(len(prompts))])
        rows = []
        for origin, prompt, completion in zip(names, prompts, completions):
            try:
                fields = to_unpaired(
                    Record(origin, {"prompt": prompt, "completion": completion, "label": True}), cfg
                )
            except RowError as err:  # what is wrong with the row
                raise DataError(f"{origin}: {err}") from None
            rows.append(
                encode_unpaired(
                    self.tokenizer, fields.prompt, fields.completion, True, origin=origin, **options
                )
            )
        return rows

    def score_rows(self, rows: Sequence[Record], batch_size: int = 16) -> list[float]:
        """Scores of data rows (``peftkit score --data``): each has ``text``, or ``prompt`` and
        ``completion``; a row with ``chosen`` / ``rejected`` is a pair, measured by ``peftkit eval``."""
        texts: dict[int, str] = {}
        pairs: dict[int, tuple[Any, Any]] = {}
        for i, record in enumerate(rows):
            row = record.data
            if record.problem is not None:
                raise DataError(f"{record.origin}: {record.problem}")
            if "text" in row and not {"prompt", "completion"} & set(row):
                texts[i] = row["text"] if isinstance(row["text"], str) else ""
            elif "prompt" in row and "completion" in row:
                pairs[i] = (row["prompt"], row["completion"])
            elif "chosen" in row or "rejected" in row:
                raise DataError(
                    f"{record.origin}: a preference pair (chosen / rejected): the reward model's pairwise "
                    "accuracy on pairs is what `peftkit eval --adapter DIR --data FILE` measures; to score "
                    "answers, give rows with text, or prompt and completion"
                )
            else:
                raise DataError(
                    f"{record.origin}: a row to score has 'text', or 'prompt' and 'completion'; this one has "
                    f"{', '.join(sorted(map(str, row))) or 'no fields'}"
                )
        scores: dict[int, float] = {}
        for group, kind in ((texts, "texts"), (pairs, "pairs")):
            if not group:
                continue
            origins = [rows[i].origin for i in group]
            if kind == "texts":
                scored = self.score(list(texts.values()), batch_size=batch_size, origins=origins)
            else:
                values = list(pairs.values())
                scored = self.score(
                    prompts=[p for p, _ in values],
                    completions=[c for _, c in values],
                    batch_size=batch_size,
                    origins=origins,
                )
            scores.update(zip(group, scored))
        return [scores[i] for i in range(len(rows))]

    def score(
        self,
        texts: Sequence[str] | None = None,
        *,
        prompts: Sequence[Conversation] | None = None,
        completions: Sequence[Conversation] | None = None,
        batch_size: int = 16,
        origins: Sequence[str] | None = None,
    ) -> list[float]:
        """The reward of each row (in the input order): higher is preferred."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        rows = self.encode(texts, prompts=prompts, completions=completions, origins=origins)
        from peftkit.tasks.base import inference

        device = next(self.model.parameters()).device
        out: list[float] = []
        with inference(self.model, self.autocast_dtype):
            for start in range(0, len(rows), batch_size):
                batch = collate_unpaired(
                    rows[start : start + batch_size], self.tokenizer.pad_token_id, kl=False
                )
                logits = self.model(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                ).logits
                out += logits[:, 0].float().cpu().tolist()
        return out


def load_reward_model(
    adapter_dir: str | Path,
    *,
    base_model: str | None = None,
    device: str = "auto",
    precision: str | None = None,
    dtype: str = "float32",
    threads: int | None = None,
    trust_remote_code: bool = False,
) -> RewardScorer:
    """The reward model in ``adapter_dir`` on its base model, loaded as ``peftkit eval`` loads models
    (``precision`` None: auto, bf16 where the device computes it natively)."""
    from peftkit.loading import load_model_from_args

    task = check_reward_model(adapter_dir)
    args = argparse.Namespace(
        adapter=str(adapter_dir),
        base_model=base_model,
        device=device,
        precision=precision,
        dtype=dtype,
        threads=threads,
        trust_remote_code=trust_remote_code,
    )
    model, tokenizer = load_model_from_args(args, task=task.loader_task, **task.model_kwargs())
    return RewardScorer(model, tokenizer, task, args.autocast_dtype, args.precision_label)


def score_texts(
    adapter_dir: str | Path,
    texts: Sequence[str] | None = None,
    *,
    prompts: Sequence[Conversation] | None = None,
    completions: Sequence[Conversation] | None = None,
    batch_size: int = 16,
    **load_options: Any,
) -> list[float]:
    """Load the reward model in ``adapter_dir`` (``load_options``: see :func:`load_reward_model`)
    and score ``texts``, or each prompt with its completion."""
    scorer = load_reward_model(adapter_dir, **load_options)
    return scorer.score(texts, prompts=prompts, completions=completions, batch_size=batch_size)
