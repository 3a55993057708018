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
    "score": "peftkit.cli.score",
    "label-pairs": "peftkit.cli.label_pairs",
    "serve": "peftkit.cli.serve",
    "export": "peftkit.cli.export",
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
    except OSError as err:  # the disk or file system refused (full, read-only, no permission, ...)
        print(f"peftkit {args.command}: error: {os_error_message(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"peftkit {args.command}: interrupted", file=sys.stderr)
        return 130


def os_error_message(err: OSError) -> str:
    """One line for an operating-system error: what failed, on which path, and the errno name."""
    import errno

    reason = err.strerror or str(err) or type(err).__name__
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    where = f" ({' -> '.join(paths)})" if paths else ""
    code = f" [{errno.errorcode.get(err.errno, err.errno)}]" if err.errno else ""
    return f"{reason}{where}{code}".replace("\n", " ")


if __name__ == "__main__":
    sys.exit(main())
