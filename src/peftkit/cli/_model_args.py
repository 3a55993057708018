"""Options shared by ``peftkit generate`` and ``peftkit chat``: which model, which adapter, how to sample.

Both commands call :func:`add_model_arguments` / :func:`add_sampling_arguments` to declare the
options and :func:`load_model_from_args` / :func:`sampling_kwargs` to use them, so the two
cannot drift apart.
"""

from __future__ import annotations

import argparse
from typing import Any

from peftkit.configuration import ConfigError
from peftkit.loading import ADAPTER_CONFIG


def add_model_arguments(
    parser: argparse.ArgumentParser, *, several_adapters: bool = False, default_adapter: bool = True
) -> None:
    """``several_adapters``: ``--adapter`` may repeat (a list, see ``adapter_sets.py``) and, with
    ``default_adapter``, ``--use-adapter`` picks the one to use by default."""
    from peftkit.model_aliases import ALIASES
    from peftkit.models import DTYPE_CHOICES

    group = parser.add_argument_group("model")
    group.add_argument(
        "--base-model",
        metavar="NAME_OR_DIR",
        help=f"built-in alias ({', '.join(sorted(ALIASES))}), local model directory or hub id; "
        f"defaults to the base model recorded in --adapter's {ADAPTER_CONFIG}",
    )
    if several_adapters:
        group.add_argument(
            "--adapter",
            action="append",
            metavar="[NAME=]DIR",
            help="adapter directory saved by `peftkit train` (or PEFT); repeat to load several onto one "
            "base model, each under NAME (default: the directory's name; for OUTPUT_DIR/adapter, "
            "OUTPUT_DIR's). All must record the same base model, method and vocabulary",
        )
        if default_adapter:
            group.add_argument(
                "--use-adapter",
                metavar="NAME",
                help="adapter to use by default (default: the first --adapter); __base__ = none",
            )
    else:
        group.add_argument("--adapter", metavar="DIR", help="adapter directory saved by `peftkit train`")
    group.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="float32", help="weights dtype (default: float32)"
    )
    group.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, mps, or auto (default: the GPU if any)"
    )
    group.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        help="how the model computes, as training does: bf16 = autocast with the base weights stored in "
        "bf16 and adapters in fp32; auto (default; for eval, the config's training.precision) = bf16 "
        "where the device computes it natively, else fp32. Same setting, same greedy answers as "
        "train-time evaluation",
    )
    group.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads (default: one per core, fewer when the machine's load average shows other "
        "processes using cores)",
    )
    group.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the model repository's own Python code to run (only for repositories you trust)",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="default: 256")
    group.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        metavar="T",
        help="0 (default) decodes greedily; > 0 samples",
    )
    group.add_argument(
        "--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default: 1.0)"
    )
    group.add_argument(
        "--seed", type=int, default=0, metavar="S", help="random seed for sampling (default: 0)"
    )


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``generate`` keyword arguments from the sampling options (checked, all problems at once)."""
    problems = []
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        problems.append(f"--temperature must be >= 0 (0 decodes greedily), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top-p must be in (0, 1], got {args.top_p}")
    if problems:
        raise ConfigError(problems, source="command line")
    if args.temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": 0}
