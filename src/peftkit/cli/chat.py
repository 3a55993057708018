"""``peftkit chat``: a multi-turn conversation with a model (and optional adapter) on the terminal.

Reads one user message per line from stdin, so it works both interactively and with piped
input (``printf 'hi\\n/reset\\nbye\\n' | peftkit chat ...``). Replies go to stdout, one per
turn; notices go to stderr, so stdout stays a clean transcript of replies.

Commands: ``/reset`` forgets the conversation, ``/exit`` (or end of input) quits. With adapters
(``--adapter [NAME=]DIR``, repeatable): ``/adapter`` lists them, ``/adapter NAME`` switches to
one, ``/base`` (= ``/adapter __base__``) turns them off; the conversation is kept across switches,
so one adapter can continue what another started.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from peftkit.adapter_sets import (
    BASE,
    adapter_specs,
    check_adapter_name,
    load_model_with_adapters,
    using_adapter,
)
from peftkit.cli._model_args import add_model_arguments, add_sampling_arguments, sampling_kwargs
from peftkit.configuration import ConfigError
from peftkit.errors import ModelLoadError
from peftkit.loading import encode_chat, has_chat_template

HELP = (
    "Chat with a model (and optional adapters) interactively; /reset clears history, /adapter [NAME] "
    "lists or switches adapters, /base turns them off, /exit quits."
)
EXIT_COMMANDS = {"/exit", "/quit"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, several_adapters=True)
    add_sampling_arguments(parser)
    parser.add_argument("--system", metavar="TEXT", help="system message that starts every conversation")
    parser.add_argument(
        "--no-stream", action="store_true", help="print each reply when complete, not token by token"
    )


def run(args: argparse.Namespace) -> int:
    from peftkit.seeding import seed_everything

    generate_kwargs = sampling_kwargs(args)
    loaded = [name for name, _ in adapter_specs(args.adapter)]
    adapter = check_adapter_name(args.use_adapter or (loaded[0] if loaded else BASE), loaded, "--use-adapter")
    model, tokenizer, _ = load_model_with_adapters(args)
    if not has_chat_template(tokenizer):
        raise ModelLoadError(
            "the tokenizer has no chat template, so it cannot format a conversation; "
            "use `peftkit generate --no-chat-template` for plain-text completion"
        )
    seed_everything(args.seed)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Precision: {args.precision_label}.", file=sys.stderr)
        print("Type a message; /reset clears the conversation, /exit quits.", file=sys.stderr)
        if loaded:
            print(
                f"Adapter: {adapter}; /adapter lists and switches adapters, /base turns them off.",
                file=sys.stderr,
            )
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
        command = message.split(" ", 1)[0]
        if command in ("/adapter", "/base"):
            adapter = _switch_adapter(adapter, "/adapter __base__" if command == "/base" else message, loaded)
            continue
        if message.startswith("//"):
            message = message[1:]  # an escaped leading slash: a message, not a command
        elif message.startswith("/"):
            print(
                f"unknown command {command}: the commands are /reset, /adapter [NAME], /base and /exit "
                "(start a message with // to send one that begins with /)",
                file=sys.stderr,
            )
            continue
        history.append({"role": "user", "content": message})
        prompt_ids = _fit_context(model, tokenizer, args.system, history, args.max_new_tokens)
        with using_adapter(model, adapter):
            reply = _reply(model, tokenizer, prompt_ids, args, generate_kwargs)
        history.append({"role": "assistant", "content": reply})


def _switch_adapter(current: str, command: str, loaded: list[str]) -> str:
    """The adapter after ``/adapter [NAME]`` (no NAME: list them, keep ``current``); notices to stderr."""
    name = command.partition(" ")[2].strip()
    if not name:
        for option in [*loaded, BASE]:
            print(f"{'*' if option == current else ' '} {option}", file=sys.stderr)
        return current
    try:
        name = check_adapter_name(name, loaded, command)
    except ConfigError as err:
        print(f"({err.problems[0]})", file=sys.stderr)
        return current
    print(f"(adapter: {name}{' = no adapter' if name == BASE else ''}; history kept)", file=sys.stderr)
    return name


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
        autocast_dtype=args.autocast_dtype,
        streamer=streamer,
        **kwargs,
    )[0]
    if streamer is None:
        print(reply, flush=True)
    return reply
