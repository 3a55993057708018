"""Loading a model (and an adapter) for inference, and encoding prompts: what ``peftkit generate``,
``chat``, ``serve``, the judges and the scorers share.

The options are read from an ``argparse.Namespace``-like object (``base_model``, ``adapter``,
``dtype``, ``device``, ``precision``, ``threads``, ``trust_remote_code``): the command line's
(``cli/_model_args.py`` declares them) or one a library caller builds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from peftkit.configuration import ConfigError
from peftkit.errors import ModelLoadError

ADAPTER_CONFIG = "adapter_config.json"


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
