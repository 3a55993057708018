"""peftkit train CONFIG.yaml [--set key=value ...] [--resume]"""

from __future__ import annotations

import argparse

HELP = "Fine-tune a model as described by a YAML config."


def add_config_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """The CONFIG positional and --set overrides, shared by the commands that read a job config."""
    parser.add_argument("config", nargs=None if required else "?", help="YAML job config (see examples/).")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override a config value, e.g. --set training.max_steps=50 --set lora.r=8 (repeatable).",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--resume", action="store_true", help="Continue from the newest checkpoint in output_dir."
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an earlier run in output_dir.")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")


def run(args: argparse.Namespace) -> int:
    from peftkit.train.config import load_job_config

    job = load_job_config(args.config, args.overrides)  # validated before any model loads
    from peftkit.train.loop import run_training

    run_training(job, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    return 0
