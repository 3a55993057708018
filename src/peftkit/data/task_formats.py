"""Row formats of the non-LM task types: a row's fields, checked, for the task's encoder.

::

    text_label     {text, label, [text_pair]}                 SEQ_CLS
    tokens_tags    {tokens: [w1, w2, ...], tags: [t1, t2, ...]}  TOKEN_CLS (same lengths)
    qa             {question, context, answers: {text: [...], answer_start: [...]}}
                   or {question, context, answer, answer_start}   QUESTION_ANS (SQuAD style)
    source_target  {source, target}                            SEQ_2_SEQ_LM

``columns`` renames fields as for the LM formats. A malformed row raises :class:`RowError`,
which the loader turns into a ``file:line`` error (or skips, with ``skip_bad_rows``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from peftkit.data.config import DataConfig
from peftkit.data.formats import EmptyRowError, RowError, _missing, _optional_text, _text
from peftkit.data.preference import pair_fields, prompt_fields, unpaired_fields


def _label(row: dict[str, Any], name: str, cfg: DataConfig) -> str:
    """A class label: a string, or an integer / boolean written as text ("1", "True")."""
    column = cfg.columns.get(name, name)
    value = row.get(column)
    if isinstance(value, bool | int) or (isinstance(value, float) and value.is_integer()):
        return str(int(value)) if not isinstance(value, bool) else str(value)
    return _text(row, name, cfg).strip()


def text_label(row: dict[str, Any], cfg: DataConfig) -> dict[str, Any]:
    label = _label(row, "label", cfg)
    if not label:
        raise RowError("field 'label' is empty")
    return {
        "text": _text(row, "text", cfg),
        "text_pair": _optional_text(row, "text_pair", cfg),
        "label": label,
    }


def _string_list(row: dict[str, Any], name: str, cfg: DataConfig) -> list[str]:
    column = cfg.columns.get(name, name)
    value = row.get(column)
    if value is None:
        _missing(row, name, column)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RowError(f"field '{name}' must be a list of strings, got {value!r:.60}")
    return value


def tokens_tags(row: dict[str, Any], cfg: DataConfig) -> dict[str, Any]:
    tokens, tags = _string_list(row, "tokens", cfg), _string_list(row, "tags", cfg)
    if len(tokens) != len(tags):
        raise RowError(f"'tokens' has {len(tokens)} words but 'tags' has {len(tags)}; give one tag per word")
    if not tokens:
        raise RowError("'tokens' is empty")
    return {"tokens": tokens, "tags": tags}


def qa(row: dict[str, Any], cfg: DataConfig) -> dict[str, Any]:
    """SQuAD rows; every answer must be found at its ``answer_start`` in the context.

    ``answers`` may be empty (an unanswerable question, SQuAD 2.0): the target is then the
    first token, as in transformers' question-answering examples.
    """
    question, context = _text(row, "question", cfg), _text(row, "context", cfg)
    column = cfg.columns.get("answers", "answers")
    if row.get(column) is not None:
        answers = row[column]
        if not isinstance(answers, dict) or not {"text", "answer_start"} <= set(answers):
            raise RowError(f"'answers' must be {{text: [...], answer_start: [...]}}, got {answers!r:.80}")
        texts, starts = answers["text"], answers["answer_start"]
        if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
            raise RowError("'answers.text' and 'answers.answer_start' must be lists of the same length")
    else:
        text = _text(row, "answer", cfg)
        start_column = cfg.columns.get("answer_start", "answer_start")
        if row.get(start_column) is None:
            raise RowError("missing field 'answer_start' (the answer's character offset in the context)")
        texts, starts = [text], [row[start_column]]
    for text, start in zip(texts, starts):
        if not isinstance(text, str) or isinstance(start, bool) or not isinstance(start, int):
            raise RowError(
                f"an answer needs a string text and an integer start, got {text!r:.40} at {start!r}"
            )
        if context[start : start + len(text)] != text:
            found = context[start : start + len(text)]
            raise RowError(
                f"answer {text!r:.40} is not at answer_start {start} of the context (found {found!r:.40}); "
                "answer_start counts characters from 0"
            )
    return {"question": question, "context": context, "answers": {"text": texts, "answer_start": starts}}


def source_target(row: dict[str, Any], cfg: DataConfig) -> dict[str, Any]:
    target = _text(row, "target", cfg)
    if not target.strip():
        raise EmptyRowError("field 'target' is empty: the row has nothing to train on")
    return {"source": _text(row, "source", cfg), "target": target}


TASK_FORMATS: dict[str, Callable[[dict[str, Any], DataConfig], dict[str, Any]]] = {
    "text_label": text_label,
    "tokens_tags": tokens_tags,
    "qa": qa,
    "source_target": source_target,
    "preference": pair_fields,
    "kto": unpaired_fields,
    "prompt": prompt_fields,
}
"""Format name -> row reader; the task packages encode what these return."""
