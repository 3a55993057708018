"""An Ollama ``Modelfile`` for an exported GGUF: FROM, TEMPLATE (a Go template), SYSTEM, stop tokens.

Ollama renders prompts with Go templates, not with the Jinja chat template transformers uses. A
template family is recognised by behaviour, not by its source text: the transformers tokenizer
renders a set of probe conversations (with and without a system message, several turns, text
with newlines and outer spaces) and each must equal what the family's known layout gives. Only
then is that family's Go template written, plus the system prompt the Jinja template adds when a
conversation has none (Ollama's SYSTEM, which it puts first in the messages the same way).

    family   turn layout                                                    end-of-turn token
    chatml   <|im_start|>ROLE\\nCONTENT<|im_end|>\\n ... <|im_start|>assistant\\n    <|im_end|>
    llama3   <|start_header_id|>ROLE<|end_header_id|>\\n\\nCONTENT<|eot_id|>      <|eot_id|>

Any other template: the Modelfile has no TEMPLATE (a comment says why) and Ollama chooses a
template from the GGUF's ``tokenizer.chat_template`` itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_PROBE_TEXTS = ("Hi", "Two\nlines", "  outer spaces  ", "Ünïcödé 🚀 {{ braces }}")


def _probes() -> list[list[dict[str, str]]]:
    a, b, c, d = _PROBE_TEXTS
    return [
        [{"role": "user", "content": a}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": b}],
        [{"role": "user", "content": a}, {"role": "assistant", "content": c}, {"role": "user", "content": d}],
        [
            {"role": "system", "content": d},
            {"role": "user", "content": c},
            {"role": "assistant", "content": b},
            {"role": "user", "content": a},
        ],
    ]


@dataclass(frozen=True)
class Family:
    name: str
    turn: Callable[[str, str], str]
    generation_prompt: str
    go_template: str
    end_token: str


CHATML = Family(
    name="chatml",
    turn=lambda role, content: f"<|im_start|>{role}\n{content}<|im_end|>\n",
    generation_prompt="<|im_start|>assistant\n",
    # The final newline is a template action so that no Modelfile parser can trim it away.
    go_template="{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    '<|im_start|>assistant{{ "\\n" }}',
    end_token="<|im_end|>",
)
LLAMA3 = Family(
    name="llama3",
    turn=lambda role, content: f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
    generation_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n",
    go_template="{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}"
    '<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>{{ "\\n\\n" }}',
    end_token="<|eot_id|>",
)
FAMILIES = (CHATML, LLAMA3)


@dataclass(frozen=True)
class ChatTemplate:
    """A recognised chat template: its family, the system prompt it adds, the text it starts with."""

    family: Family
    default_system: str | None
    prefix: str


def _render(family: Family, messages: list[dict[str, str]], default_system: str | None, prefix: str) -> str:
    if default_system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": default_system}, *messages]
    return prefix + "".join(family.turn(m["role"], m["content"]) for m in messages) + family.generation_prompt


def recognise(tokenizer: Any, add_bos: bool) -> ChatTemplate | None:
    """The family of ``tokenizer``'s chat template if every probe renders as that family, else None.

    ``add_bos``: whether tokenizing adds the bos token (then a template that writes it itself
    matches with that text as a prefix, which Ollama's tokenizer adds instead)."""
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        return None
    try:
        rendered = [
            tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in _probes()
        ]
    except Exception:  # a template that needs other variables (tools, dates): not one we translate
        return None
    bos = getattr(tokenizer, "bos_token", None)
    prefixes = [""] + ([bos] if add_bos and bos else [])
    first = _probes()[0]
    for family in FAMILIES:
        for prefix in prefixes:
            if not rendered[0].startswith(prefix):
                continue
            default_system = _default_system(family, rendered[0][len(prefix) :], first)
            if all(_render(family, m, default_system, prefix) == r for m, r in zip(_probes(), rendered)):
                return ChatTemplate(family, default_system, prefix)
    return None


def _default_system(family: Family, text: str, messages: list[dict[str, str]]) -> str | None:
    """The system prompt the template puts before ``messages`` (which have none), if any."""
    plain = _render(family, messages, None, "")
    if text == plain or not text.endswith(plain):
        return None
    head = text[: -len(plain)]
    marker = family.turn("system", "\0")
    before, _, after = marker.partition("\0")
    if head.startswith(before) and head.endswith(after):
        return head[len(before) : len(head) - len(after)]
    return None


def stop_tokens(template: ChatTemplate | None, tokenizer: Any) -> list[str]:
    """Ollama stop strings: the end-of-turn token and the eos token (each once)."""
    stops = [template.family.end_token] if template is not None else []
    eos = getattr(tokenizer, "eos_token", None)
    if isinstance(eos, str) and eos and eos not in stops:
        stops.append(eos)
    return stops


def _quoted(text: str) -> str:
    """A Modelfile triple-quoted value; refuses text that would end the quotes early."""
    if '"""' in text:
        raise ValueError(f'cannot put {text[:40]!r}... in a Modelfile: it contains """')
    return f'"""{text}"""'


def modelfile_text(
    *,
    model_file: str,
    adapter_file: str | None,
    template: ChatTemplate | None,
    has_chat_template: bool,
    stops: list[str],
    header: list[str],
) -> str:
    """The Modelfile. ``model_file`` is FROM's value (relative to the Modelfile, or a path)."""
    lines = [f"# {line}" if line else "#" for line in header]
    lines.append(f"FROM {model_file}")
    if adapter_file is not None:
        lines.append(f"ADAPTER {adapter_file}")
    if template is not None:
        lines.append(
            f"# TEMPLATE: the chat template is {template.family.name}; this Go template renders the same "
            "prompts as transformers' apply_chat_template(add_generation_prompt=True)"
        )
        lines.append(f"TEMPLATE {_quoted(template.family.go_template)}")
        if template.default_system is not None:
            lines.append("# SYSTEM: the system prompt the chat template adds when a conversation has none")
            lines.append(f"SYSTEM {_quoted(template.default_system)}")
    elif has_chat_template:
        lines.append(
            "# TEMPLATE: not written: peftkit translates only ChatML and Llama 3 chat templates to Ollama's "
            "Go templates. Ollama picks a template from the GGUF's tokenizer.chat_template; check it with "
            "`ollama show NAME --template`"
        )
    else:
        lines.append("# TEMPLATE: none: the model has no chat template (plain text completion)")
    for stop in stops:
        lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"
