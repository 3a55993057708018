"""``peftkit`` command line: one subcommand per module in this package.

Each command module exposes ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train": "peftkit.cli.train",
    "eval": "peftkit.cli.evaluate",
    "generate": "peftkit.cli.generate",
    "chat": "peftkit.cli.chat",
    "inspect": "peftkit.cli.inspect",
    "combine": "peftkit.cli.combine",
    "merge": "peftkit.cli.merge",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftkit", description="Fine-tune transformer models with PEFT methods."
    )
    from peftkit import __version__

    parser.add_argument("--version", action="version", version=f"peftkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from peftkit.configuration import ConfigError
    from peftkit.errors import PeftkitError

    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ConfigError, PeftkitError) as err:
        print(f"peftkit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"peftkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
