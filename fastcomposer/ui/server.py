"""Start-up: options, loading the model (or the preview), compiling and warming it up, serving the page.

    python app.py [options]              # from the repository (what a Space runs)
    python -m fastcomposer serve [options]   # the same, from an installed package
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import gradio as gr

from ..config import SETTINGS, Settings
from ..generation.estimate import is_zerogpu
from ..pipeline.presets import PRESET_ENV, PRESETS
from .mcp import PRIVATE_URLS_ENV, return_every_output, skip_empty_outputs
from .texts import REPO_ROOT, page_css, page_theme

logger = logging.getLogger("fastcomposer.app")

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # fastcomposer/: never served
WARMUP_STEPS = 3  # enough for torch.compile to trace and record the UNet's CUDA graphs at the default size


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    return None if not value else value in ("1", "true", "yes", "on")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog=prog, description="FastComposer Studio web app")
    p.add_argument("--weights", default=env("FASTCOMPOSER_WEIGHTS"), metavar="PATH|tiny",
                   help="checkpoint file or converted folder; 'tiny' for a preview (default: download) "
                   "[FASTCOMPOSER_WEIGHTS]")
    p.add_argument("--device", default=env("FASTCOMPOSER_DEVICE", "auto"), choices=["auto", "cpu", "cuda", "mps"],
                   help="[FASTCOMPOSER_DEVICE]")
    p.add_argument("--dtype", default=env("FASTCOMPOSER_DTYPE", "auto"), choices=["auto", "fp32", "fp16", "bf16"],
                   help="[FASTCOMPOSER_DTYPE]")
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help=f"the page's default Speed (default: fast on a CPU, original on a GPU) [{PRESET_ENV}]")
    p.add_argument("--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"), help="address to listen on")
    p.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", "7860")), help="port")
    p.add_argument("--share", action="store_true", help="also make a temporary public gradio.live link")
    p.add_argument("--public", action="store_true", default=bool(env("SPACE_ID")) or env("FASTCOMPOSER_PUBLIC") == "1",
                   help="public-server mode: listen on 0.0.0.0, hide internal errors [FASTCOMPOSER_PUBLIC=1]")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=_env_flag("FASTCOMPOSER_COMPILE"),
                   help="CUDA only: compile the UNet and warm it up at start-up (about a minute, then ~3x faster "
                   "steps at one image); default: on in public mode and on Spaces with a CUDA GPU, off elsewhere "
                   "and on ZeroGPU [FASTCOMPOSER_COMPILE=1/0]")
    p.add_argument("--no-safety-checker", action="store_true",
                   help="do not filter images (logs a warning) [FASTCOMPOSER_DISABLE_SAFETY=1]")
    p.add_argument("--mcp", action=argparse.BooleanOptionalAction, default=_env_flag("FASTCOMPOSER_MCP"),
                   help="also serve the MCP tool `compose` for AI assistants at /gradio_api/mcp/ (default: on in a "
                   "Space, off elsewhere) [FASTCOMPOSER_MCP=1/0]")
    p.add_argument("--allow-private-urls", action="store_true", default=_env_flag(PRIVATE_URLS_ENV) or False,
                   help="the MCP tool may also fetch photos from loopback and private addresses (a local server "
                   f"only; public servers fetch public addresses only) [{PRIVATE_URLS_ENV}=1]")
    return p


def mcp_wanted(args: argparse.Namespace) -> bool:
    """--mcp / --no-mcp when given; otherwise on in a Space (where the Hub shows the MCP badge), off elsewhere."""
    wanted = getattr(args, "mcp", None)
    return bool(os.environ.get("SPACE_ID")) if wanted is None else bool(wanted)


def should_compile(args: argparse.Namespace) -> bool:
    """--compile / --no-compile when given; otherwise in public (and Space) mode on a CUDA GPU, not on ZeroGPU.

    A ZeroGPU worker is a fresh fork each time it starts: it would pay the compilation again and again.
    """
    from ..pipeline.loading import pick_device

    wanted = getattr(args, "compile", None)
    if wanted is not None:
        return bool(wanted)
    if is_zerogpu() or not getattr(args, "public", False):
        return False
    try:
        return pick_device(args.device).type == "cuda"
    except ValueError:
        return False


def warm_up(pipe, settings: Settings = SETTINGS) -> None:
    """One short generation at the default size, so compilation happens now and not on the first visitor."""
    import time

    import PIL.Image

    from ..generation.run import GenerationRequest, generate

    d = settings.defaults
    photo = PIL.Image.new("RGB", (256, 256), (128, 128, 128))
    request = GenerationRequest(prompt="a photo of a person img", images=[photo], num_inference_steps=WARMUP_STEPS,
                                height=d.height, width=d.width, scheduler="dpm", face_crop=False, seed=0)
    started = time.monotonic()
    generate(pipe, request, limits=settings.limits)
    logger.info("warm-up generation done in %.0f s", time.monotonic() - started)


def load_or_preview(args: argparse.Namespace) -> tuple[object, str | None]:
    """The real pipeline, or the tiny preview model plus a banner that says why and how to fix it."""
    from ..messages import message_for
    from ..models.checkpoint import CheckpointError
    from ..models.weights import WeightsUnavailableError
    from ..pipeline.loading import load_pipeline

    safety = not (args.no_safety_checker or os.environ.get("FASTCOMPOSER_DISABLE_SAFETY") == "1")
    if not safety:
        logger.warning("the safety checker is turned off (--no-safety-checker / FASTCOMPOSER_DISABLE_SAFETY=1)")
    # ZeroGPU's main process has no GPU to measure free memory on: offload would ask it, and fail
    common = dict(device=args.device, dtype=args.dtype, **({"offload": False} if is_zerogpu() else {}))
    if args.weights == "tiny":
        return load_pipeline("tiny", safety_checker=False, **common), (
            "Running on tiny random weights (--weights tiny): images are noise. Start without --weights tiny to "
            "use the real model.")
    compile_unet = should_compile(args)
    try:
        pipe = load_pipeline(args.weights, safety_checker=safety, compile=compile_unet, **common)
    except (WeightsUnavailableError, CheckpointError) as e:
        logger.error("real weights unavailable: %s", e)
        # The reason names what is missing (the checkpoint or the safety checker) and how to supply it.
        return load_pipeline("tiny", safety_checker=False, **common), (
            f"The real model could not be loaded, so this page runs on tiny random weights and images are noise. "
            f"Why, and how to fix it: {message_for(e, 'page')}")
    if compile_unet:
        warm_up(pipe)
    return pipe, None


def hardware_of(pipe):
    """Where `pipe` runs, for the page's estimates."""
    import torch

    from ..generation.estimate import Hardware

    module = getattr(pipe, "unet", None)
    if not isinstance(module, torch.nn.Module):
        from .page import detect_hardware

        return detect_hardware()
    parameter = next(module.parameters())
    dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(parameter.dtype, "fp32")
    device = "zerogpu" if is_zerogpu() else parameter.device.type
    return Hardware(device, dtype, torch.get_num_threads())


