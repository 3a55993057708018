"""The ``data:`` section of a run config: where the examples come from and how they become tokens.

Every option is explained by its ``help`` metadata; :meth:`DataConfig.validate` reports every
cross-field problem at once (e.g. a fraction that is not in (0, 1), or both a separate test file
and a ``test_size`` carved from train).
"""

from __future__ import annotations

import codecs
import dataclasses
import string
from dataclasses import dataclass, field
from typing import Any, Literal

Format = Literal[
    "auto",
    "instruction",
    "chat",
    "prompt_completion",
    "text",
    "text_label",
    "tokens_tags",
    "qa",
    "source_target",
    "preference",
    "kto",
    "prompt",
]
TrainOn = Literal["completion", "all"]
EncodingErrors = Literal["strict", "replace"]

#: The fields each format reads from a row (after ``columns`` renaming); optional ones in brackets.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "instruction": ("instruction", "[input]", "output"),
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    # Formats of the other task types (see peftkit.tasks): rows are kept as fields, not turns.
    "text_label": ("text", "label", "[text_pair]"),
    "tokens_tags": ("tokens", "tags"),
    "qa": ("question", "context", "[answers]", "[answer]", "[answer_start]"),
    "source_target": ("source", "target"),
    # Formats of the preference objectives (peftkit.data.preference): each field a string or messages.
    "preference": ("[prompt]", "chosen", "rejected"),
    "kto": ("prompt", "completion", "label"),
    # Prompts alone (online_dpo, grpo, label-pairs): the model writes the answers; every other column
    # goes to the reward functions.
    "prompt": ("prompt",),
}

Source = str | list[dict[str, Any]]


