"""Reward models and classifiers as judges (``reward.models``).

::

    runs/tweet-reward/adapter                         trained with objective: reward
        score = the head's one output on prompt + answer, rendered as the model was trained
        (peftkit.scoring: its chat template, system prompt and truncation)
    {path: runs/tweet-clf/adapter, label: positive}   a SEQ_CLS adapter (peftkit_task.json labels)
    {path: some/model-dir, label: POSITIVE}           a transformers *ForSequenceClassification dir
        score = softmax probability of `label`, on the answer's text alone
    some/reward-model-dir                             a transformers classifier with one output
        score = that output on the pair (prompt text, answer text), as cross-encoder reward
        models (e.g. OpenAssistant's) take question and answer

A classifier reads the answer alone on purpose: a sentiment or toxicity classifier judges what the
model wrote, and the prompt's own tone would blur it. An answer with no text gets no score (None)
from these judges: there is nothing to render for them.

Name in the metrics: ``name``, else the directory's name (for ``.../NAME/adapter``: NAME), with
``:label`` for a classifier (``tweet-clf:positive``; a ``/`` would split the metric's name).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from peftkit.errors import PeftkitError
from peftkit.judges.base import Judge, Scores, completion_text, flatten, load_args, prompt_text, regroup
from peftkit.rlaif.config import RewardModelSpec

_ONE_OUTPUT = "one"  # a plain transformers classifier with one output: a reward model


class RewardModelJudge(Judge):
    """An adapter trained with ``objective: reward``: its score of prompt + answer."""

    def __init__(self, scorer: Any, name: str, batch_size: int = 16):
        self.scorer, self.name, self.batch_size = scorer, name, batch_size
        self.unparseable = 0

    def score_groups(self, prompts: list, groups: list[list], columns: dict[str, list]) -> Scores:
        flat_prompts, completions, owner = flatten(prompts, groups)
        keep = [k for k, c in enumerate(completions) if completion_text(c).strip()]
        out: list[float | None] = [None] * len(completions)
        if keep:
            scores = self.scorer.score(
                prompts=[flat_prompts[k] for k in keep],
                completions=[completions[k] for k in keep],
                batch_size=self.batch_size,
                origins=[f"prompt {owner[k]}, answer {k}" for k in keep],
            )
            for k, score in zip(keep, scores):
                out[k] = score
        return regroup(out, groups)


class ClassifierJudge(Judge):
    """A sequence classifier: the probability of ``label`` for the answer's text (``label_index``
    None: the single output for the pair prompt text, answer text)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        name: str,
        label_index: int | None,
        *,
        batch_size: int = 16,
        autocast_dtype: torch.dtype | None = None,
    ):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.label_index, self.batch_size, self.autocast_dtype = label_index, batch_size, autocast_dtype
        self.unparseable = 0

    def encode(self, prompt: Any, completion: Any) -> Any:
        """Token ids of one row, as ``task: SEQ_CLS`` encodes its texts (special tokens added)."""
        from peftkit.tasks.base import TaskExample

        limit = max_length(self.model, self.tokenizer)
        texts = (
            [completion_text(completion)]
            if self.label_index is not None
            else [prompt_text(prompt), completion_text(completion)]
        )
        encoded = self.tokenizer(
            *texts, truncation=limit is not None, max_length=limit, add_special_tokens=True
        )
        extra = {"token_type_ids": encoded["token_type_ids"]} if "token_type_ids" in encoded else {}
        return TaskExample(encoded["input_ids"], 0, "", None, extra)

    def score_groups(self, prompts: list, groups: list[list], columns: dict[str, list]) -> Scores:
        from peftkit.tasks.base import encoder_inputs, inference

        flat_prompts, completions, _ = flatten(prompts, groups)
        keep = [k for k, c in enumerate(completions) if completion_text(c).strip()]
        out: list[float | None] = [None] * len(completions)
        device = next(self.model.parameters()).device
        with inference(self.model, self.autocast_dtype):
            for start in range(0, len(keep), self.batch_size):
                rows = keep[start : start + self.batch_size]
                examples = [self.encode(flat_prompts[k], completions[k]) for k in rows]
                batch = encoder_inputs(examples, self.tokenizer.pad_token_id)
                logits = self.model(
                    **{k: v.to(device) for k, v in batch.items()}
                ).logits.float()  # (rows, labels)
                if self.label_index is None:
                    scores = logits[:, 0]
                else:
                    scores = logits.softmax(-1)[:, self.label_index]
                for k, score in zip(rows, scores.cpu().tolist()):
                    out[k] = score
        return regroup(out, groups)


