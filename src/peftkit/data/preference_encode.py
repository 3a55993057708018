"""Tokenizing preference rows: prompt tokens and completion tokens, with a checked boundary.

For a pair we render and tokenize three texts (chat template, or plain text without one)::

    prompt          render(prompt, add_generation_prompt=True)   "...<|im_start|>assistant\\n"
    prompt+chosen   render(prompt + chosen)                       "...<|im_start|>assistant\\n4<|im_end|>\\n"
    prompt+rejected render(prompt + rejected)

The prompt's tokens must be a prefix of both others' tokens (checked; a template that renders
the prompt differently when an answer follows is a row error, never silently mislabelled). The
completion is the rest, with its end-of-turn / EOS token (in the loss, whatever the pad token)
and without trailing whitespace after it (formatting, as in SFT's labels). Without a chat
template: ``prompt + separator + completion`` with the tokenizer's eos id appended, as
:mod:`.encode` does for plain text. In both cases a leading BOS is added where the tokenizer
adds one by default.

Truncation (``max_seq_len``, ``max_prompt_len``), chosen and rejected always on the SAME prompt::

    1. max_prompt_len: a prompt longer than this keeps only its last max_prompt_len tokens.
    2. If prompt + longest completion > max_seq_len, the prompt is cut from the left only as far
       as needed, but keeps at least max_prompt_len tokens (unset: half of max_seq_len).
    3. Completions longer than what is left (max_seq_len - prompt) are cut from the right.
    A leading BOS stays when the prompt is cut. Since the prompt never takes the whole window
    every completion keeps >= 1 token; a pair whose chosen and rejected become identical
    after cutting is a row error (it would only add a constant to the loss).

Compared with TRL's DPO (trl 1.16, ``DPOConfig.max_length`` / ``truncation_mode``): there one
``max_length`` cuts prompt+completion per sequence, from the right (``keep_start``, rows whose
prompt alone fills it are dropped) or from the left (``keep_end``, deprecated, which may cut
chosen's and rejected's prompts differently); older TRL releases also had ``max_prompt_length``
(the last tokens of the prompt, as our step 1) and ``max_completion_length`` (from the right).
We never drop a row silently, keep the prompt's end (the question nearest the answer) and
share one prompt cut between chosen and rejected. TRL also warns and trains on a shortened
prompt where the boundary does not match; we refuse the row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peftkit.data.chat import _render, has_chat_template  # _render: private, reused for its errors
from peftkit.data.config import DataConfig
from peftkit.data.encode import _default_bos  # private: the BOS rule of SFT encoding
from peftkit.data.formats import RowError
from peftkit.data.preference import Messages, PreferencePair, UnpairedCompletion
from peftkit.errors import DataError


@dataclass
class PreferenceExample:
    """A tokenized pair. A row of the model's input is ``prompt_ids + chosen_ids`` (or
    ``+ rejected_ids``); the completion ids are the labelled tokens."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    origin: str
    truncated: bool = False
    ref: tuple[float, float] | None = None  # reference log-probs (chosen, rejected) when precomputed

    def __len__(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class KTOExample:
    """A tokenized unpaired row: ``prompt_ids + completion_ids``, and whether it is desirable."""

    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    origin: str
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def encode_pair(
    tokenizer: Any,
    prompt_messages: Messages,
    chosen_messages: Messages,
    rejected_messages: Messages,
    *,
    max_seq_len: int | None,
    max_prompt_len: int | None = None,
    origin: str = "row",
    use_chat_template: bool = True,
    separator: str = "\n",
) -> PreferenceExample:
    """Tokenize one pair (see the module docstring for the boundary check and truncation).

    A row problem raises :class:`DataError` starting with ``origin`` (``file:line``).
    """
    _check_limits(max_seq_len, max_prompt_len)
    try:
        tokens = _Tokens(tokenizer, use_chat_template, separator)
        prompt, (chosen, rejected) = tokens.split(prompt_messages, [chosen_messages, rejected_messages])
        cut_prompt, (cut_chosen, cut_rejected) = _truncate(
            prompt, [chosen, rejected], max_seq_len, max_prompt_len, tokens.bos
        )
        if cut_chosen == cut_rejected:
            raise RowError(
                f"chosen and rejected are the same tokens after truncation to max_seq_len={max_seq_len} "
                f"(they share their first {len(cut_chosen)} completion tokens): raise max_seq_len, lower "
                "max_prompt_len, or drop the row"
            )
    except RowError as err:
        raise DataError(f"{origin}: {err}") from None
    truncated = (cut_prompt, cut_chosen, cut_rejected) != (prompt, chosen, rejected)
    return PreferenceExample(cut_prompt, cut_chosen, cut_rejected, origin, truncated)


def encode_unpaired(
    tokenizer: Any,
    prompt_messages: Messages,
    completion_messages: Messages,
    desirable: bool,
    *,
    max_seq_len: int | None,
    max_prompt_len: int | None = None,
    origin: str = "row",
    use_chat_template: bool = True,
    separator: str = "\n",
) -> KTOExample:
    """Tokenize one KTO row, with the same boundary check and truncation as :func:`encode_pair`."""
    _check_limits(max_seq_len, max_prompt_len)
    try:
        tokens = _Tokens(tokenizer, use_chat_template, separator)
        prompt, (completion,) = tokens.split(prompt_messages, [completion_messages])
    except RowError as err:
        raise DataError(f"{origin}: {err}") from None
    cut_prompt, (cut_completion,) = _truncate(prompt, [completion], max_seq_len, max_prompt_len, tokens.bos)
    truncated = (cut_prompt, cut_completion) != (prompt, completion)
    return KTOExample(cut_prompt, cut_completion, desirable, origin, truncated)


def encode_preference(
    tokenizer: Any,
    rows: list[PreferencePair] | list[UnpairedCompletion],
    cfg: DataConfig,
    *,
    max_prompt_len: int | None = None,
    on_error: Callable[[str, str], None] | None = None,
) -> list[PreferenceExample | KTOExample]:
    """Encode parsed rows with ``cfg``'s max_seq_len, use_chat_template and separator.

    A bad row goes to ``on_error(origin, reason)``; without it the :class:`DataError` propagates.
    """
    options = dict(
        max_seq_len=cfg.max_seq_len,
        max_prompt_len=max_prompt_len,
        use_chat_template=cfg.use_chat_template,
        separator=cfg.separator,
    )
    examples: list[PreferenceExample | KTOExample] = []
    for row in rows:
        try:
            if isinstance(row, PreferencePair):
                examples.append(
                    encode_pair(tokenizer, row.prompt, row.chosen, row.rejected, origin=row.origin, **options)
                )
            else:
                examples.append(
                    encode_unpaired(
                        tokenizer, row.prompt, row.completion, row.desirable, origin=row.origin, **options
                    )
                )
        except DataError as err:
            if on_error is None:
                raise
            on_error(row.origin, str(err).removeprefix(f"{row.origin}: "))
    return examples


def _check_limits(max_seq_len: int | None, max_prompt_len: int | None) -> None:
    if max_seq_len is not None and max_seq_len < 2:
        raise ValueError(
            f"max_seq_len must be at least 2 (a prompt token and an answer token), got {max_seq_len}"
        )
    if max_prompt_len is not None and (
        max_prompt_len < 1 or (max_seq_len is not None and max_prompt_len >= max_seq_len)
    ):
        raise ValueError(
            f"max_prompt_len must be at least 1 and below max_seq_len ({max_seq_len}) so that every "
            f"completion keeps a token, got {max_prompt_len}"
        )


class _Tokens:
    """Renders and tokenizes prompt and prompt+completion texts for one tokenizer."""

    def __init__(self, tokenizer: Any, use_chat_template: bool, separator: str):
        self.tokenizer = tokenizer
        self.use_template = use_chat_template and has_chat_template(tokenizer)
        self.separator = separator
        start, end = _wrapping(tokenizer)
        # Plain text: the tokens the tokenizer itself puts around a text. Llama: BOS before; BERT
        # (a reward model's encoder): [CLS] before, whose state its classifier reads, [SEP] after.
        self.bos = _default_bos(tokenizer) or (start[0] if len(start) == 1 else None)
        self.eos = getattr(tokenizer, "eos_token_id", None)
        if self.eos is None and len(end) == 1:
            self.eos = end[0]

    def split(self, prompt: Messages, completions: list[Messages]) -> tuple[list[int], list[list[int]]]:
        """The prompt's tokens, and each completion's tokens after them (boundary checked)."""
        prompt_ids = self._ids(self._render(prompt, None))
        names = ["chosen", "rejected"] if len(completions) == 2 else ["completion"]
        return prompt_ids, [
            self._after(prompt_ids, self._ids(self._render(prompt, completion)), name)
            for completion, name in zip(completions, names)
        ]

    def _render(self, prompt: Messages, completion: Messages | None) -> str:
        if self.use_template:
            if completion is None:
                return _render(self.tokenizer, prompt, generation_prompt=True)
            return _render(self.tokenizer, prompt + completion, generation_prompt=False)
        roles = [m["role"] for m in prompt]
        if roles not in (["user"], ["system", "user"]) or (
            completion is not None and [m["role"] for m in completion] != ["assistant"]
        ):
            why = "use_chat_template is false" if has_chat_template(self.tokenizer) else "it has none"
            raise RowError(
                f"a conversation with roles {roles} + {[m['role'] for m in completion or []]} needs the "
                f"tokenizer's chat template, but {why}; without one only a [system,] user prompt and one "
                "assistant answer can be rendered"
            )
        text = "".join(m["content"] + self.separator for m in prompt)
        return text if completion is None else text + completion[0]["content"]

    def _ids(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if self.bos is not None and ids[:1] != [self.bos]:
            ids.insert(0, self.bos)
        return ids

    def _after(self, prompt_ids: list[int], full_ids: list[int], name: str) -> list[int]:
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise RowError(self._divergence(prompt_ids, full_ids, name))
        completion = full_ids[len(prompt_ids) :]
        # Whitespace after the end-of-turn token (ChatML's "\n") is formatting, not the answer.
        while completion and not self.tokenizer.decode(completion[-1:]).strip():
            completion.pop()
        if not completion:
            raise RowError(
                f"the rendered {name} has no tokens after the prompt: the chat template drops the answer "
                "(or it is only whitespace); fix the template or the row"
            )
        if not self.use_template and self.eos is not None:
            completion.append(self.eos)  # plain text: the answer ends with eos, as in SFT
        return completion

    def _divergence(self, prompt_ids: list[int], full_ids: list[int], name: str) -> str:
        at = next((i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b), len(full_ids))

        def show(ids: list[int]) -> str:
            return repr(self.tokenizer.decode(ids))

        return (
            f"the prompt's tokens (rendered with the generation prompt) are not the start of prompt + "
            f"{name}'s tokens: after token {at} ({show(prompt_ids[max(0, at - 8) : at])}) the prompt "
            f"has {show(prompt_ids[at : at + 8])} but prompt + {name} has {show(full_ids[at : at + 8])}. "
            "The chat template renders the prompt differently when an answer follows (e.g. a default "
            "system prompt, a date or a thinking tag in only one of the renderings), or a token merges "
            "across the boundary. Use a template that renders the prompt the same way in both cases, "
            "give the system message yourself (data.system_prompt), or end the prompt on a separator"
        )


def _wrapping(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens a tokenizer adds before and after one text (BERT: [CLS], [SEP])."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for at in range(len(full) - len(plain) + 1):
        if plain and full[at : at + len(plain)] == plain:
            return full[:at], full[at + len(plain) :]
    return [], []


def _truncate(
    prompt: list[int],
    completions: list[list[int]],
    max_seq_len: int | None,
    max_prompt_len: int | None,
    bos: int | None,
) -> tuple[list[int], list[list[int]]]:
    """Cut ``prompt`` from the left, then ``completions`` from the right (module docstring)."""
    keep = len(prompt) if max_prompt_len is None else min(len(prompt), max_prompt_len)
    if max_seq_len is not None:
        longest = max(len(c) for c in completions)
        if keep + longest > max_seq_len:
            floor = max_prompt_len if max_prompt_len is not None else max_seq_len // 2
            keep = min(keep, max(max_seq_len - longest, floor))
    cut = _keep_last(prompt, keep, bos)
    room = None if max_seq_len is None else max_seq_len - len(cut)
    return cut, [c[:room] for c in completions]


def _keep_last(prompt: list[int], keep: int, bos: int | None) -> list[int]:
    """The last ``keep`` tokens of ``prompt``, a leading BOS kept in front (counted in ``keep``)."""
    if keep >= len(prompt):
        return prompt
    if bos is not None and prompt[:1] == [bos]:
        return [bos, *prompt[len(prompt) - keep + 1 :]] if keep > 1 else [bos]
    return prompt[len(prompt) - keep :]
