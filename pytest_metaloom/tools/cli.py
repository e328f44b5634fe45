"""The ``metaloom`` command: operator tools, one subcommand per module.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``. Only the chosen subcommand's module is imported, so one command's heavy or
missing dependencies never slow down or break another. To add a subcommand, add one row to
``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NamedTuple


class Command(NamedTuple):
    name: str
    module: str
    help: str


COMMANDS: tuple[Command, ...] = (
    Command("budget", "pytest_metaloom.tools.budget_cmd", "will model + prompt cache + KV fit?"),
    Command("classify", "pytest_metaloom.tools.classify_cmd", "name the failure in a crash log"),
    Command("patchset", "pytest_metaloom.tools.patchset_cmd", "validate and apply a patch set"),
)

EXIT_USAGE = 2


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


def _chosen(argv: Sequence[str]) -> Command | None:
    names = {c.name: c for c in COMMANDS}
    for token in argv:
        if not token.startswith("-"):
            return names.get(token)
    return None


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser, with full arguments only for the subcommand named in ``argv``."""
    parser = argparse.ArgumentParser(
        prog="metaloom",
        description="Operator tools for mlx_lm.server under Metal out-of-memory.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = _chosen(argv)
    for command in COMMANDS:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        if command is chosen:
            module = importlib.import_module(command.module)
            module.add_arguments(sub)
            sub.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``metaloom`` console script; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list)
    args = parser.parse_args(args_list)
    try:
        return int(args._run(args))
    except (CommandError, ValueError, OSError) as exc:
        print(f"metaloom {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"metaloom {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"{exc.filename}: no such file: check the path"
    if isinstance(exc, IsADirectoryError) and exc.filename:
        return f"{exc.filename} is a directory: pass a file"
    if isinstance(exc, PermissionError) and exc.filename:
        return f"{exc.filename}: permission denied: check the file's permissions"
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
