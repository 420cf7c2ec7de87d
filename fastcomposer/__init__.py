"""FastComposer Studio: tuning-free multi-subject image generation (Xiao et al., 2023, arXiv 2305.10431).

    >>> from fastcomposer import load_pipeline
    >>> pipe = load_pipeline()                      # or load_pipeline("tiny") for a random preview model
    >>> out = pipe("a man img hiking", [photo], alpha=0.75, generator=torch.Generator().manual_seed(1))

The package is layered in the order a request flows; each sub-package may import only those before it:

    config, messages, downloads   the shared floor: defaults and limits, per-audience messages, cached downloads
    inputs/                       safe image loading, face detection and crops, prompt markers
    models/                       architecture configs, checkpoint reading, weight sources, the post-fuse MLP, LoRAs
    pipeline/                     FastComposerPipeline and what plugs into its loop: samplers, presets, caching,
                                  attention capture, layout masks, previews; `load_pipeline`
    identity/                     whose face is in an image: face embeddings, matching, the identity report
    generation/                   one request end to end: validation, streaming, sweeps, metadata, estimates
    evaluation/                   the paper's evaluation protocol over cases and variants
    ui/                           the web page (Gradio)
    commands/                     `python -m fastcomposer generate | batch | evaluate | convert | serve`

Heavy modules (torch, diffusers) are imported on first use, so `import fastcomposer` is cheap. Modules that
lived at the top before the layers (`fastcomposer.lora`, `fastcomposer.faces`, `fastcomposer.loader`, ...) still
import, as the same module objects as their new homes (see `MOVED`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING

from .config import VERSION

__version__ = VERSION

_EXPORTS = {
    "load_pipeline": "pipeline.loading",
    "FastComposerPipeline": "pipeline.pipeline_fastcomposer",
    "FastComposerPipelineOutput": "pipeline.pipeline_fastcomposer",
    "PostfuseModule": "models.postfuse",
    "parse_prompt": "inputs.prompt",
    "load_tokenizer": "inputs.prompt",
    "load_image": "inputs.images",
    "GenerationRequest": "generation.run",
    "generate": "generation.run",
    "SETTINGS": "config",
}

# Old module path -> its home since the package was layered. `import fastcomposer.lora` gives the very module
# object `fastcomposer.models.lora`, so code that imports or patches the old path keeps working.
MOVED = {
    "images": "inputs.images",
    "faces": "inputs.faces",
    "prompt": "inputs.prompt",
    "architecture": "models.architecture",
    "checkpoint": "models.checkpoint",
    "weights": "models.weights",
    "model": "models.postfuse",
    "lora": "models.lora",
    "testing": "models.testing",
    "schedulers": "pipeline.schedulers",
    "presets": "pipeline.presets",
    "caching": "pipeline.caching",
    "attention": "pipeline.attention",
    "previews": "pipeline.previews",
    "loader": "pipeline.loading",
    "streaming": "generation.streaming",
    "sweep": "generation.sweep",
    "metadata": "generation.metadata",
    "estimate": "generation.estimate",
    "hints": "generation.hints",
    "evaluate": "evaluation.runner",
    "evaluation_report": "evaluation.report",
    "cli": "commands.main",
    "batch": "commands.batch",
    "jobs": "commands.jobs",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers imports of the old module paths with the modules at their new homes.

    Written out because no library does this: a finder on `sys.meta_path` that only knows the names in `MOVED`.
    The import system stamps the alias's spec on the module it gets, so `exec_module` puts the real one back.
    """

    def find_spec(self, fullname: str, path=None, target=None):
        package, _, leaf = fullname.partition(".")
        if package != __name__ or leaf not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(f"{__name__}.{MOVED[spec.name.partition('.')[2]]}")
        spec.loader_state = module.__spec__  # the real spec, put back in `exec_module`
        return module

    def exec_module(self, module) -> None:
        real = module.__spec__.loader_state
        if real is not None:
            module.__spec__ = real


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())


if TYPE_CHECKING:
    from .config import SETTINGS
    from .generation.run import GenerationRequest, generate
    from .inputs.images import load_image
    from .inputs.prompt import load_tokenizer, parse_prompt
    from .models.postfuse import PostfuseModule
    from .pipeline.loading import load_pipeline
    from .pipeline.pipeline_fastcomposer import FastComposerPipeline, FastComposerPipelineOutput


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in MOVED:  # `fastcomposer.lora` as an attribute, like `from fastcomposer import lora`
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
