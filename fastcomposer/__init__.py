"""FastComposer Studio: tuning-free multi-subject image generation (Xiao et al., 2023, arXiv 2305.10431).

    >>> from fastcomposer import load_pipeline
    >>> pipe = load_pipeline()                      # or load_pipeline("tiny") for a random preview model
    >>> out = pipe("a man img hiking", [photo], alpha=0.75, generator=torch.Generator().manual_seed(1))

Heavy modules (torch, diffusers) are imported on first use, so `import fastcomposer` is cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "load_pipeline": "loader",
    "FastComposerPipeline": "pipeline",
    "FastComposerPipelineOutput": "pipeline",
    "PostfuseModule": "model",
    "parse_prompt": "prompt",
    "load_tokenizer": "prompt",
    "load_image": "images",
    "SETTINGS": "config",
}

if TYPE_CHECKING:
    from .config import SETTINGS
    from .images import load_image
    from .loader import load_pipeline
    from .model import PostfuseModule
    from .pipeline import FastComposerPipeline, FastComposerPipelineOutput
    from .prompt import load_tokenizer, parse_prompt


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
