"""One sequence being generated: its sampling settings, its tokens, and the text it has sent.

A request with ``n`` choices becomes ``n`` sequences. The engine thread owns a sequence while it
decodes; the request's coroutine only reads what :meth:`Sequence.push` hands it through ``sink``
(called from the engine thread, so ``sink`` must be thread-safe, e.g. ``loop.call_soon_threadsafe``)
and sets ``cancelled`` when its client goes away.

Text is streamed so that a client never sees something that is later taken back: a piece that ends
inside a multi-byte character (the tokenizer decodes it as U+FFFD) waits for the next token, and
so does a tail that could be the start of a ``stop`` string. A stop string ends the sequence with
the text before it, as OpenAI's API does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

REPLACEMENT = "\ufffd"  # what a tokenizer decodes from the first bytes of an unfinished character


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is decoded. ``temperature == 0`` is greedy (``top_p`` and ``seed`` unused)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Event:
    """What the engine tells a request about one of its sequences.

    ``kind``: ``"text"`` (``text`` holds the new piece), ``"done"`` (``finish_reason`` is
    ``"stop"`` or ``"length"``; ``text`` holds any last piece) or ``"error"`` (``text`` says why).
    """

    index: int
    kind: str
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass(eq=False)
class Sequence:
    """A sequence from the moment it is queued until it finishes or its client leaves."""

    prompt_ids: list[int]
    adapter: str  # an adapter name, or peftkit.adapter_sets.BASE
    params: SamplingParams
    sink: Callable[[Event], Any]
    index: int = 0  # the choice number within its request
    cancelled: threading.Event = field(default_factory=threading.Event)
    output_ids: list[int] = field(default_factory=list)
    sent: str = ""  # the text already handed to the client
    finish_reason: str | None = None
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.params.temperature > 0:
            self.generator = torch.Generator()
            if self.params.seed is not None:
                self.generator.manual_seed(self.params.seed + self.index)  # n choices differ
            else:
                self.generator.seed()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int, tokenizer: Any, eos_ids: set[int]) -> None:
        """Take one generated token: send the text that is now certain; finish on eos, a stop
        string or ``max_tokens``."""
        self.output_ids.append(token)
        text = tokenizer.decode(self.output_ids, skip_special_tokens=True)
        if token in eos_ids:
            self._finish("stop", text)
            return
        for stop in self.params.stop:
            at = text.find(stop, max(0, len(self.sent) - len(stop)))
            if at >= 0:
                self._finish("stop", text[:at])
                return
        if len(self.output_ids) >= self.params.max_tokens:
            self._finish("length", text)
            return
        certain = _without_pending_tail(text, self.params.stop)
        if len(certain) > len(self.sent) and certain.startswith(self.sent):
            self.sink(Event(self.index, "text", certain[len(self.sent) :]))
            self.sent = certain

    def fail(self, message: str) -> None:
        self.finish_reason = "error"
        self.sink(Event(self.index, "error", message))

    def _finish(self, reason: str, text: str) -> None:
        last = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.finish_reason = reason
        self.sent += last
        self.sink(Event(self.index, "done", last, reason, len(self.output_ids)))


def _without_pending_tail(text: str, stops: tuple[str, ...]) -> str:
    """``text`` minus what may still change: an unfinished character, or an ending that is the
    beginning of a stop string."""
    cut = len(text)
    while cut and text[cut - 1] == REPLACEMENT:
        cut -= 1
    for stop in stops:
        for size in range(min(len(stop) - 1, cut), 0, -1):
            if text[cut - size : cut] == stop[:size]:
                cut -= size
                break
    return text[:cut]
