"""``peftkit generate``: complete prompts with a base model, optionally with one or several adapters.

With several ``--adapter NAME=DIR``, each prompt of a ``.jsonl`` ``--prompts-file`` may pick its
adapter (``{"prompt": ..., "adapter": "NAME"}``; ``"__base__"`` or null: no adapter); the others
use ``--use-adapter`` (default: the first adapter). See ``adapter_sets.py`` for how mixed
prompts are batched.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from peftkit.adapter_sets import (
    BASE,
    adapter_specs,
    check_adapter_name,
    generate_for_adapters,
    load_model_with_adapters,
)
from peftkit.cli._model_args import add_model_arguments, add_sampling_arguments, sampling_kwargs
from peftkit.configuration import ConfigError
from peftkit.errors import not_utf8_message
from peftkit.loading import encode_chat, encode_plain, has_chat_template

HELP = "Generate completions for prompts with a base model and optional adapters (one per prompt if wanted)."
_DEFAULT = object()  # a prompt that names no adapter: --use-adapter's


@dataclass
class Prompt:
    text: str
    adapter: object  # an adapter name, None (the base model) or _DEFAULT
    where: str  # "file:line" or "--prompt", for errors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, several_adapters=True)
    group = parser.add_argument_group("prompts")
    group.add_argument(
        "--prompt", action="extend", nargs="+", default=[], metavar="TEXT", help="prompt(s) to complete"
    )
    group.add_argument(
        "--prompts-file",
        metavar="FILE",
        help='one prompt per line; a .jsonl file holds one {"prompt": ...} object per line, optionally with '
        '"adapter": NAME (an --adapter name; "__base__" or null: no adapter); \'-\' reads stdin',
    )
    group.add_argument(
        "--no-chat-template",
        action="store_true",
        help="feed prompts as plain text (default: wrap each as a user message in the tokenizer's chat template)",
    )
    add_sampling_arguments(parser)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=16,
        metavar="N",
        help="prompts per batch (default: 16, evaluation.batch_size's default: in bf16 which prompts share a "
        "batch can change the rounding); LoRA batches mix adapters, other methods batch each adapter's "
        "prompts apart",
    )
    parser.add_argument(
        "--jsonl",
        action="store_true",
        help='print one {"prompt", "completion"} JSON object per line (with "adapter" when adapters are loaded)',
    )


def run(args: argparse.Namespace) -> int:
    from peftkit.seeding import seed_everything

    prompts = [Prompt(p, _DEFAULT, "--prompt") for p in args.prompt]
    if args.prompts_file:
        prompts += read_prompt_rows(args.prompts_file)
    if not prompts:
        raise ConfigError("give at least one --prompt TEXT or a --prompts-file FILE", "command line")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}", "command line")
    generate_kwargs = sampling_kwargs(args)
    loaded = [name for name, _ in adapter_specs(args.adapter)]
    adapters = prompt_adapters(prompts, loaded, args.use_adapter)  # before loading: fail fast
    model, tokenizer, _ = load_model_with_adapters(args)
    use_template = not args.no_chat_template and has_chat_template(tokenizer)
    prompt_ids = [
        encode_chat(tokenizer, [{"role": "user", "content": p.text}])
        if use_template
        else encode_plain(tokenizer, p.text)
        for p in prompts
    ]
    print(f"precision: {args.precision_label}", file=sys.stderr)
    seed_everything(args.seed)
    completions = generate_for_adapters(
        model,
        tokenizer,
        prompt_ids,
        adapters,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        autocast_dtype=args.autocast_dtype,
        **generate_kwargs,
    )
    tag = len(set(adapters)) > 1
    for prompt, adapter, completion in zip(prompts, adapters, completions):
        if args.jsonl:
            row = {"prompt": prompt.text, "completion": completion}
            if loaded:
                row["adapter"] = adapter
            print(json.dumps(row, ensure_ascii=False))
        elif len(prompts) == 1:
            print(completion)
        else:
            print(f">>> {f'[{adapter}] ' if tag else ''}{prompt.text}\n{completion}\n")
    return 0


def prompt_adapters(prompts: list[Prompt], loaded: list[str], use_adapter: str | None) -> list[str]:
    """The adapter each prompt runs with; every unknown name is reported, with its file:line."""
    default = check_adapter_name(use_adapter or (loaded[0] if loaded else BASE), loaded, "--use-adapter")
    adapters, problems = [], []
    for p in prompts:
        try:
            adapters.append(
                default if p.adapter is _DEFAULT else check_adapter_name(p.adapter, loaded, p.where)
            )
        except ConfigError as err:
            problems.extend(err.problems)
    if len(problems) > 20:
        problems[20:] = [f"... and {len(problems) - 20} more rows naming unknown adapters"]
    if problems:
        raise ConfigError(problems, "--prompts-file")
    return adapters


def read_prompts(path: str) -> list[str]:
    """Prompts from a text file (one per non-blank line) or a .jsonl file ({"prompt": ...} per line)."""
    return [p.text for p in read_prompt_rows(path)]


def read_prompt_rows(path: str) -> list[Prompt]:
    """:class:`Prompt` rows of a text file (one per non-blank line) or a .jsonl file: a string, or
    ``{"prompt": ..., "adapter": NAME}`` per line (no "adapter" key: the default adapter)."""
    raw = b""
    try:
        text = sys.stdin.read() if path == "-" else (raw := Path(path).read_bytes()).decode("utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read --prompts-file {path}: {err.strerror}", "command line") from err
    except UnicodeDecodeError as err:
        message = not_utf8_message(path, raw, err) if raw else f"<stdin> cannot be decoded: {err}"
        raise ConfigError(f"--prompts-file {message}", "command line") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    source = "<stdin>" if path == "-" else path
    if not path.endswith(".jsonl"):
        return [Prompt(line, _DEFAULT, f"{source}:{n}") for n, line in lines]
    prompts, problems = [], []
    for n, line in lines:
        try:
            row = json.loads(line)
        except ValueError as err:
            problems.append(f"{source}:{n}: not valid JSON ({err})")
            continue
        prompt = row if isinstance(row, str) else row.get("prompt") if isinstance(row, dict) else None
        adapter = row.get("adapter", _DEFAULT) if isinstance(row, dict) else _DEFAULT
        if not isinstance(prompt, str):
            problems.append(f'{source}:{n}: expected a string or an object with a "prompt" string')
        elif adapter is not _DEFAULT and adapter is not None and not isinstance(adapter, str):
            problems.append(
                f'{path}:{n}: "adapter" must be an adapter name, "{BASE}" or null, got {adapter!r}'
            )
        else:
            prompts.append(Prompt(prompt, adapter, f"{source}:{n}"))
    if problems:
        raise ConfigError(problems, "--prompts-file")
    return prompts
