"""Command line: `python -m fastcomposer generate ...`, `batch JOBS.jsonl --output DIR`, `convert IN OUT`,
`evaluate CASES_DIR --output DIR` and `serve` (the web app, with app.py's options).

User errors (bad files, prompts, settings, missing weights) exit with status 2 and one line on
stderr. Results (the seed and the files written) go to stdout. Each command lives in a module of its own with
`add_parser(subparsers)` and `run(args)`; this one only puts them together.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import batch, convert, evaluate, generate, serve
from .options import CLI_LIMITS, Parser, UserError  # noqa: F401  (CLI_LIMITS: the old `fastcomposer.cli.CLI_LIMITS`)

COMMANDS = {"generate": generate, "batch": batch, "evaluate": evaluate, "convert": convert, "serve": serve}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m fastcomposer", description="FastComposer: multi-subject image generation.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # the app parses its own options (and prints its own --help)
        return serve.run(argv[1:])
    try:
        args = build_parser().parse_args(argv)
        level = logging.INFO if args.verbose else logging.WARNING
        logging.basicConfig(level=level, format="%(levelname)s %(message)s")
        return COMMANDS[args.command].run(args)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
