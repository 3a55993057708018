"""peftkit train CONFIG.yaml [--set key=value ...] [--resume]"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from peftkit.errors import PeftkitError

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
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="Train data-parallel in N processes on this machine: starts `torchrun --standalone "
        "--nproc_per_node N -m peftkit train ...` (one process per GPU; gloo on CPU).",
    )


def torchrun_command(args: argparse.Namespace) -> list[str]:
    """The torchrun command line that runs this same `peftkit train` in ``args.nproc`` processes."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
    ]
    command += ["-m", "peftkit", "train", args.config]
    for override in args.overrides:
        command += ["--set", override]
    command += [flag for flag, on in [("--resume", args.resume), ("--overwrite", args.overwrite)] if on]
    if args.no_progress:
        command.append("--no-progress")
    return command


def run(args: argparse.Namespace) -> int:
    from peftkit.train.config import load_job_config

    job = load_job_config(args.config, args.overrides)  # validated before any model loads
    if args.nproc is not None:
        if args.nproc < 1:
            raise PeftkitError(f"--nproc must be at least 1, got {args.nproc}")
        if "WORLD_SIZE" in os.environ:
            raise PeftkitError("--nproc starts torchrun itself: drop it when launching under torchrun")
        if args.nproc > 1:
            return subprocess.run(torchrun_command(args)).returncode
    from peftkit.train.loop import run_training

    train = run_training
    if "TORCHELASTIC_ERROR_FILE" in os.environ:  # under torchrun: its failure summary shows our error
        from torch.distributed.elastic.multiprocessing.errors import record

        train = record(run_training)
    train(job, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    return 0