@dataclass
class DataConfig:
    """Where training data comes from and how rows become token sequences with labels."""

    train: str | list[dict[str, Any]] | None = field(
        default=None,
        metadata={
            "help": "Training data: a .jsonl/.json/.csv/.tsv/.parquet file, 'builtin:NAME' "
            "(e.g. builtin:tweet-sentiment), or (Python API) a list of dicts."
        },
    )
    validation: str | list[dict[str, Any]] | None = field(
        default=None,
        metadata={"help": "Optional separate validation data (same forms as train); excludes val_size."},
    )
    test: str | list[dict[str, Any]] | None = field(
        default=None,
        metadata={"help": "Optional separate held-out test data (same forms as train); excludes test_size."},
    )
    format: Format = field(
        default="auto",
        metadata={
            "help": "Row layout: instruction (instruction, [input], output), chat (messages: "
            "[{role, content}]), prompt_completion (prompt, completion), text (text: every "
            "token is trained on); for other tasks: text_label (text, label, [text_pair]), "
            "tokens_tags (tokens, tags), qa (question, context, answers), source_target (source, "
            "target); for the preference objectives: preference (prompt, chosen, rejected) and kto (prompt, "
            "completion, label); for online_dpo / grpo: prompt (prompt, any other columns for the judges). auto: detected from the first row's keys among the formats of the job's task."
        },
    )
    columns: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "Map the format's field names to this file's column names, e.g. "
            "{prompt: question, completion: answer}."
        },
    )
    labels: list[str] | None = field(
        default=None,
        metadata={
            "help": "Classification / tagging only: the label names in id order. null: the sorted set "
            "of labels (tags) found in the training data."
        },
    )
    prompt_template: str | None = field(
        default=None,
        metadata={
            "help": "Python str.format template building the prompt from the row's columns, e.g. "
            "'Classify the sentiment.\\nTweet: {text}'. Write literal braces as {{ }}. "
            "Implies format prompt_completion unless format is instruction."
        },
    )
    completion_template: str | None = field(
        default=None,
        metadata={"help": "Python str.format template building the completion from the row's columns."},
    )
    system_prompt: str | None = field(
        default=None,
        metadata={
            "help": "System message put before every example (chat rows that already start with "
            "a system message keep theirs)."
        },
    )
    use_chat_template: bool = field(
        default=True,
        metadata={
            "help": "Render instruction / prompt_completion rows as a user turn and an assistant "
            "turn with the tokenizer's chat template when it has one. false (or no template): "
            "prompt + separator + completion + eos."
        },
    )
    separator: str = field(
        default="\n",
        metadata={"help": "Text between system prompt, prompt and completion when no chat template is used."},
    )
    train_on: TrainOn = field(
        default="completion",
        metadata={
            "help": "completion: loss only on completion / assistant tokens (and their end token); "
            "all: loss on every token. Text rows always train on every token."
        },
    )
    max_seq_len: int | None = field(
        default=1024,
        metadata={
            "help": "Truncate examples to this many tokens (from the right); examples left without "
            "any trained token are dropped and counted. null: no truncation."
        },
    )
    doc_stride: int = field(
        default=128,
        metadata={
            "help": "Extractive QA (format qa) only: a context longer than max_seq_len is split into "
            "overlapping windows (one training feature each; evaluation keeps the best span over "
            "an example's windows), and this is how many context tokens consecutive windows share. "
            "Must be >= 0 and smaller than max_seq_len minus the question and special tokens."
        },
    )
    val_size: int | float | None = field(
        default=None,
        metadata={
            "help": "Carve a validation split from train: a fraction in (0, 1) or a row count. "
            "Taken after test_size, with split_seed."
        },
    )
    test_size: int | float | None = field(
        default=None,
        metadata={
            "help": "Carve a held-out test split from train before anything else: a fraction in "
            "(0, 1) or a row count. Fixed by split_seed, so training never sees it whatever "
            "the run seed or max_train_examples."
        },
    )
    split_seed: int | None = field(
        default=1234,
        metadata={
            "help": "Seed of the shuffle that carves test, validation and the max_train_examples "
            "subset. null: use the run's seed (the splits then change with it)."
        },
    )
    max_train_examples: int | None = field(
        default=None,
        metadata={
            "help": "Keep at most this many training examples, chosen after splitting with "
            "split_seed (a larger cap keeps every example of a smaller one)."
        },
    )
    skip_bad_rows: bool = field(
        default=False,
        metadata={
            "help": "false: the first malformed row is an error naming its file and line. "
            "true: skip malformed rows and report how many (and why)."
        },
    )
    encoding: str = field(default="utf-8", metadata={"help": "Text encoding of the data files."})
    encoding_errors: EncodingErrors = field(
        default="strict",
        metadata={
            "help": "strict: undecodable bytes are a malformed row. replace: decode them as U+FFFD "
            "(for files with a few broken bytes)."
        },
    )

    def validate(self) -> list[str]:
        problems: list[str] = []
        for name in ("val_size", "test_size"):
            problems.extend(_check_size(name, getattr(self, name)))
        if self.validation is not None and self.val_size is not None:
            problems.append(
                "set either 'validation' (a separate file) or 'val_size' (carved from train), not both"
            )
        if self.test is not None and self.test_size is not None:
            problems.append(
                "set either 'test' (a separate file) or 'test_size' (carved from train), not both"
            )
        # from_dict reports wrong types itself and still calls validate(): only check numbers here.
        if isinstance(self.max_seq_len, int) and self.max_seq_len < 2:
            problems.append(f"'max_seq_len' must be at least 2 tokens (or null), got {self.max_seq_len}")
        problems.extend(self._check_doc_stride())
        if isinstance(self.max_train_examples, int) and self.max_train_examples < 1:
            problems.append(
                f"'max_train_examples' must be at least 1 (or null), got {self.max_train_examples}"
            )
        if isinstance(self.labels, list) and len(set(self.labels)) != len(self.labels):
            problems.append(f"'labels' lists a label twice: {self.labels}")
        if isinstance(self.labels, list) and not self.labels:
            problems.append(
                "'labels' is an empty list: give the label names, or null to read them from the data"
            )
        problems.extend(self._check_columns())
        problems.extend(self._check_templates())
        try:
            codecs.lookup(self.encoding)
        except (LookupError, TypeError):
            problems.append(
                f"'encoding' {self.encoding!r} is not a known text encoding (e.g. utf-8, latin-1)"
            )
        for name in ("train", "validation", "test"):
            value = getattr(self, name)
            if isinstance(value, str) and not value.strip():
                problems.append(f"'{name}' is an empty path")
            if isinstance(value, list) and not value:
                problems.append(f"'{name}' is an empty list of rows")
        return problems

    def _check_doc_stride(self) -> list[str]:
        """Negative is always wrong; >= max_seq_len only matters for QA rows (the QA encoder checks
        it again for ``format: auto`` and, per row, against the question's length)."""
        if not isinstance(self.doc_stride, int) or isinstance(self.doc_stride, bool):
            return []
        if self.doc_stride < 0:
            return [
                f"'doc_stride' must be >= 0 (tokens shared by consecutive QA windows), got {self.doc_stride}"
            ]
        if self.format == "qa" and isinstance(self.max_seq_len, int) and self.doc_stride >= self.max_seq_len:
            return [
                f"'doc_stride' ({self.doc_stride}) must be smaller than 'max_seq_len' ({self.max_seq_len}) "
                f"minus the question: lower data.doc_stride (e.g. to {self.max_seq_len // 4}) or raise "
                "data.max_seq_len"
            ]
        return []

    def _check_columns(self) -> list[str]:
        if not isinstance(self.columns, dict):
            return []
        known = {name.strip("[]") for fields in FORMAT_FIELDS.values() for name in fields}
        if self.format in FORMAT_FIELDS:
            known = {name.strip("[]") for name in FORMAT_FIELDS[self.format]}
        return [
            f"'columns.{key}' is not a field of format {self.format}; fields: {', '.join(sorted(known))}"
            for key in self.columns
            if key not in known
        ]

    def _check_templates(self) -> list[str]:
        problems = []
        for name in ("prompt_template", "completion_template"):
            template = getattr(self, name)
            if not isinstance(template, str):
                continue
            if self.format not in ("auto", "instruction", "prompt_completion"):
                problems.append(
                    f"'{name}' applies to instruction and prompt_completion rows, not {self.format}"
                )
            try:
                fields = template_fields(template)
            except ValueError as err:
                problems.append(
                    f"'{name}' is not a valid str.format template ({err}); write literal braces as {{{{ }}}}"
                )
                continue
            if not fields:
                problems.append(f"'{name}' names no column; use {{column}} placeholders, e.g. {{text}}")
            if "" in fields or any(f.isdigit() for f in fields):
                problems.append(f"'{name}' must use named placeholders like {{text}}, not {{}} or {{0}}")
        return problems


def template_fields(template: str) -> list[str]:
    """The column names a ``str.format`` template reads (``{a.b}`` and ``{a[0]}`` read ``a``)."""
    names = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None:
            base = name.split(".", 1)[0].split("[", 1)[0]
            if base not in names:
                names.append(base)
    return names


def _check_size(name: str, value: int | float | None) -> list[str]:
    if value is None or not isinstance(value, (int, float)):
        return []  # a wrong type is reported by from_dict
    if isinstance(value, bool):
        return [f"'{name}' must be a fraction in (0, 1) or a row count, got {value!r}"]
    if isinstance(value, float) and not 0.0 < value < 1.0:
        return [f"'{name}' as a fraction must be in (0, 1), got {value}; write a row count as an integer"]
    if isinstance(value, int) and value < 1:
        split = "validation" if name == "val_size" else "test"
        return [f"'{name}' as a row count must be at least 1, got {value}; use null for no {split} split"]
    return []


def explicit_fields(cfg: DataConfig) -> set[str]:
    """Fields whose value differs from the default (used to let builtins fill in the rest)."""
    out = set()
    for f in dataclasses.fields(cfg):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if getattr(cfg, f.name) != default:
            out.add(f.name)
    return out
