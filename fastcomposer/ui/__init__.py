"""The web app (Gradio 6), in sections: photos, settings, insight, results, the run handlers, ZeroGPU, start-up.

    page.py      create_demo: assembles the sections and wires their events
    photos.py    photo slots (1-4 photos per subject), crop previews, reordering
    crops.py     what the encoder sees of each photo, and the preview with the crop drawn on it
    settings.py  prompt, Speed (presets), LoRA and the Advanced settings
    insight.py   what the model did: attention maps, identity scores, alpha sweeps
    results.py   gallery, seed, status line, restoring settings from a PNG
    run.py       the Generate and Stop handlers
    gpu.py       where a run executes: this process or a ZeroGPU worker (spaces.GPU)
    server.py    options, loading (or the preview model), launch, main
    texts.py     what the page says; the example photos

Importing this package loads no model and imports neither torch nor diffusers.
"""

from .page import create_demo
from .server import build_parser, launch, load_or_preview, main
from .texts import EXAMPLES, MAX_SLOTS, find_assets

__all__ = ["EXAMPLES", "MAX_SLOTS", "build_parser", "create_demo", "find_assets", "launch", "load_or_preview", "main"]
