"""``peftkit serve``: an OpenAI-compatible HTTP server for a base model and its adapters.

    peftkit serve --adapter math=runs/math/adapter --adapter chat=runs/chat/adapter --port 8000

The request's ``model`` picks the adapter (or the base model by its name); see
``peftkit/serve/`` for the engine (continuous batching, one adapter per row) and the endpoints.
Needs the ``serve`` extra: ``pip install 'peftkit[serve]'``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from peftkit.adapter_sets import adapter_specs, load_model_with_adapters
from peftkit.cli._model_args import add_model_arguments
from peftkit.configuration import ConfigError

HELP = "Serve a base model and its adapters over OpenAI's HTTP API (chat page at /)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, several_adapters=True, default_adapter=False)
    group = parser.add_argument_group("server")
    group.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)"
    )
    group.add_argument("--port", type=int, default=8000, help="default: 8000")
    group.add_argument(
        "--api-key",
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on every endpoint but /health and the page "
        "(default: the PEFTKIT_API_KEY environment variable; unset: no key)",
    )
    group.add_argument(
        "--served-model-name",
        metavar="NAME",
        help="the base model's id in the API (default: --base-model as given)",
    )
    group.add_argument(
        "--max-batch-size", type=int, default=16, metavar="N", help="sequences decoded together (default: 16)"
    )
    group.add_argument(
        "--max-queue",
        type=int,
        default=64,
        metavar="N",
        help="sequences waiting for a row; beyond it requests get 429 with Retry-After (default: 64)",
    )
    group.add_argument(
        "--default-max-tokens",
        type=int,
        default=512,
        metavar="N",
        help="completion length when a chat request gives no max_tokens (default: 512, at most the "
        "context left)",
    )
    group.add_argument(
        "--allow-runtime-adapters",
        action="store_true",
        help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (needs --adapter-root)",
    )
    group.add_argument(
        "--adapter-root", metavar="DIR", help="the only directory runtime-loaded adapters may come from"
    )


def run(args: argparse.Namespace) -> int:
    from peftkit.serve.server import build_app
    from peftkit.serve.server import run as run_server

    options = _options(args)
    args.command = "serve"
    specs = adapter_specs(args.adapter)
    model, tokenizer, names = load_model_with_adapters(args)
    base = args.base_model or _recorded_base(specs)
    app = build_app(
        model,
        tokenizer,
        dict(specs),
        base,
        args.autocast_dtype,
        options,
        trust_remote_code=args.trust_remote_code,
    )
    adapters = f"adapters {', '.join(names)}" if names else "no adapters"
    run_server(app, options, f"serving {base} with {adapters} ({args.precision_label})")
    return 0


def _options(args: argparse.Namespace):
    from peftkit.serve.server import ServeOptions

    problems = []
    for flag, value in (
        ("--max-batch-size", args.max_batch_size),
        ("--max-queue", args.max_queue),
        ("--default-max-tokens", args.default_max_tokens),
    ):
        if value < 1:
            problems.append(f"{flag} must be at least 1, got {value}")
    if not 0 <= args.port <= 65535:
        problems.append(f"--port must be in 0..65535, got {args.port}")
    root = None
    if args.allow_runtime_adapters:
        if not args.adapter_root:
            problems.append(
                "--allow-runtime-adapters needs --adapter-root DIR: the directory adapters may be loaded from"
            )
        elif not Path(args.adapter_root).is_dir():
            problems.append(f"--adapter-root {args.adapter_root} is not a directory")
        else:
            root = Path(args.adapter_root).resolve()
    elif args.adapter_root:
        problems.append(
            "--adapter-root is used only with --allow-runtime-adapters; add it or drop --adapter-root"
        )
    if not args.adapter and not args.base_model:
        problems.append("give --base-model NAME_OR_DIR, --adapter [NAME=]DIR, or both")
    if problems:
        raise ConfigError(problems, source="command line")
    key = args.api_key if args.api_key is not None else os.environ.get("PEFTKIT_API_KEY") or None
    return ServeOptions(
        host=args.host,
        port=args.port,
        api_key=key,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        default_max_tokens=args.default_max_tokens,
        adapter_root=root,
        served_model_name=args.served_model_name,
    )


def _recorded_base(specs: list[tuple[str, str]]) -> str:
    from peftkit.loading import adapter_base_model

    return adapter_base_model(specs[0][1])
