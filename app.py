"""FastComposer Studio: the web app (Gradio 6). The page lives in `fastcomposer/ui/`; this file starts it.

    python app.py                      # http://127.0.0.1:7860, weights downloaded on first start
    python app.py --weights tiny       # a preview on random weights (no download)
    python app.py --public             # listen on 0.0.0.0 with public-server settings
    python -m fastcomposer serve ...   # the same, for an installed package

Nothing is loaded at import: `create_demo(get_pipeline, ...)` builds the page around a pipeline
factory, so tests can build it around the tiny model.
"""

from __future__ import annotations

from fastcomposer.ui import EXAMPLES, MAX_SLOTS, build_parser, create_demo, find_assets, launch, load_or_preview, main

__all__ = ["EXAMPLES", "MAX_SLOTS", "build_parser", "create_demo", "find_assets", "launch", "load_or_preview", "main"]

if __name__ == "__main__":
    main()
