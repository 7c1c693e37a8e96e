"""``prunekit`` command line: a thin shell over the Python API.

This module only builds the parser (one module of :mod:`prunekit.cli` per command, each
with ``add_parser``; shared helpers in :mod:`prunekit.cli.common`) and dispatches. Every
command prints one clear line and exits non-zero on bad input; runs write their outputs
into ``--out`` atomically, never deleting what is already there.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn, Sequence

from prunekit.cli import analyze, demo, export, finetune, graph, pareto, profile, prune, train
from prunekit.cli import eval as eval_command
from prunekit.cli.common import CliError
from prunekit.errors import PruningError

__all__ = ["main", "build_parser"]

COMMANDS = (prune, profile, graph, demo, train, finetune, eval_command, export, analyze, pareto)
"""The command modules, in the order ``prunekit --help`` lists them."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, ``prunekit <cmd>: error: <message>``,
    like every other CLI error (argparse would print the whole usage first); sub-parsers
    inherit the class."""

    def error(self, message: str) -> NoReturn:
        """Print ``<prog>: error: <message>`` on stderr and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``prunekit`` command (one sub-command per job)."""
    parser = Parser(prog="prunekit", description="Structured pruning for PyTorch models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``prunekit`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except (CliError, FileNotFoundError, PruningError) as exc:  # the user's input: one line, no traceback
        print(f"prunekit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prunekit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