def launch(demo: gr.Blocks, args: argparse.Namespace, settings: Settings = SETTINGS, **kwargs) -> None:
    """Queue and serve `demo` with the limits in `settings` (see README, "Limits and safety")."""
    from ..models.weights import cache_dir
    from ..pipeline.overlays import SUBJECT_COLOURS

    server = settings.server
    demo.queue(max_size=server.queue_max_size, default_concurrency_limit=1, api_open=False)
    bound_queue(demo)
    blocked = [str(cache_dir()), str(Path.home() / ".cache" / "huggingface"), str(PACKAGE_DIR),
               str(REPO_ROOT / "app.py")]
    if args.weights and args.weights != "tiny":
        blocked.append(str(Path(args.weights).expanduser().resolve()))
    assets = getattr(demo, "assets_dir", None)
    mcp = kwargs.pop("mcp_server", mcp_wanted(args))
    if mcp:
        return_every_output()
        skip_empty_outputs()
    demo.launch(
        server_name="0.0.0.0" if args.public and args.host == "127.0.0.1" else args.host,
        server_port=args.port,
        share=args.share,
        show_error=not args.public,  # public: only gr.Error messages reach users, never tracebacks
        max_file_size=settings.limits.max_file_size,
        allowed_paths=[*([str(assets)] if assets else []), *kwargs.pop("allowed_paths", [])],  # extras: tests
        blocked_paths=blocked,
        css=kwargs.pop("css", page_css(SUBJECT_COLOURS)),
        theme=kwargs.pop("theme", page_theme()),
        mcp_server=mcp,
        **kwargs,
    )


def bound_queue(demo: gr.Blocks) -> None:
    """Make the queue's `max_size` a real bound: at most that many requests wait (the running one aside).

    Gradio 6.31 checks the bound when a request joins, then awaits the request's validator, then appends it. Joins
    arriving together all pass the check before any is appended: 40 at once left 24 waiting behind a bound of 16.
    Joins are therefore taken one at a time here, check, validator and append together. A validator takes
    milliseconds (it counts `img` markers), so a burst of joins waits that long, not a run's length.
    """
    import asyncio

    queue = demo._queue
    push = queue.push
    lock = asyncio.Lock()

    async def one_at_a_time(*args, **kwargs):
        async with lock:
            return await push(*args, **kwargs)

    queue.push = one_at_a_time


def caches_examples(banner: str | None) -> bool:
    """Examples are cached (lazily) on a Space with the real weights only: `banner` is None unless it is a preview."""
    return bool(os.environ.get("SPACE_ID")) and banner is None


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """Parse options, load, serve: `python app.py` and `python -m fastcomposer serve`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser(prog).parse_args(argv)
    if is_zerogpu():
        import spaces  # noqa: F401 - ZeroGPU patches torch at import, so it must come before CUDA is touched
    from .page import create_demo

    pipe, banner = load_or_preview(args)
    preset = (args.preset, "chosen with --preset") if args.preset else (None, None)
    demo = create_demo(lambda: pipe, banner, hardware=hardware_of(pipe), preset=preset[0], preset_reason=preset[1],
                       allow_private_urls=bool(args.allow_private_urls) and not args.public,
                       cache_examples=caches_examples(banner))
    launch(demo, args)
