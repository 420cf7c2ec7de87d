"""The command line: `python -m fastcomposer generate | batch | evaluate | convert | serve`.

- `main`: the parser and the dispatch to each command;
- `options`: the flags every command shares, the command line's limits and `UserError`;
- `generate`, `batch`, `jobs`, `evaluate`, `convert`, `serve`: one command each (`jobs` reads batch's file).

Commands import `options`, never each other's modules, so nothing imports back. May import every layer,
`ui` included (`serve` starts the web app).
"""

import lazy_loader

# Public names, by the module that defines them; imported on first use, so importing the package stays cheap.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "main": ["build_parser", "main"],
    },
)
