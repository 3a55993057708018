"""peftkit label-pairs: offline RLAIF, preference pairs from a model's own answers and the judges.

    peftkit label-pairs CONFIG.yaml --out pairs.jsonl [--adapter DIR] [--num-generations K]
        [--limit N] [--split train|validation|test] [--resume | --overwrite] [--set key=value ...]

CONFIG is a peftkit job YAML: ``base_model``, ``data`` (``format: prompt`` rows), ``reward``
(the judges), ``sampling`` and ``training.seed`` are read; its objective may be any (it is
validated as online_dpo). Each prompt gets K sampled answers; the best and the worst by the
judges' score become a ``preference`` row that ``objective: dpo`` trains on. See
:mod:`peftkit.rlaif.label_pairs`. Notes, progress and the summary go to stderr.
"""

from __future__ import annotations

import argparse
import sys

HELP = "Sample answers to prompts, score them with the config's judges, and write DPO preference pairs."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from peftkit.cli._model_args import add_model_arguments
    from peftkit.cli.train import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument(
        "--out", required=True, metavar="FILE", help="The pairs, as JSON lines (format preference)."
    )
    add_model_arguments(parser)
    # The model options default to the config: base_model, training.device / precision / num_threads.
    parser.set_defaults(device=None)
    helps = {
        "--base-model": "the model that answers (default: the config's base_model); --adapter is applied to it",
        "--device": "cpu, cuda, cuda:1, mps, or auto (default: the config's training.device)",
        "--precision": "how the model (and the model judges) compute: bf16 autocast, fp32, or auto = bf16 "
        "where the device computes it natively (default: the config's training.precision)",
        "--threads": "CPU threads (default: the config's training.num_threads)",
    }
    for option, text in helps.items():
        parser._option_string_actions[option].help = text
    parser.add_argument(
        "--split",
        choices=["train", "validation", "test"],
        default="train",
        help="The config's data split whose prompts are labelled (default: train).",
    )
    parser.add_argument(
        "--num-generations",
        type=int,
        metavar="K",
        help="Answers sampled per prompt (default: the config's sampling.num_generations; at least 2).",
    )
    parser.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="Label only the first N prompts of the split (a later --resume with a larger or no limit "
        "continues).",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="Continue an interrupted or --limit-ed run on --out (refused if the settings differ).",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --out.")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")


def run(args: argparse.Namespace) -> int:
    from peftkit.rlaif.label_pairs import label_pairs, load_label_job

    job = load_label_job(args.config, args.overrides)  # validated before any model loads
    report = label_pairs(
        job,
        args.out,
        adapter=args.adapter,
        base_model=args.base_model,
        num_generations=args.num_generations,
        split=args.split,
        limit=args.limit,
        resume=args.resume,
        overwrite=args.overwrite,
        device=args.device,
        precision=args.precision,
        dtype=args.dtype,
        threads=args.threads,
        trust_remote_code=args.trust_remote_code,
        progress=not args.no_progress,
    )
    print(report.summary(), file=sys.stderr)
    return 0
