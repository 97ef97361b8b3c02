"""The ``nl-rewrite`` command. Each subcommand lives in its own module, which defines
``add_parser(subparsers)``; the parser's ``func`` default receives the parsed args and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from nl_rewrite.cli.parsing import ConfigParser
from nl_rewrite.errors import NLRewriteError

# module path for each subcommand, in the order shown by --help
COMMANDS = [
    "nl_rewrite.cli.run",
    "nl_rewrite.cli.generate",
    "nl_rewrite.cli.evaluate",
    "nl_rewrite.cli.compare",
    "nl_rewrite.cli.layers",
    "nl_rewrite.cli.cache",
    "nl_rewrite.cli.explain",
    "nl_rewrite.cli.score",
    "nl_rewrite.cli.serve",
    "nl_rewrite.cli.train",
    "nl_rewrite.cli.train_simulator",
]


def command_name(module: str) -> str:
    """The subcommand a module in :data:`COMMANDS` defines: ``nl_rewrite.cli.train_simulator`` → ``train-simulator``."""
    return module.rsplit(".", 1)[1].replace("_", "-")


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser for ``argv``: when it names a subcommand, only that subcommand's module is imported (the others'
    imports would cost seconds at every start, in every torchrun worker); otherwise all of them, for the listing."""
    parser = argparse.ArgumentParser(prog="nl-rewrite", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # each subcommand's options come from config dataclasses, checked while parsing (nl_rewrite.cli.parsing)
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=ConfigParser)
    # the command is the first word: the top level's options take no value. `--help train` lists every command.
    first = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), len(argv))
    command = argv[first] if first < len(argv) and not {"-h", "--help"} & set(argv[:first]) else None
    named = [module for module in COMMANDS if command_name(module) == command]
    for module in named or COMMANDS:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0), or a usage error already printed (2): options are checked here
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None) * 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (NLRewriteError, ValueError) as exc:
        print(f"nl-rewrite {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nl-rewrite {args.command}: interrupted; finished work is saved, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
