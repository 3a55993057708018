"""From a :class:`DataConfig` to train / validation / test examples, with a report of what happened.

Order of operations (why it matters)::

    read + convert every row of train  (bad rows: error, or skipped and counted)
    shuffle row indices with split_seed
      [0, n_test)              -> test        carved first: fixed whatever the run seed,
      [n_test, n_test + n_val) -> validation  val_size or max_train_examples
      rest                     -> train       in shuffled order; max_train_examples keeps a prefix,
                                              so a larger cap contains every example of a smaller one
    encode only the rows a requested split needs (tokenizing 38k rows to keep 1k would waste time)
"""

from __future__ import annotations

import random
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from peftkit.configuration import ConfigError
from peftkit.data.builtin import apply_builtin_defaults, builtin_records, is_builtin
from peftkit.data.chat import has_chat_template
from peftkit.data.config import DataConfig
from peftkit.data.encode import Encoder, Example
from peftkit.data.formats import (
    LM_FORMATS,
    EmptyRowError,
    RowError,
    Sample,
    check_templates,
    detect_format,
    read_columns,
    to_sample,
)
from peftkit.data.preference import ANNOTATION_COLUMNS
from peftkit.data.readers import Record, check_data_file, read_file, read_rows
from peftkit.errors import DataError

SPLITS = ("train", "validation", "test")
_MAX_REASONS = 5


@dataclass
class DataReport:
    """What reading and encoding did: counts a user should see before training starts."""

    sources: dict[str, str] = field(default_factory=dict)
    rows_read: int = 0
    skipped: int = 0
    empty: int = 0  # of the skipped rows, those with nothing to train on (e.g. an empty completion)
    skip_reasons: list[str] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0
    dropped_origins: list[str] = field(default_factory=list)
    max_seq_len: int | None = None
    sizes: dict[str, int] = field(default_factory=dict)  # rows (examples) per split
    windows: dict[str, int] = field(default_factory=dict)  # sequences per split, where rows were split
    answers: dict[str, dict[str, int]] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"data: {self.rows_read:,} rows read"]
        lines += [f"  {split}: {source}" for split, source in self.sources.items()]
        lines.append("  examples: " + ", ".join(f"{split} {n:,}" for split, n in self.sizes.items()))
        if self.windows:
            lines.append(
                "  windows (long contexts split into overlapping windows, see data.doc_stride): "
                + ", ".join(f"{split} {n:,}" for split, n in self.windows.items())
            )
        for split, counts in self.answers.items():
            total = sum(counts.values())
            shares = ", ".join(
                f"{a!r} {n / total:.0%}" for a, n in sorted(counts.items(), key=lambda kv: -kv[1])
            )
            lines.append(f"  {split} answers: {shares}")
        if self.truncated:
            lines.append(f"  truncated to max_seq_len={self.max_seq_len}: {self.truncated:,}")
        if self.dropped:
            first = ", ".join(self.dropped_origins)
            lines.append(
                f"  dropped (no trained token left after truncation): {self.dropped:,} (e.g. {first})"
            )
        if self.skipped:
            empty = f" ({self.empty:,} with nothing to train on)" if self.empty else ""
            lines.append(f"  skipped malformed rows: {self.skipped:,}{empty}")
            lines += [f"    {reason}" for reason in self.skip_reasons]
        return "\n".join(lines)


@dataclass
class DataSplits:
    """Encoded examples per split; ``validation`` / ``test`` are empty when not configured."""

    train: list[Example]
    validation: list[Example]
    test: list[Example]
    report: DataReport

    def summary(self) -> str:
        return self.report.summary()


