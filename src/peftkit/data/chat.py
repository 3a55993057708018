"""Render a conversation with a chat template and find the characters a model should learn.

Chat templates are Jinja programs, so we cannot know where an assistant turn starts by reading
the template. Instead we render prefixes of the conversation and compare::

    before_i = render(messages[:i], add_generation_prompt=True)   # "...<|im_start|>assistant\\n"
    upto_i   = render(messages[:i + 1])                           # "...<|im_start|>assistant\\nHi<|im_end|>\\n"
    full     = render(messages)

If both are prefixes of ``full`` (the template is *prefix-consistent*), assistant turn ``i`` is
``full[len(before_i):len(upto_i)]``; we label from its content to the end of its end-of-turn
token (trailing whitespace such as the newline after ``<|im_end|>`` is formatting, not an
answer). Templates that rewrite earlier turns (e.g. drop past reasoning) are not prefix-consistent
and are reported rather than silently mislabelled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftkit.data.formats import RowError


@dataclass
class Rendered:
    """A conversation as text: which character ranges carry labels, and where the prompt ends.

    ``prompt_end`` is the end of the generation prompt of the last assistant turn: the text
    before it is what a model is given to produce the answer.
    """

    text: str
    spans: list[tuple[int, int]]
    prompt_end: int


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    if not messages and not generation_prompt:
        return ""
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as err:  # jinja2 raises TemplateError and friends, templates raise their own
        raise RowError(
            f"the tokenizer's chat template failed on this conversation: {type(err).__name__}: {err}"
        ) from None
    if not isinstance(text, str):
        raise RowError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected text")
    return text


def _check_prefix(prefix: str, full: str, what: str) -> None:
    if full.startswith(prefix):
        return
    at = next((i for i, (a, b) in enumerate(zip(prefix, full)) if a != b), min(len(prefix), len(full)))
    raise RowError(
        f"the chat template is not prefix-consistent: rendering {what} gives text that is not the start "
        f"of rendering the whole conversation (they differ at character {at}: {prefix[at : at + 40]!r} vs "
        f"{full[at : at + 40]!r}), so assistant tokens cannot be located. Use a template that renders "
        f"earlier turns the same way whatever follows, or set data.train_on: all"
    )


def render_chat(tokenizer: Any, messages: list[dict[str, str]], train_on: str) -> Rendered:
    """Render ``messages`` and locate the assistant spans (all text when ``train_on == 'all'``)."""
    full = _render(tokenizer, messages, generation_prompt=False)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    spans: list[tuple[int, int]] = []
    prompt_end = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or (train_on == "all" and i != last):
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        _check_prefix(before, full, f"the first {i} message(s) with the generation prompt")
        _check_prefix(upto, full, f"the first {i + 1} message(s)")
        _check_prefix(before, upto, f"the first {i} message(s) with the generation prompt")
        turn = upto[len(before) :]
        start, end = _answer_span(turn, message["content"])
        spans.append((len(before) + start, len(before) + end))
        prompt_end = len(before)
    if train_on == "all":
        spans = [(0, len(full))]
    return Rendered(full, spans, prompt_end)


def _answer_span(turn: str, content: str) -> tuple[int, int]:
    """Characters of ``turn`` (one rendered assistant turn) to label: content + end-of-turn marker."""
    end = len(turn.rstrip())
    for candidate in (content, content.strip()):
        if candidate:
            start = turn.find(candidate)
            if start >= 0:
                return start, max(end, start + len(candidate))
    return 0, end  # content rewritten by the template (or empty): label the whole turn
