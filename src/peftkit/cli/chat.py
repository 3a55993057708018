"""``peftkit chat``: a multi-turn conversation with a model (and optional adapter) on the terminal.

Reads one user message per line from stdin, so it works both interactively and with piped
input (``printf 'hi\\n/reset\\nbye\\n' | peftkit chat ...``). Replies go to stdout, one per
turn; notices go to stderr, so stdout stays a clean transcript of replies.

Commands: ``/reset`` forgets the conversation, ``/exit`` (or end of input) quits.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from peftkit.cli._model_args import (
    add_model_arguments,
    add_sampling_arguments,
    encode_chat,
    has_chat_template,
    load_model_from_args,
    sampling_kwargs,
)
from peftkit.errors import ModelLoadError

HELP = "Chat with a model (and optional adapter) interactively; /reset clears history, /exit quits."
EXIT_COMMANDS = {"/exit", "/quit"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--system", metavar="TEXT", help="system message that starts every conversation")
    parser.add_argument(
        "--no-stream", action="store_true", help="print each reply when complete, not token by token"
    )


def run(args: argparse.Namespace) -> int:
    from transformers import set_seed

    generate_kwargs = sampling_kwargs(args)
    model, tokenizer = load_model_from_args(args)
    if not has_chat_template(tokenizer):
        raise ModelLoadError(
            "the tokenizer has no chat template, so it cannot format a conversation; "
            "use `peftkit generate --no-chat-template` for plain-text completion"
        )
    set_seed(args.seed)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Type a message; /reset clears the conversation, /exit quits.", file=sys.stderr)
    history: list[dict[str, str]] = []
    while True:
        line = _read_line(interactive)
        if line is None or line.strip() in EXIT_COMMANDS:
            return 0
        message = line.strip()
        if not message:
            continue
        if message == "/reset":
            history.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": message})
        prompt_ids = _fit_context(model, tokenizer, args.system, history, args.max_new_tokens)
        reply = _reply(model, tokenizer, prompt_ids, args, generate_kwargs)
        history.append({"role": "assistant", "content": reply})


def _read_line(interactive: bool) -> str | None:
    """The next user message, or None at end of input."""
    if interactive:
        try:
            return input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return None
    line = sys.stdin.readline()
    return line if line else None


def _fit_context(
    model: Any, tokenizer: Any, system: str | None, history: list[dict[str, str]], max_new_tokens: int
) -> list[int]:
    """Encode the conversation, dropping the oldest turns if it would outgrow the context window."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    prefix = [{"role": "system", "content": system}] if system else []
    while True:
        ids = encode_chat(tokenizer, prefix + history)
        if limit is None or len(ids) + max_new_tokens <= limit or len(history) <= 1:
            return ids
        del history[:2]  # the oldest user message and its reply
        print("(dropped the oldest turn to fit the context window)", file=sys.stderr)


def _reply(model: Any, tokenizer: Any, prompt_ids: list[int], args: argparse.Namespace, kwargs: dict) -> str:
    from peftkit.evaluation import generate_completions

    streamer = None
    if not args.no_stream:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    reply = generate_completions(
        model,
        tokenizer,
        [prompt_ids],
        max_new_tokens=args.max_new_tokens,
        batch_size=1,
        progress=False,
        streamer=streamer,
        **kwargs,
    )[0]
    if streamer is None:
        print(reply, flush=True)
    return reply