class _Loader:
    """Reads sources for one build, sending bad rows to an error or to the report.

    ``task`` (a :class:`peftkit.tasks.Task`; None: causal LM) says which formats rows may have
    and encodes them; without a tokenizer the loader only reads rows (e.g. to find the labels).
    """

    def __init__(self, cfg: DataConfig, tokenizer: Any, report: DataReport, task: Any = None):
        self.cfg = cfg
        self.report = report
        self.formats = task.formats if task is not None else LM_FORMATS
        self.encoder: Any = None
        if tokenizer is not None:
            self.encoder = task.encoder(tokenizer, cfg) if task is not None else Encoder(tokenizer, cfg)
        use_template = getattr(self.encoder, "use_template", False)
        self.rendering = "chat template" if use_template else "plain text"

    def bad_row(self, origin: str, reason: str) -> None:
        if not self.cfg.skip_bad_rows:
            raise DataError(f"{origin}: {reason} (or set data.skip_bad_rows: true to skip malformed rows)")
        self.report.skipped += 1
        if len(self.report.skip_reasons) < _MAX_REASONS:
            self.report.skip_reasons.append(f"{origin}: {reason}")

    def samples(self, source: str | list[dict[str, Any]], split: str) -> list[Sample]:
        """Every good row of ``source`` as a sample; an empty result is an error."""
        records, label = self._records(source, split)
        fmt = None
        samples: list[Sample] = []
        skipped_before = self.report.skipped
        empty: list[tuple[str, str]] = []  # (origin, reason) of rows with nothing to train on
        columns: set[str] = set()  # every column of the source, to name the ones the format ignores
        for record in records:
            self.report.rows_read += 1
            if record.problem is not None:
                self.bad_row(record.origin, record.problem)
                continue
            if fmt is None:
                fmt = detect_format(self.cfg, record, self.formats)
                check_templates(self.cfg, record)
            columns.update(record.data)
            try:
                samples.append(to_sample(record, fmt, self.cfg))
            except EmptyRowError as err:
                if self.cfg.skip_bad_rows:
                    self.report.empty += 1
                    self.bad_row(record.origin, str(err))
                else:  # counted to the end of the file, then refused together
                    empty.append((record.origin, str(err)))
            except RowError as err:
                self.bad_row(record.origin, str(err))
        if empty:
            raise DataError(_empty_rows_message(empty, label))
        # A built-in's defaults choose its columns; prompt rows hand every column to the judges.
        if fmt not in (None, "prompt") and not is_builtin(source):
            unread = columns - read_columns(fmt, self.cfg)
            if fmt == "preference":
                unread -= set(ANNOTATION_COLUMNS)
            _warn_unread_columns(unread, fmt, label)
        if not samples:
            skipped = self.report.skipped - skipped_before
            why = f"all {skipped} rows were malformed and skipped" if skipped else "it has no rows"
            raise DataError(f"no {split} data in {label}: {why}")
        rendering = f", {self.rendering}" if fmt in ("instruction", "chat", "prompt_completion") else ""
        self.report.sources[split] = f"{label} ({fmt}{rendering})"
        return samples

    def _records(self, source: str | list[dict[str, Any]], split: str) -> tuple[Iterator[Record], str]:
        if isinstance(source, list):
            return read_rows(source, f"data.{split}"), f"data.{split} (a list of {len(source)} rows)"
        if is_builtin(source):
            return builtin_records(source, self.cfg.encoding, self.cfg.encoding_errors)
        return read_file(source, self.cfg.encoding, self.cfg.encoding_errors), str(source)

    def encode(self, samples: list[Sample], split: str, limit: int | None = None) -> list[Example]:
        """Encode in order until ``limit`` rows are kept (all when None); empty is an error.

        ``limit`` counts rows: a row split into windows (QA) is kept or cut with all its windows.
        """
        examples: list[Example] = []
        position, dropped_before = 0, self.encoder.stats.dropped
        while position < len(samples) and (limit is None or count_rows(examples) < limit):
            chunk = len(samples) if limit is None else max(64, limit - count_rows(examples) + 16)
            examples += self.encoder.encode(samples[position : position + chunk], self.bad_row)
            position += chunk
        if limit is not None:
            starts = [i for i, e in enumerate(examples) if getattr(e, "window", 0) == 0]
            examples = examples[: starts[limit]] if len(starts) > limit else examples
        if not examples:
            dropped = self.encoder.stats.dropped - dropped_before
            if not dropped:
                raise DataError(f"no {split} examples left: every row was malformed and skipped")
            raise DataError(
                f"no {split} examples left: {len(samples)} rows, {dropped} dropped because truncation to "
                f"max_seq_len={self.cfg.max_seq_len} left no trained token (e.g. "
                f"{', '.join(self.encoder.stats.dropped_origins[:2])}); raise data.max_seq_len or shorten the prompts"
            )
        return examples


