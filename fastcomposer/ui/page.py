"""`create_demo`: the page, assembled from its sections, and the events between them.

Nothing is loaded here: the page is built around a pipeline factory, called on the first Generate (or
in a ZeroGPU worker), so tests can build it around the tiny model or a fake.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from ..config import SETTINGS, Settings
from ..generation.estimate import Estimator, Hardware
from .crops import SubjectLoader
from .examples import ExampleRun, build_examples
from .insight import InsightControls, build_insight
from .layout import LayoutControls, build_layout, wire_layout
from .mcp import ToolHandler, build_tool, not_a_tool
from .photos import PhotoSlots, build_photo_slots, wire_photo_slots
from .results import ResultsPanel, build_results, restore, zip_results
from .settings import SettingsControls, SpeedAdvice, build_settings, build_speed, wire_hint, wire_speed
from .texts import CONSENT, HOW_TO, find_assets

logger = logging.getLogger(__name__)


def detect_hardware() -> Hardware:
    """What `load_pipeline(device="auto", dtype="auto")` runs on here."""
    import torch

    from ..generation.estimate import is_zerogpu
    from ..pipeline.loading import pick_device, pick_dtype

    device = pick_device("auto")
    dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[pick_dtype("auto", device)]
    return Hardware("zerogpu" if is_zerogpu() else device.type, dtype, torch.get_num_threads())


def create_demo(
    get_pipeline: Callable[[], object],
    banner: str | None = None,
    settings: Settings = SETTINGS,
    cropper=None,
    *,
    hardware: Hardware | None = None,
    preset: str | None = None,
    preset_reason: str | None = None,
    assets: str | os.PathLike | None = "auto",
    allow_private_urls: bool = False,
    cache_examples: bool = False,
) -> gr.Blocks:
    """Build the page.

    Args:
        get_pipeline: returns the (cached) FastComposerPipeline; called on the first Generate.
        banner: a notice shown on top, e.g. why the app runs on preview weights.
        cropper: a `faces.FaceCropper`; the process-wide default when None.
        hardware: where the pipeline runs, for the time estimates and the default speed; detected when None.
        preset: the default Speed (`presets.PRESETS`); by default `presets.default_app_preset` for `hardware`.
        preset_reason: why that is the default, shown on the page (with `preset`).
        assets: the folder of bundled example photos; "auto" finds it (`texts.find_assets`), None hides examples.
        allow_private_urls: the MCP tool may fetch photos from loopback and private addresses (a local server).
        cache_examples: an example's result is made at its first click and then shown at once (`examples.py`);
            for a Space with the real weights (`server.main` decides).
    """
    from ..inputs.faces import default_cropper
    from ..inputs.prompt import load_tokenizer
    from ..models.lora import list_local_loras
    from ..pipeline.overlays import SUBJECT_COLOURS
    from ..pipeline.presets import default_app_preset
    from .gpu import Engine, on_gpu, register, run_generation
    from .run import Handlers

    d, limits = settings.defaults, settings.limits
    hardware = hardware or detect_hardware()
    if preset is None:
        preset, preset_reason = default_app_preset("cuda" if hardware.device == "zerogpu" else hardware.device)
    estimator = Estimator(hardware)
    tokenizer = load_tokenizer()
    loader = SubjectLoader(limits, cropper or default_cropper(), SUBJECT_COLOURS)
    loras = {path.name: path for path in list_local_loras()}
    key = register(Engine(get_pipeline, limits, estimator))
    handlers = Handlers(key=key, runner=on_gpu(run_generation), estimator=estimator, loader=loader,
                        tokenizer=tokenizer, settings=settings, loras=loras)
    advice = SpeedAdvice(estimator, preset, preset_reason or "the default here")
    assets_dir = find_assets() if assets == "auto" else (Path(assets) if assets else None)

    with gr.Blocks(title="FastComposer Studio", delete_cache=settings.server.delete_cache) as demo:
        if banner:
            gr.Markdown(f"> ⚠ **Preview mode.** {banner}", elem_id="banner")
        gr.Markdown(HOW_TO)
        gr.Markdown(f"<small>{CONSENT}</small>", elem_id="consent")
        with gr.Row():
            with gr.Column(scale=5):
                slots = build_photo_slots(limits)
                controls = build_settings(d, limits, preset, loras)
                layout = build_layout()
                insight = build_insight(gpu=hardware.device not in ("cpu", "mps"))
                build_speed(controls, advice, d)
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
            with gr.Column(scale=4):
                results = build_results()
        tool = ToolHandler(key=key, runner=handlers.runner, settings=settings, allow_private=allow_private_urls)
        examples = None
        if assets_dir is not None:
            cached_run = ExampleRun(tool=tool, loader=loader, preset=preset,
                                    detail_faces=hardware.device not in ("cpu", "mps")) if cache_examples else None
            examples = build_examples(assets_dir, controls.prompt, slots.photos, cached_run=cached_run,
                                      outputs=[results.gallery, results.used_seed, results.status],
                                      concurrency_id=settings.server.concurrency_id)
        _wire(_Page(slots, controls, layout, insight, results, go, stop_btn, handlers, loader, advice, tokenizer,
                    settings, loras, examples))
        build_tool(tool, settings.server.concurrency_id)
    demo.assets_dir = assets_dir  # `launch` serves this folder (and no other)
    demo.examples_table = examples  # the `gr.Examples`, or None without example photos
    return demo


@dataclass
class _Page:
    """What the events connect."""

    slots: PhotoSlots
    controls: SettingsControls
    layout: LayoutControls
    insight: InsightControls
    results: ResultsPanel
    go: gr.Button
    stop_btn: gr.Button
    handlers: object  # run.Handlers
    loader: SubjectLoader
    advice: SpeedAdvice
    tokenizer: object
    settings: Settings
    loras: dict[str, Path]
    examples: gr.Examples | None  # the Examples table (examples.py), None without example photos


def _wire(page: _Page) -> None:
    """The events: previews and hints, Speed, Generate, Stop, seed reuse, restore."""
    c, slots, results, handlers, server = page.controls, page.slots, page.results, page.handlers, page.settings.server
    refresh_previews = wire_photo_slots(slots, page.loader, c.prompt)
    if page.examples is not None:  # an example fills the slots without their change events: preview them here
        page.examples.load_input_event.then(**refresh_previews, show_progress="hidden", api_visibility="private")
    wire_hint(c, slots.photos, page.tokenizer, page.settings.limits)
    wire_speed(c, page.advice)
    wire_layout(page.layout, c.prompt, c.width, c.height, slots.photos)

    # Generate: the first 11 inputs are also what a restored PNG sets (results.restore keeps this order)
    settings_inputs = [c.prompt, c.negative, c.alpha, c.guidance, c.steps, c.sampler, c.seed, c.num_images, c.width,
                       c.height, slots.face_crop]
    insight = page.insight
    inputs = [*settings_inputs, *slots.photos, *slots.wholes, c.cache_interval, c.lora, c.lora_scale, slots.margin,
              insight.attention, insight.identity, insight.sweep, page.layout.boxes, page.layout.separate,
              insight.refine, insight.refine_strength, results.shown]  # run.py's parameters, in order
    outputs = [results.gallery, results.used_seed, results.status, results.shown]
    common = dict(concurrency_id=server.concurrency_id, concurrency_limit=1, validator=handlers.check_before_queue,
                  show_progress_on=[results.gallery])  # one progress bar, on the gallery
    generate = not_a_tool(handlers.generate)  # /generate stays for gradio_client; agents get /compose (mcp.py)
    gen_event = page.go.click(generate, inputs, outputs, api_name="generate", **common)
    enter_event = c.prompt.submit(generate, inputs, outputs, api_name="generate_on_enter",
                                  api_visibility="undocumented", **common)
    note_inputs = [c.speed, c.sampler, c.steps, c.cache_interval, c.width, c.height, c.num_images]
    for event in (gen_event, enter_event):  # the estimate has just learnt this machine's speed; a new zip
        event.then(page.advice.note, note_inputs, c.speed_note, queue=False, show_progress="hidden",
                   api_visibility="private")
        event.then(zip_results, results.shown, results.download, queue=False, show_progress="hidden",
                   api_visibility="private")

    # The page's helpers (stop, restore, hint, previews, swaps): callable, but neither MCP tools nor documented
    page.stop_btn.click(handlers.stop, None, results.status, queue=False, api_name="stop", show_progress="hidden",
                        api_visibility="undocumented")
    page.stop_btn.click(handlers.stop_queued, results.stop_tick, results.stop_tick, queue=False,
                        show_progress="hidden", api_visibility="private")
    results.stop_tick.change(None, None, None, cancels=[gen_event, enter_event])  # queued runs only (run.py)
    results.reuse.click(lambda s: s if s is not None else -1, results.used_seed, c.seed, api_name="reuse_seed",
                        api_visibility="undocumented")
    results.restore_file.upload(lambda path: restore(path, page.loras), results.restore_file,
                                [*settings_inputs, c.speed, c.cache_interval, c.lora, c.lora_scale, slots.margin,
                                 page.layout.boxes, page.layout.separate, page.insight.refine,
                                 page.insight.refine_strength],
                                api_name="restore_settings", api_visibility="undocumented")
