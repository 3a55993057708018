"""``peftkit generate``: complete prompts with a base model, optionally with an adapter applied."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from peftkit.cli._model_args import (
    add_model_arguments,
    add_sampling_arguments,
    encode_chat,
    encode_plain,
    has_chat_template,
    load_model_from_args,
    sampling_kwargs,
)
from peftkit.configuration import ConfigError

HELP = "Generate completions for prompts with a base model and an optional adapter."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    group = parser.add_argument_group("prompts")
    group.add_argument(
        "--prompt", action="extend", nargs="+", default=[], metavar="TEXT", help="prompt(s) to complete"
    )
    group.add_argument(
        "--prompts-file",
        metavar="FILE",
        help="one prompt per line; a .jsonl file holds one {\"prompt\": ...} object per line; '-' reads stdin",
    )
    group.add_argument(
        "--no-chat-template",
        action="store_true",
        help="feed prompts as plain text (default: wrap each as a user message in the tokenizer's chat template)",
    )
    add_sampling_arguments(parser)
    parser.add_argument(
        "--batch-size", type=int, default=8, metavar="N", help="prompts per batch (default: 8)"
    )
    parser.add_argument(
        "--jsonl", action="store_true", help='print one {"prompt", "completion"} JSON object per line'
    )


def run(args: argparse.Namespace) -> int:
    from transformers import set_seed

    from peftkit.evaluation import generate_completions

    prompts = list(args.prompt) + (read_prompts(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise ConfigError("give at least one --prompt TEXT or a --prompts-file FILE", "command line")
    generate_kwargs = sampling_kwargs(args)
    model, tokenizer = load_model_from_args(args)
    use_template = not args.no_chat_template and has_chat_template(tokenizer)
    prompt_ids = [
        encode_chat(tokenizer, [{"role": "user", "content": p}])
        if use_template
        else encode_plain(tokenizer, p)
        for p in prompts
    ]
    set_seed(args.seed)
    completions = generate_completions(
        model,
        tokenizer,
        prompt_ids,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        **generate_kwargs,
    )
    for prompt, completion in zip(prompts, completions):
        if args.jsonl:
            print(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False))
        elif len(prompts) == 1:
            print(completion)
        else:
            print(f">>> {prompt}\n{completion}\n")
    return 0


def read_prompts(path: str) -> list[str]:
    """Prompts from a text file (one per non-blank line) or a .jsonl file ({"prompt": ...} per line)."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read --prompts-file {path}: {err.strerror}", "command line") from err
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not path.endswith(".jsonl"):
        return [line for _, line in lines]
    prompts, problems = [], []
    for n, line in lines:
        try:
            row = json.loads(line)
        except ValueError as err:
            problems.append(f"{path}:{n}: not valid JSON ({err})")
            continue
        prompt = row if isinstance(row, str) else row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str):
            problems.append(f'{path}:{n}: expected a string or an object with a "prompt" string')
        else:
            prompts.append(prompt)
    if problems:
        raise ConfigError(problems, "--prompts-file")
    return prompts
