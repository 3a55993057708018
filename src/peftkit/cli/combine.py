"""peftkit combine: several LoRA adapters of one base model -> one new adapter (PEFT format).

    ADAPTER_DIR ... ─► base model (from the first adapter's adapter_config.json)
                   ─► load each adapter ─► add_weighted_adapter(--weights, --type) ─► --out

The combined adapter is written as the "default" adapter of ``--out``, atomically, so
``PeftModel.from_pretrained(base, OUT)`` -- in peftkit or PEFT -- loads it. A non-empty ``--out``
is replaced only with ``--overwrite``, and never when it is, holds or lies inside an input adapter.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.io import check_out_dir
from peftkit.loading import adapter_base_model, read_adapter_config
from peftkit.methods.lora.weighted import COMBINATION_TYPES

HELP = "Combine LoRA adapters of one base model into a new adapter (PEFT's add_weighted_adapter)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR", help="adapter directories to combine")
    parser.add_argument(
        "--weights", nargs="+", type=float, required=True, metavar="W", help="one weight per adapter"
    )
    parser.add_argument(
        "--type",
        dest="combination_type",
        choices=COMBINATION_TYPES,
        default="svd",
        help="how to combine (default: svd); cat and svd are exact up to --svd-rank, linear is rough",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="OUT_DIR",
        help="directory for the new adapter; a non-empty one is replaced only with --overwrite",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty OUT_DIR (never one that is, holds or is inside an ADAPTER_DIR)",
    )
    parser.add_argument(
        "--density",
        type=float,
        metavar="D",
        help="fraction of values kept by ties / dare_* / magnitude_prune*",
    )
    parser.add_argument(
        "--svd-rank",
        type=_positive_int,
        metavar="N",
        help="rank of *svd results, at most the smallest dimension of an adapted layer "
        "(default: the adapters' largest rank)",
    )
    parser.add_argument(
        "--majority-sign-method", choices=("total", "frequency"), default="total", help="for ties / dare_ties"
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow the model repository's own Python code to run"
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _check_adapters(dirs: list[str], weights: list[float]) -> str:
    """The shared base model of ``dirs``; errors for anything that cannot be combined."""
    if len(weights) != len(dirs):
        raise PeftkitError(
            f"got {len(weights)} weight(s) for {len(dirs)} adapter(s); give one --weights value each"
        )
    if not all(math.isfinite(w) for w in weights):
        raise PeftkitError(f"--weights must be finite numbers, got {' '.join(map(str, weights))}")
    bases = {}
    for directory in dirs:
        base = adapter_base_model(directory)  # also checks that adapter_config.json exists
        peft_type = read_adapter_config(directory).get("peft_type")
        if str(peft_type).upper() != "LORA":
            raise PeftkitError(f"only LoRA adapters can be combined; {directory} is a {peft_type} adapter")
        path = Path(base)
        bases[directory] = str(path.resolve()) if path.exists() else base
    if len(set(bases.values())) > 1:
        listing = ", ".join(f"{d}: {b}" for d, b in bases.items())
        raise PeftkitError(
            f"the adapters were trained on different base models ({listing}); combine adapters of one base model"
        )
    return adapter_base_model(dirs[0])


def run(args: argparse.Namespace) -> int:
    from peftkit import PeftModel
    from peftkit.configuration import ConfigError
    from peftkit.io import atomic_dir
    from peftkit.models import load_model_and_tokenizer
    from peftkit.preflight import writable_dir_problem
    from peftkit.serialization import check_finite_adapter

    out = Path(args.out)
    check_out_dir(out, args.adapters, overwrite=args.overwrite)
    if problem := writable_dir_problem(out, "--out"):
        raise ConfigError(problem, "command line")
    base = _check_adapters(args.adapters, args.weights)
    for directory in args.adapters:  # before the base model loads
        check_finite_adapter(directory, "combine")
    model, _ = load_model_and_tokenizer(base, trust_remote_code=args.trust_remote_code)
    names = [f"source_{i}" for i in range(len(args.adapters))]
    peft_model = PeftModel.from_pretrained(model, args.adapters[0], adapter_name=names[0])
    for name, directory in zip(names[1:], args.adapters[1:]):
        peft_model.load_adapter(directory, name)
    peft_model.add_weighted_adapter(
        names,
        args.weights,
        "default",  # saved into --out itself, not a subdirectory
        combination_type=args.combination_type,
        svd_rank=args.svd_rank,
        density=args.density,
        majority_sign_method=args.majority_sign_method,
    )
    with atomic_dir(out, overwrite=True) as tmp:  # checked above: new, empty or --overwrite
        peft_model.save_pretrained(tmp, selected_adapters=["default"])
    config = peft_model.peft_config["default"]
    print(f"wrote {args.combination_type} combination (r={config.r}) of {len(names)} adapters to {args.out}")
    return 0