def _empty_rows_message(empty: list[tuple[str, str]], label: str) -> str:
    """The first row with nothing to train on, and how many more of the source are like it."""
    first, reason = empty[0]
    if len(empty) == 1:
        return f"{first}: {reason}; fill in or remove the row, or set data.skip_bad_rows: true to skip it"
    origins = ", ".join(origin for origin, _ in empty[:_MAX_REASONS]) + (
        ", ..." if len(empty) > _MAX_REASONS else ""
    )
    return (
        f"{first}: {reason}; {len(empty)} rows of {label} have nothing to train on ({origins}): fill "
        "them in or remove them, or set data.skip_bad_rows: true to skip them"
    )


def _warn_unread_columns(unread: set[str], fmt: str, label: str) -> None:
    """Once per source: columns no field of ``fmt`` reads are dropped, which may not be meant."""
    if not unread:
        return
    names = ", ".join(repr(str(c)) for c in sorted(unread, key=str))
    hint = "map a column to a field with data.columns" + (
        ", or use it in data.prompt_template" if fmt in ("instruction", "prompt_completion") else ""
    )
    if "label" in unread and fmt in LM_FORMATS:
        hint = "to train a classifier on 'label', set task: SEQ_CLS; otherwise " + hint
    what = f"column {names} is" if len(unread) == 1 else f"columns {names} are"
    warnings.warn(f"{label}: {what} not read by format {fmt}, so ignored ({hint})", stacklevel=4)


def count_rows(examples: list[Any]) -> int:
    """How many rows ``examples`` come from: a row split into windows (``window`` 0, 1, ...) counts once."""
    return sum(getattr(e, "window", 0) == 0 for e in examples)


def _count(size: int | float | None, total: int) -> int:
    if size is None:
        return 0
    if isinstance(size, float):
        return max(1, round(size * total))
    return size


def _task_type(task: Any) -> str | None:
    return None if task is None else str(getattr(task.task_type, "value", task.task_type))


def read_train_samples(cfg: DataConfig, task: Any = None) -> list[Sample]:
    """Every good row of ``cfg.train`` (before splitting), untokenized: e.g. to collect the label set."""
    cfg = apply_builtin_defaults(cfg, _task_type(task))
    _require_split(cfg, "train")
    return _Loader(cfg, None, DataReport(), task).samples(cfg.train, "train")


