"""Encoding: a :class:`Sample` becomes an :class:`Example` of token ids and labels.

Each sample is first rendered to one string with labelled character spans (:mod:`.chat` for chat
templates, plain concatenation otherwise), then the whole string is tokenized once and a token
carries a label when its characters overlap a labelled span. Tokenizing the whole string (not
the pieces) gives exactly the tokens the model sees at inference, including merges across the
prompt/answer boundary; ``prompt_ids`` is then a prefix of ``input_ids`` by construction.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from peftkit.data.chat import Rendered, has_chat_template, render_chat
from peftkit.data.config import DataConfig
from peftkit.data.formats import RowError, Sample

IGNORE_INDEX = -100


@dataclass
class Example:
    """One tokenized training example.

    ``labels[i]`` is the target for ``input_ids[i]`` (the model shifts them), ``IGNORE_INDEX``
    where no loss is taken. ``prompt_ids`` is what a model is given to generate ``answer``:
    everything up to and including the last assistant generation prompt (empty for text rows);
    it is not truncated, so evaluation sees the full prompt.
    """

    input_ids: list[int]
    labels: list[int]
    origin: str
    prompt_ids: list[int] = field(default_factory=list)
    answer: str | None = None
    prompt: str | None = None  # the user's message as written (Sample.prompt), for predictions

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_label_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class EncodeStats:
    truncated: int = 0
    dropped: int = 0
    dropped_origins: list[str] = field(default_factory=list)


@dataclass
class _Plan:
    """A rendered sample: the text, what to label, and whether an eos token id follows it."""

    sample: Sample
    rendered: Rendered
    append_eos: bool


def _default_bos(tokenizer: Any) -> int | None:
    """The BOS id if this tokenizer adds one by default (Llama: yes; GPT-2, Qwen: no)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids[:1] == [bos] else None


class Encoder:
    """Turns samples into examples for one tokenizer and data config; counts what it cuts."""

    def __init__(self, tokenizer: Any, cfg: DataConfig):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.use_template = cfg.use_chat_template and has_chat_template(tokenizer)
        self.bos = _default_bos(tokenizer)
        self.eos = getattr(tokenizer, "eos_token_id", None)
        self.stats = EncodeStats()

    def render(self, sample: Sample) -> _Plan:
        """Render one sample; raise :class:`RowError` if it cannot be (e.g. template failure)."""
        if sample.text is not None:
            return _Plan(sample, Rendered(sample.text, [(0, len(sample.text))], 0), append_eos=True)
        assert sample.messages is not None
        if self.use_template:
            return _Plan(sample, render_chat(self.tokenizer, sample.messages, self.cfg.train_on), False)
        return _Plan(sample, self._render_plain(sample.messages), append_eos=True)

    def _render_plain(self, messages: list[dict[str, str]]) -> Rendered:
        roles = [m["role"] for m in messages]
        if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
            why = "data.use_chat_template is false" if has_chat_template(self.tokenizer) else "it has none"
            raise RowError(
                f"a conversation with roles {roles} needs the tokenizer's chat template, but {why}; "
                "without one only [system,] user, assistant rows can be rendered"
            )
        sep = self.cfg.separator
        prompt = "".join(m["content"] + sep for m in messages[:-1])
        text = prompt + messages[-1]["content"]
        start = 0 if self.cfg.train_on == "all" else len(prompt)
        return Rendered(text, [(start, len(text))], len(prompt))

    def encode(self, samples: list[Sample], on_error: Callable[[str, str], None]) -> list[Example]:
        """Encode ``samples`` in one tokenizer batch; bad rows go to ``on_error(origin, reason)``.

        Examples left without labels after truncation are dropped and counted in ``stats``.
        """
        plans = []
        for sample in samples:
            try:
                plans.append(self.render(sample))
            except RowError as err:
                on_error(sample.origin, str(err))
        if not plans:
            return []
        texts = [plan.rendered.text for plan in plans]
        backend = (
            getattr(self.tokenizer, "backend_tokenizer", None)
            if getattr(self.tokenizer, "is_fast", False)
            else None
        )
        if backend is not None:
            # What the fast tokenizer's __call__ runs, minus its per-row Python conversion (~40% of the time).
            tokens = ((e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False))
        else:
            tokens = (self._tokenize_pieces(plan.rendered) for plan in plans)
        examples = []
        for plan, (ids, offsets) in zip(plans, tokens):
            example = self._example(plan, list(ids), offsets)
            if example is not None:
                examples.append(example)
        return examples

    def _tokenize_pieces(self, rendered: Rendered) -> tuple[list[int], list[tuple[int, int]]]:
        """Slow-tokenizer fallback: tokenize between span boundaries, each piece on its own."""
        cuts = sorted(
            {0, len(rendered.text), rendered.prompt_end, *(p for span in rendered.spans for p in span)}
        )
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for a, b in zip(cuts, cuts[1:]):
            piece = self.tokenizer.encode(rendered.text[a:b], add_special_tokens=False)
            ids.extend(piece)
            offsets.extend([(a, b)] * len(piece))
        return ids, offsets

    def _example(self, plan: _Plan, ids: list[int], offsets: list[tuple[int, int]]) -> Example | None:
        ends = [e for _, e in offsets]
        labels = _labels(ids, offsets, ends, plan.rendered.spans)
        prompt_len = bisect.bisect_right(ends, plan.rendered.prompt_end)
        if plan.append_eos and self.eos is not None:
            ids.append(self.eos)
            labels.append(self.eos)
        if self.bos is not None and ids[:1] != [self.bos]:
            ids.insert(0, self.bos)
            labels.insert(0, IGNORE_INDEX)
            prompt_len += 1
        prompt_ids = [] if plan.sample.text is not None else ids[:prompt_len]
        limit = self.cfg.max_seq_len
        if limit is not None and len(ids) > limit:
            self.stats.truncated += 1
            ids, labels = ids[:limit], labels[:limit]
        if labels.count(IGNORE_INDEX) == len(labels):
            self.stats.dropped += 1
            if len(self.stats.dropped_origins) < 5:
                self.stats.dropped_origins.append(plan.sample.origin)
            return None
        return Example(ids, labels, plan.sample.origin, prompt_ids, plan.sample.answer, plan.sample.prompt)


def _labels(
    ids: list[int], offsets: list[tuple[int, int]], ends: list[int], spans: list[tuple[int, int]]
) -> list[int]:
    """``ids`` where a token's characters overlap a labelled span, ``IGNORE_INDEX`` elsewhere.

    Token offsets increase along the text, so each span maps to a contiguous token range found
    by bisection (a per-token scan over all spans was most of the encoding time).
    """
    starts = [s for s, _ in offsets]
    labels = [IGNORE_INDEX] * len(ids)
    for a, b in spans:
        first, stop = bisect.bisect_right(ends, a), bisect.bisect_left(starts, b)
        labels[first:stop] = ids[first:stop]
    return labels
