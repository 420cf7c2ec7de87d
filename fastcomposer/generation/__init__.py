"""One generation request, end to end: what the page, the command line and Python all call.

- `request`: `GenerationRequest`, `GenerationResult` and `validate`, with messages for every audience;
- `run`: `generate`, from checked request to PNGs with their settings;
- `streaming`: a run as a stream of step, preview and result events (the web app, ZeroGPU);
- `sweep`: alpha sweeps and labelled grids; `metadata`: settings inside each PNG;
- `estimate`: how long a run takes; `hints`: the live prompt hint.

May import: the shared floor, `inputs`, `models`, `pipeline` and `identity`.
"""

import lazy_loader

# Public names, by the module that defines them; imported on first use, so importing the package stays cheap.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "request": ["GenerationError", "GenerationRequest", "GenerationResult", "validate"],
        "run": ["generate", "prepare_subjects"],
        "streaming": ["stream_generation", "stream_sweep"],
        "sweep": ["alpha_sweep"],
        "metadata": ["GenerationRecord", "read_record", "save_png"],
    },
)