def build_datasets(
    cfg: DataConfig,
    tokenizer: Any,
    seed: int | None = None,
    *,
    splits: tuple[str, ...] = SPLITS,
    task: Any = None,
) -> DataSplits:
    """Read, split and encode the data of ``cfg``; ``splits`` limits which splits are encoded.

    ``seed`` (the run's seed) is used for splitting only when ``cfg.split_seed`` is null.
    ``task`` (a :class:`peftkit.tasks.Task`) encodes the rows; None means causal LM.
    Raises :class:`DataError` for unreadable data and :class:`ConfigError` for an invalid config.
    """
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; choose from {SPLITS}")
    cfg = apply_builtin_defaults(cfg, _task_type(task))
    problems = cfg.validate()
    if problems:
        raise ConfigError(problems, "data")
    report = DataReport(max_seq_len=cfg.max_seq_len)
    loader = _Loader(cfg, tokenizer, report, task)
    if cfg.format == "chat" and not has_chat_template(tokenizer):
        raise DataError(
            "data.format is chat but the tokenizer has no chat template; set tokenizer.chat_template"
        )
    out: dict[str, list[Example]] = {name: [] for name in SPLITS}
    carved = {"test": cfg.test_size, "validation": cfg.val_size}
    needs_train = "train" in splits or any(carved[s] is not None for s in splits if s in carved)
    if needs_train:
        _require_split(cfg, "train")
        rows = loader.samples(cfg.train, "train")
        order = list(range(len(rows)))
        random.Random(cfg.split_seed if cfg.split_seed is not None else (seed or 0)).shuffle(order)
        n_test, n_val = _count(cfg.test_size, len(rows)), _count(cfg.val_size, len(rows))
        if n_test + n_val >= len(rows):
            raise DataError(
                f"test_size ({n_test} rows) and val_size ({n_val} rows) leave no training rows "
                f"out of {len(rows)}; make them smaller"
            )
        parts = {
            "test": sorted(order[:n_test]),
            "validation": sorted(order[n_test : n_test + n_val]),
            "train": order[n_test + n_val :],
        }
        for split in splits:
            if split == "train" or carved.get(split) is not None:
                limit = cfg.max_train_examples if split == "train" else None
                out[split] = loader.encode([rows[i] for i in parts[split]], split, limit)
    for split, source in (("validation", cfg.validation), ("test", cfg.test)):
        if split in splits and source is not None:
            out[split] = loader.encode(loader.samples(source, split), split)
    report.truncated = loader.encoder.stats.truncated
    report.dropped = loader.encoder.stats.dropped
    report.dropped_origins = loader.encoder.stats.dropped_origins
    for split in SPLITS:
        if split in splits:
            report.sizes[split] = count_rows(out[split])
            if report.sizes[split] != len(out[split]):
                report.windows[split] = len(out[split])
            firsts = [e for e in out[split] if getattr(e, "window", 0) == 0]
            counts = Counter(e.answer for e in firsts if getattr(e, "answer", None) is not None)
            if 0 < len(counts) <= 20:
                report.answers[split] = dict(counts)
    return DataSplits(out["train"], out["validation"], out["test"], report)


def _require_split(cfg: DataConfig, split: str) -> None:
    """Raise if ``cfg`` (built-in defaults applied) gives no rows for ``split``."""
    if split == "train" and cfg.train is None:
        raise DataError("no training data: set data.train to a file or builtin:NAME")
    if split == "test" and cfg.test is None and cfg.test_size is None:
        raise DataError(
            "no test split configured: set data.test (a file) or data.test_size (carved from train)"
        )
    if split == "validation" and cfg.validation is None and cfg.val_size is None:
        raise DataError("no validation split configured: set data.validation or data.val_size")


def check_sources(cfg: DataConfig, required: tuple[str, ...] = ("train",), *, task: Any = None) -> None:
    """Fail fast, before a model loads: the ``required`` splits are configured, built-in names
    are known, and every data file named exists and has a type peftkit reads."""
    cfg = apply_builtin_defaults(cfg, _task_type(task))  # an unknown builtin:NAME raises here
    for split in required:
        _require_split(cfg, split)
    for source in (cfg.train, cfg.validation, cfg.test):
        if isinstance(source, str) and not is_builtin(source):
            check_data_file(source)


def load_split(
    cfg: DataConfig, tokenizer: Any, split: str = "test", seed: int | None = None, *, task: Any = None
) -> list[Example]:
    """One split only (e.g. the test set for evaluation), carved exactly as training carved it."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    _require_split(apply_builtin_defaults(cfg, _task_type(task)), split)
    return getattr(build_datasets(cfg, tokenizer, seed, splits=(split,), task=task), split)
