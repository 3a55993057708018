"""``peftkit merge``: fold an adapter into its base model and save a standalone model directory.

    ADAPTER_DIR ──(base model it records, grown to the adapter's tokenizer)──> PeftModel (fp32)
        └─ merge_and_unload(safe_merge) ──> plain model ──cast to --dtype──> OUT_DIR
                                                  config.json, generation_config.json,
                                                  model.safetensors, tokenizer + chat template

The result loads with transformers alone (``AutoModelForCausalLM.from_pretrained(OUT_DIR)``).
Merging happens in fp32 whatever ``--dtype`` is, so the cast rounds once, at the end. The
directory is written atomically: a failed or interrupted merge leaves no partial ``OUT_DIR``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.io import check_out_dir
from peftkit.loading import read_adapter_config

HELP = "Merge an adapter into its base model and save a standalone transformers model directory."

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "adapter_dir", metavar="ADAPTER_DIR", help="adapter directory saved by `peftkit train`"
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where to write the merged model")
    parser.add_argument(
        "--base-model",
        metavar="NAME_OR_DIR",
        help="base model (alias, local directory or hub id); default: the one ADAPTER_DIR records",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the saved weights (default: fp32)"
    )
    parser.add_argument(
        "--safe",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="check every merged weight is finite before writing any (default: on)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty OUT_DIR (never one that is, holds or is inside ADAPTER_DIR)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the model repository's own Python code to run (only for repositories you trust)",
    )


def run(args: argparse.Namespace) -> int:
    from peftkit.configuration import ConfigError
    from peftkit.preflight import writable_dir_problem

    out = Path(args.out_dir)
    check_out_dir(out, [args.adapter_dir], overwrite=args.overwrite)
    if problem := writable_dir_problem(out, "OUT_DIR"):
        raise ConfigError(problem, "command line")
    merge_adapter(
        args.adapter_dir,
        out,
        base_model=args.base_model,
        dtype=DTYPES[args.dtype],
        safe_merge=args.safe,
        trust_remote_code=args.trust_remote_code,
    )
    print(f"merged model written to {out}")
    return 0


def merge_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    base_model: str | None = None,
    dtype: str = "float32",
    safe_merge: bool = True,
    trust_remote_code: bool = False,
) -> None:
    """Write ``adapter_dir``'s adapter merged into its base model to ``out_dir`` (replaced if present)."""
    from peftkit.auto import load_adapter_with_base
    from peftkit.io import atomic_dir
    from peftkit.models import parse_dtype
    from peftkit.serialization import check_finite_adapter, resolve_adapter_dir

    directory = resolve_adapter_dir(adapter_dir)
    read_adapter_config(directory)  # a run directory: "did you mean RUN/adapter?"
    check_finite_adapter(directory, "merge")  # before the base model loads
    peft_model, tokenizer = load_adapter_with_base(
        directory, base_model=base_model, task=None, dtype="float32", trust_remote_code=trust_remote_code
    )
    try:
        model = peft_model.merge_and_unload(safe_merge=safe_merge)
    except ValueError as err:  # e.g. merged weights that overflow to inf (safe_merge); nothing written
        raise PeftkitError(f"cannot merge {adapter_dir}: {err}") from err
    _set_label_names(model.config, directory)
    model.to(parse_dtype(dtype))
    model.config.dtype = parse_dtype(dtype)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def _set_label_names(config: Any, adapter_dir: Path) -> None:
    """Name a classifier's labels as training did (its task file), not transformers' LABEL_0, ..."""
    from peftkit.tasks import load_task

    labels = load_task(adapter_dir).labels
    if labels and len(labels) == config.num_labels:
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