def max_length(model: Any, tokenizer: Any) -> int | None:
    """The longest input to give the model: its tokenizer's and position embeddings' limit."""
    limits = [
        getattr(tokenizer, "model_max_length", None),
        getattr(model.config, "max_position_embeddings", None),
    ]
    usable = [int(n) for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
    return min(usable) if usable else None


def default_name(path: Path) -> str:
    """The directory's name; for an adapter directory ``.../NAME/adapter``, NAME."""
    resolved = path.resolve()
    return resolved.parent.name if resolved.name == "adapter" and resolved.parent.name else resolved.name


def resolve_dir(path: str, base_dir: str | Path | None) -> Path:
    """``path`` as given (relative to the working directory), else relative to the config's
    directory ``base_dir``; an error naming where it looked."""
    given = Path(path).expanduser()
    candidates = [given] + (
        [Path(base_dir) / given] if base_dir is not None and not given.is_absolute() else []
    )
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    where = " nor ".join(str(c.resolve()) for c in dict.fromkeys(candidates))
    if any(c.exists() for c in candidates):
        raise PeftkitError(f"reward.models: {path} is a file; give the directory of the model or adapter")
    raise PeftkitError(f"reward.models: the model directory {path} does not exist (looked for {where})")


def model_kind(path: Path) -> tuple[str, Any]:
    """What ``path`` holds, read from its files before anything loads: ``("reward", task)``,
    ``("classifier", task)`` (an adapter; ``task.labels``), ``("plain", labels)`` (a transformers
    classifier's labels) or ``("plain", "one")`` (a transformers classifier with one output)."""
    from peftkit.objectives.reward import RewardTask
    from peftkit.tasks import load_task
    from peftkit.tasks.classification import ClassificationTask

    if (path / "adapter_config.json").is_file():
        task = load_task(path)
        if isinstance(task, RewardTask):
            return "reward", task
        if isinstance(task, ClassificationTask):
            if not task.labels:
                raise PeftkitError(
                    f"reward.models: {path} is a SEQ_CLS adapter without label names (no labels in its "
                    "peftkit_task.json): train it with `peftkit train`, or write peftkit_task.json as "
                    '{"task_type": "SEQ_CLS", "labels": [...]} with the labels in the head\'s order'
                )
            return "classifier", task
        raise PeftkitError(
            f"reward.models: {path} is an adapter for task {task.task_type.value} (objective "
            f"{getattr(task, 'objective', 'sft')}); a reward model judge needs an adapter trained with "
            "objective: reward, or a SEQ_CLS classifier (with label:). To have a language model grade "
            "answers, use reward.judge instead"
        )
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        architectures = config.get("architectures") or []
        if not any(str(a).endswith("ForSequenceClassification") for a in architectures):
            raise PeftkitError(
                f"reward.models: {path} is not a sequence-classification model (its architectures: "
                f"{', '.join(map(str, architectures)) or 'none recorded'}); give an adapter trained with "
                "objective: reward or task: SEQ_CLS, or a *ForSequenceClassification model. To have a "
                "language model grade answers, use reward.judge instead"
            )
        id2label = config.get("id2label") or {}
        count = len(id2label) or int(config.get("num_labels", 2))
        if count == 1:
            return "plain", _ONE_OUTPUT
        return "plain", [str(id2label.get(str(i), f"LABEL_{i}")) for i in range(count)]
    nested = path / "adapter" / "adapter_config.json"
    hint = f"; did you mean {path / 'adapter'}?" if nested.is_file() else ""
    raise PeftkitError(
        f"reward.models: {path} has neither adapter_config.json (an adapter) nor config.json (a model){hint}"
    )


def check_label(spec: RewardModelSpec, labels: Any, what: str) -> int | None:
    """The index of ``spec.label`` in ``labels`` (None for a one-output model), or a clear error."""
    from peftkit.configuration import closest

    if labels == _ONE_OUTPUT or labels is None:
        if spec.label is not None:
            raise PeftkitError(
                f"reward.models: {spec.path} is {what} with one output (its score is the reward) and has no "
                f"labels; remove label: {spec.label!r}"
            )
        return None
    if spec.label is None:
        raise PeftkitError(
            f"reward.models: {spec.path} is a classifier with labels {', '.join(labels)}: say whose probability "
            f"is the reward, e.g. {{path: {spec.path}, label: {labels[-1]}}}"
        )
    if spec.label not in labels:
        near = closest(spec.label, labels)[:1]
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise PeftkitError(
            f"reward.models: label {spec.label!r} is not one of the labels of {spec.path}; {hint}"
            f"its labels: {', '.join(labels)}"
        )
    return labels.index(spec.label)


def load_model_judge(
    spec: RewardModelSpec | str | dict,
    *,
    base_dir: str | Path | None = None,
    device: str = "auto",
    precision: str = "fp32",
    threads: int | None = None,
    batch_size: int = 16,
) -> Judge:
    """The judge for one ``reward.models`` entry; labels are checked before the model loads."""
    from peftkit.loading import load_model_from_args

    if isinstance(spec, str):
        spec = RewardModelSpec(path=spec)
    elif isinstance(spec, dict):
        from peftkit.configuration import from_dict

        spec = from_dict(RewardModelSpec, spec)
    if not spec.path.strip():
        raise PeftkitError("reward.models[].path is empty: give the model's directory")
    path = resolve_dir(spec.path, base_dir)
    kind, found = model_kind(path)
    if kind == "reward":
        check_label(spec, None, "a reward model (trained with objective: reward)")
        from peftkit.scoring import load_reward_model

        scorer = load_reward_model(path, device=device, precision=precision, threads=threads)
        return RewardModelJudge(scorer, spec.name or default_name(path), batch_size)
    labels = found.labels if kind == "classifier" else found
    index = check_label(spec, labels, "a reward model")
    name = spec.name or (default_name(path) + (f":{spec.label}" if index is not None else ""))
    if kind == "classifier":
        args = load_args(
            base_model=None, adapter=str(path), device=device, precision=precision, threads=threads
        )
        model, tokenizer = load_model_from_args(args, task="seq_cls", **found.model_kwargs())
    else:
        args = load_args(
            base_model=str(path), adapter=None, device=device, precision=precision, threads=threads
        )
        model, tokenizer = load_model_from_args(args, task="seq_cls")
    return ClassifierJudge(
        model, tokenizer, name, index, batch_size=batch_size, autocast_dtype=args.autocast_dtype
    )
