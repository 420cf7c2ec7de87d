"""`python -m fastcomposer serve [app options]`: the web app, for an installed package (without app.py)."""

from __future__ import annotations


def add_parser(sub) -> None:
    # `serve` hands its arguments to the web app's own parser (see `main.main`); listed here for --help
    sub.add_parser("serve", help="start the web app (the options of `python app.py --help`)", add_help=False)


def run(argv: list[str]) -> int:
    """`python -m fastcomposer serve [app options]`: the web app without app.py (for an installed package)."""
    from ..ui.server import main as serve

    serve(argv, prog="python -m fastcomposer serve")
    return 0
