"""peftkit eval: loss / perplexity and answer accuracy by generation on held-out data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "Evaluate a base model or base + adapter: loss, perplexity and accuracy by generation."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from peftkit.cli._model_args import add_model_arguments
    from peftkit.cli.train import add_config_arguments

    add_config_arguments(parser, required=False)
    add_model_arguments(parser)
    parser.add_argument("--data", metavar="FILE", help="Evaluate on this file instead of the config's split.")
    parser.add_argument(
        "--split", choices=["test", "validation"], default="test", help="Config split (default: test)."
    )
    parser.add_argument("--no-adapter", action="store_true", help="Evaluate the base model alone.")
    parser.add_argument(
        "--max-new-tokens", type=int, help="Tokens generated per prompt (default: the config's)."
    )
    parser.add_argument("--batch-size", type=int, help="Examples per batch (default: the config's).")
    parser.add_argument("--json", metavar="FILE", help="Also write the results as JSON to FILE.")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from peftkit.cli._model_args import load_model_from_args
    from peftkit.data import load_split
    from peftkit.evaluation import evaluate_generation, evaluate_loss
    from peftkit.io import write_json
    from peftkit.models import bf16_supported
    from peftkit.train.config import build_job_config, load_job_config

    job = load_job_config(args.config, args.overrides) if args.config else build_job_config({})
    data_cfg = job.data
    split = args.split
    if args.data:
        data_cfg = dataclasses.replace(
            data_cfg, train=None, validation=None, test=args.data, test_size=None, val_size=None
        )
        split = "test"
    if args.no_adapter:
        args.adapter = None
    elif args.adapter is None and args.config and (Path(job.output_dir) / "adapter").is_dir():
        args.adapter = str(Path(job.output_dir) / "adapter")
    if args.base_model is None and not args.adapter:
        args.base_model = job.base_model
    args.trust_remote_code = args.trust_remote_code or job.trust_remote_code

    model, tokenizer = load_model_from_args(args)
    examples = load_split(data_cfg, tokenizer, split, seed=job.training.seed)
    device = next(model.parameters()).device
    autocast_dtype = None
    if job.training.precision != "fp32" and bf16_supported(device):
        import torch

        autocast_dtype = torch.bfloat16
    batch_size = args.batch_size or job.evaluation.batch_size
    what = f"{'base + adapter ' + args.adapter if args.adapter else 'base model'} on {len(examples)} {split} examples"
    print(f"Evaluating {what}")
    results: dict = {"split": split, "adapter": args.adapter, "n": len(examples)}
    results.update(
        evaluate_loss(
            model,
            examples,
            batch_size=batch_size,
            pad_token_id=tokenizer.pad_token_id,
            autocast_dtype=autocast_dtype,
        )
    )
    print(
        f"loss {results['loss']:.4f}  perplexity {results['perplexity']:.3f}  ({results['tokens']} label tokens)"
    )
    if any(e.answer is not None for e in examples):
        gen = evaluate_generation(
            model,
            tokenizer,
            examples,
            max_new_tokens=args.max_new_tokens or job.evaluation.max_new_tokens,
            batch_size=batch_size,
            match=job.evaluation.match,
            autocast_dtype=autocast_dtype,
        )
        results["accuracy"] = gen["accuracy"]
        results["accuracy_n"] = gen["n"]
        print(f"accuracy ({job.evaluation.match} match) {gen['accuracy']:.3f} on {gen['n']} examples")
        for sample in gen["samples"][: job.evaluation.show_samples]:
            print(f"  {sample.prediction!r} (expected {sample.answer!r})")
    if args.json:
        write_json(args.json, results)
    else:
        print(json.dumps({k: v for k, v in results.items() if k != "adapter"}))
    return 0
