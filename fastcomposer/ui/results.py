"""Results: the gallery (live previews while a run goes), the seed used, the status line, "Download all",
restoring settings."""

from __future__ import annotations

import re
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from .settings import speed_of


@dataclass
class ResultsPanel:
    """The components of the results column."""

    # Each image, then its attention map when asked for, so two columns put each map beside its image; a sweep's
    # grid comes first. Captions carry the identity line (see insight.py).
    gallery: gr.Gallery
    used_seed: gr.Number
    reuse: gr.Button  # copies the seed used into the seed box
    download: gr.DownloadButton  # every finished image on display, one zip, each PNG with its settings
    status: gr.Markdown  # one line: what happened ("2 image(s) · seed 42", "Stopped at step 4 of 51; ...")
    restore_file: gr.File  # a PNG made here: its settings go back into the controls
    shown: gr.State  # the finished images on display: they stay through previews, Stop and errors
    # Bumped by Stop when no run of this session is running; its change event cancels the session's queued runs.
    # A component the page keeps in its DOM (visible="hidden"): a State's change would not fire after an unqueued
    # event, and Stop must stay unqueued to work when the queue is full.
    stop_tick: gr.Number


def build_results() -> ResultsPanel:
    """Lay out the results column (inside a Blocks context)."""
    status = gr.Markdown(elem_id="status")  # above the gallery: on a phone, below it would be out of sight
    # "contain": a sweep's wide grid and a map's legend strip must not be cut to a square
    gallery = gr.Gallery(label="Results", format="png", columns=2, height=520, elem_id="gallery",
                         object_fit="contain", buttons=["download", "fullscreen"])
    with gr.Row():
        used_seed = gr.Number(label="Seed used", interactive=False, precision=0, elem_id="used-seed")
        reuse = gr.Button("♻ Reuse seed", size="sm")
        download = gr.DownloadButton("⬇ Download all", size="sm", visible=False, elem_id="download-all")
    # No fixed height: at 90 px Gradio's drop zone cut its own "Drop File Here - or - Click to Upload" in half.
    restore_file = gr.File(label="Drop a PNG made here to restore its settings", file_types=[".png"],
                           type="filepath", elem_id="restore")
    stop_tick = gr.Number(0, visible="hidden", elem_id="stop-tick")
    return ResultsPanel(gallery, used_seed, reuse, download, status, restore_file, gr.State([]), stop_tick)


def restore(path: str | None, loras: dict) -> tuple:
    """The settings stored in a PNG made here, in the order of the page's settings inputs (see page.py)."""
    from ..generation.metadata import read_record
    from ..pipeline.boxes import format_boxes

    record = read_record(path) if path else None
    if record is None:
        raise gr.Error("That file holds no FastComposer settings; drop a PNG made by this app.")
    lora, scale = "", gr.update()
    if record.loras:  # `NAME:SCALE`; restored only when that file is offered here
        name, _, value = record.loras[0].rpartition(":")
        if name in loras:
            lora, scale = name, float(value)
    margin = gr.update() if record.crop_margin is None else record.crop_margin  # older PNGs: keep the slider
    return (record.prompt, record.negative_prompt, record.alpha, record.guidance_scale, record.num_inference_steps,
            record.scheduler, record.seed, record.num_images, record.width, record.height, record.face_crop,
            speed_of(record.scheduler, record.num_inference_steps, record.cache_interval), record.cache_interval,
            lora, scale, margin, format_boxes(record.boxes), bool(record.separate), bool(record.detail_faces),
            record.detail_strength if record.detail_faces and record.detail_strength else gr.update())


def zip_results(shown: Sequence[tuple] | None, folder: Path | None = None, max_age_s: float = 3600.0):
    """The Download all button for the images on display: one zip of PNGs, the images with their settings (drop one
    on the page to restore them), then any attention map or sweep grid. Hidden when there is nothing to download.

    The zips go to a folder of their own; those older than `max_age_s` (the server's upload lifetime, see
    config.py) are deleted on each call, as Gradio deletes its own copies.
    """
    from ..generation.metadata import read_record, save_png

    if not shown:
        return gr.update(visible=False, value=None)
    folder = folder or Path(tempfile.gettempdir()) / "fastcomposer-downloads"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.zip"):
        if time.time() - old.stat().st_mtime > max_age_s:
            old.unlink(missing_ok=True)
    fd, name = tempfile.mkstemp(prefix="fastcomposer-", suffix=".zip", dir=folder)
    with open(fd, "wb") as raw, zipfile.ZipFile(raw, "w") as archive, tempfile.TemporaryDirectory() as work:
        for n, (image, caption) in enumerate(shown, start=1):
            record = read_record(image)
            slug = (f"seed{record.seed}-image{record.image_index + 1}" if record is not None
                    else re.sub(r"[^a-z0-9]+", "-", (caption or "image").lower()).strip("-")[:40] or "image")
            path = Path(work) / f"{n:02d}-{slug}.png"
            if record is not None:
                save_png(image, path, record)
            else:
                image.save(path, format="PNG")
            archive.write(path, path.name)
    return gr.update(visible=True, value=name)
