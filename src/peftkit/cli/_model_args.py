"""Options shared by ``peftkit generate`` and ``peftkit chat``: which model, which adapter, how to sample.

Both commands call :func:`add_model_arguments` / :func:`add_sampling_arguments` to declare the
options and :func:`load_model_from_args` / :func:`sampling_kwargs` to use them, so the two
cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from peftkit.configuration import ConfigError
from peftkit.errors import ModelLoadError

ADAPTER_CONFIG = "adapter_config.json"


def add_model_arguments(parser: argparse.ArgumentParser, *, several_adapters: bool = False) -> None:
    """``several_adapters``: ``--adapter`` may repeat (a list, see ``cli/_adapters.py``) and
    ``--use-adapter`` picks the one to use by default."""
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


def load_model_from_args(args: argparse.Namespace, **load_options: Any) -> tuple[Any, Any]:
    """The base model (with ``--adapter`` applied, if given) in eval mode on ``--device``, and its tokenizer.

    ``load_options`` go to ``load_model_and_tokenizer`` (e.g. ``task=`` and ``num_labels=`` for a
    classifier's head)."""
    from peftkit.models import default_attention, load_model_and_tokenizer, resolve_device

    base = args.base_model or (adapter_base_model(args.adapter) if args.adapter else None)
    if base is None:
        raise ConfigError(
            "give --base-model NAME_OR_DIR, or --adapter DIR to use its base model", "command line"
        )
    check_threads(args)
    load_options.setdefault("attn_implementation", default_attention(resolve_device(args.device)))
    model, tokenizer = load_model_and_tokenizer(
        base, dtype=args.dtype, trust_remote_code=args.trust_remote_code, **load_options
    )
    base_params = list(model.parameters())  # held: their ids stay theirs
    if args.adapter:
        from peftkit.auto import apply_saved_adapter  # imported late: only adapter users pay for it

        # The tokenizer saved with the adapter knows tokens training added (the base grows to fit).
        model, tokenizer = apply_saved_adapter(
            model, tokenizer, args.adapter, trust_remote_code=args.trust_remote_code
        )
    ready_for_inference(model, args, base_params)
    return model, tokenizer


def check_threads(args: argparse.Namespace) -> None:
    """Refuse a bad ``--threads`` before anything loads; then set the threads (peftkit.threads)."""
    from peftkit.threads import choose_threads

    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}", "command line")
    choose_threads(threads, key="--threads")


def ready_for_inference(model: Any, args: argparse.Namespace, base_params: list[Any]) -> None:
    """Move ``model`` to ``--device`` in eval mode, in ``--precision`` (peftkit.precision): the base
    weights (``base_params``, the parameters before adapters were applied) stored as training stores
    them. Sets ``args.autocast_dtype`` (None: fp32) for the generation calls that follow, and
    ``args.precision_label`` for the line the command prints."""
    from peftkit.models import resolve_device
    from peftkit.precision import describe, resolve_autocast, store_for_inference

    device = resolve_device(args.device)
    model.to(device)
    model.eval()
    args.autocast_dtype = None
    if args.dtype == "float32":  # a model loaded in bf16/fp16 computes in that dtype throughout
        precision = getattr(args, "precision", None) or "auto"
        args.autocast_dtype = resolve_autocast(precision, device, key="--precision")
        store_for_inference(model, args.autocast_dtype, [id(p) for p in base_params])
        args.precision_label = describe(args.autocast_dtype)
    else:
        args.precision_label = f"{args.dtype} weights"


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of an adapter directory, as a dict."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        nested = Path(adapter_dir) / "adapter"
        if (nested / ADAPTER_CONFIG).is_file():  # a `peftkit train` output_dir: its adapter is inside
            raise ModelLoadError(
                f"{adapter_dir} has no {ADAPTER_CONFIG}; did you mean {nested}? "
                "(`peftkit train` saves the adapter in OUTPUT_DIR/adapter)"
            )
        raise ModelLoadError(
            f"{adapter_dir} has no {ADAPTER_CONFIG}; pass the directory an adapter was saved to "
            "(OUTPUT_DIR/adapter for a `peftkit train` run)"
        )
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise ModelLoadError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return config


def check_out_dir(out: Path, adapter_dirs: list[str], *, overwrite: bool, name: str = "OUT_DIR") -> None:
    """Refuse an output directory that is, holds or lies inside an input adapter directory (writing
    it would destroy the input), and a non-empty one unless ``overwrite``. Nothing is touched."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{name} {out} exists and is not a directory", "command line")
    real_out = out.resolve()
    for directory in adapter_dirs:
        real = Path(directory).expanduser().resolve()
        if not real.exists():
            continue  # a hub id or a missing directory: reported when it is loaded
        if real == real_out or real_out in real.parents or real in real_out.parents:
            where = "is" if real == real_out else "contains" if real_out in real.parents else "is inside"
            raise ConfigError(
                f"{name} {out} {where} the input adapter directory {directory}; writing there would destroy "
                "the input, so choose another directory",
                "command line",
            )
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"{name} {out} is not empty; pass --overwrite to replace it, or choose another directory",
            "command line",
        )


def adapter_base_model(adapter_dir: str | Path) -> str:
    """The ``base_model_name_or_path`` recorded in an adapter directory."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    base = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{path} does not record base_model_name_or_path; pass --base-model explicitly")
    return str(base)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` in the chat template, ending with the assistant's generation prompt."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The template already wrote every special token (bos included), so add none here.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_plain(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]
