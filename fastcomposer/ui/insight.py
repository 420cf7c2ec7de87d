"""What the model did: where each subject went (attention maps), whether each identity held (identity scores),
and what alpha changes (a sweep with one seed). The three controls, and the gallery items and status line a
finished run becomes.

Gallery order: per image, the image and then (when asked) its attention map, so with the gallery's two columns
each map sits beside its image. A sweep starts with its labelled grid (and the grid of its maps beside it),
then each alpha's images. Captions carry the identity line (`IdentityReport.summary()`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import gradio as gr

from ..config import Limits

SWEEP_CHOICES = [("off", ""), ("0.5 · 0.6 · 0.7 · 0.8", "0.5, 0.6, 0.7, 0.8"),
                 ("0.3 · 0.5 · 0.7 · 0.9", "0.3, 0.5, 0.7, 0.9"), ("0.6 · 0.7 · 0.8", "0.6, 0.7, 0.8")]
ATTENTION_INFO = ("Beside each image, its attention map: each pixel in the colour of the subject attending there "
                  "most, in photo order (subject 1 orange, 2 blue, 3 green, 4 purple; the legend names the "
                  "words). If a colour lands on the wrong person, swap their photos (⇄) and generate again.")
IDENTITY_ON = "each image's faces scored against the photos: about 0 for a stranger, higher is more alike"
IDENTITY_OFF = ("off: the face recogniser's weights (about 175 MB) are not on this server yet; ticking it fetches "
                "them once, when the server can reach the internet")
IDENTITY_UNAVAILABLE = ("identity check unavailable: the face recogniser could not be loaded on this server "
                        "(the server's log says why); the images are not affected")
HIDDEN_REASON = "hidden by the safety checker"  # identity.IdentityChecker's reason for a hidden image


REFINE_GPU = ("after the image, each subject's face is redrawn at full size with that subject's photos alone, "
              "so small faces keep their identity; on by default on a GPU, where a face takes a second")
REFINE_CPU = ("after the image, each subject's face is redrawn at full size with that subject's photos alone, "
              "so small faces keep their identity; off by default here: on a CPU each face costs about as much as "
              "the image itself")


@dataclass
class InsightControls:
    """The components of the "what the model did" section."""

    attention: gr.Checkbox
    identity: gr.Checkbox
    sweep: gr.Dropdown  # "" (off) or a list of alphas, e.g. "0.5, 0.6, 0.7, 0.8"
    refine: gr.Checkbox | None = None  # the face pass (generation/face_detail.py)
    refine_strength: gr.Slider | None = None


def identity_default() -> tuple[bool, str]:
    """(on by default, the line under the checkbox): on when ArcFace's weights are already on this server, so a
    visitor's first run never waits for a download they did not ask for. Looks at the file only (no download)."""
    from ..identity.checker import ARCFACE

    return (True, IDENTITY_ON) if ARCFACE.path().is_file() else (False, IDENTITY_OFF)


def build_insight(gpu: bool = False) -> InsightControls:
    """Lay out the section (inside a Blocks context); `gpu`: the face pass is on by default."""
    from ..generation.face_detail import DETAIL

    identity_on, identity_info = identity_default()
    with gr.Row(equal_height=False, elem_id="insight"):  # columns wrap on a phone; components would not
        with gr.Column(min_width=240):
            attention = gr.Checkbox(label="Show where each subject went", value=False, info=ATTENTION_INFO,
                                    elem_id="attention")
        with gr.Column(min_width=240):
            identity = gr.Checkbox(label="Check identity", value=identity_on, info=identity_info, elem_id="identity")
    sweep = gr.Dropdown(SWEEP_CHOICES, value="", allow_custom_value=True, label="Alpha sweep", elem_id="sweep",
                        info="the same seed at several alphas, side by side (one run each); or type your own, "
                        "e.g. 0.4, 0.6, 0.8")
    with gr.Row(equal_height=False, elem_id="refine-row"):
        with gr.Column(min_width=240):
            refine = gr.Checkbox(label="Refine faces", value=gpu, info=REFINE_GPU if gpu else REFINE_CPU,
                                 elem_id="refine")
        with gr.Column(min_width=240):
            strength = gr.Slider(DETAIL.min_strength, DETAIL.max_strength, value=DETAIL.strength, step=0.05,
                                 label="Face strength", elem_id="refine-strength",
                                 info="how much of each face is redrawn: 0.4 keeps its shape, 1 draws it afresh")
    return InsightControls(attention, identity, sweep, refine, strength)


def parse_sweep(text: str | None) -> list[float] | None:
    """The alphas of the sweep field ("0.5, 0.6, 0.7", commas or spaces), or None when it is off.

    Raises:
        ValueError: with the page's wording, for anything but 2 to `sweep.MAX_SWEEP` distinct alphas in [0, 1].
    """
    from ..generation.sweep import MAX_SWEEP, parse_alphas

    text = (text or "").strip()
    if not text or text.lower() == "off":
        return None
    try:
        values = [float(v) for v in re.split(r"[,;\s]+", text) if v]
    except ValueError:
        raise ValueError(f"the alpha sweep {text[:40]!r} is not a list of numbers; write e.g. 0.5, 0.6, 0.7") from None
    if len(values) < 2:
        raise ValueError("an alpha sweep needs 2 or more alphas, e.g. 0.5, 0.7 (choose 'off' for one run at the "
                         "identity strength above)")
    if len(values) > MAX_SWEEP:
        raise ValueError(f"an alpha sweep takes at most {MAX_SWEEP} alphas, got {len(values)}")
    return parse_alphas(values)


def sweep_problem(alphas: Sequence[float], num_images, steps, width, height, limits: Limits) -> str | None:
    """Why a sweep exceeds the compute budget (every run counts), or None. Values the server checks later may be
    anything here (the queue validator runs first): those are left to that check."""
    try:
        images, steps, width, height = (float(v) for v in (num_images, steps, width, height))
    except (TypeError, ValueError):
        return None
    units = len(alphas) * images * steps * width * height / (512 * 512)
    if units <= limits.max_compute_units:
        return None
    return (f"this alpha sweep is too large: {len(alphas)} alphas x {images:g} image(s) x {steps:g} steps at "
            f"{width:g}x{height:g} make {units:g} image-steps at 512x512, and a request may take "
            f"{limits.max_compute_units:g}; use fewer alphas, images or steps, or a smaller size")


def identity_caption(report) -> str:
    """The caption line of one image: its scores, or why there are none (never a path: see `IDENTITY_UNAVAILABLE`)."""
    if report.available:
        return report.summary()
    return "identity: image hidden" if report.reason == HIDDEN_REASON else "identity unavailable"


def _join(*parts: str | None) -> str | None:
    text = " · ".join(p for p in parts if p)
    return text or None


def result_items(results: Sequence, alphas: Sequence[float] | None) -> list[tuple]:
    """A finished run's gallery: (image, caption) pairs, in the order the module docstring gives."""
    from ..generation.sweep import grid, sweep_grid

    items: list[tuple] = []
    done = [r for r in results if not r.interrupted and r.images]
    with_maps = any(r.attention for r in done)
    if alphas is not None and done:
        captions = [[identity_caption(report) for report in r.identity] for r in done]
        sweep_image = sweep_grid(done, alphas, captions if any(captions) else None)
        items.append((sweep_image, f"alpha sweep · seed {done[0].seed}"))
        if with_maps:
            maps = grid([r.attention for r in done], [f"alpha {a:.2f}" for a in alphas[: len(done)]])
            items.append((maps, "where each subject went"))
    for r, result in enumerate(done):
        label = f"α {alphas[r]:.2f}" if alphas is not None else None
        for k, image in enumerate(result.images):
            report = result.identity[k] if k < len(result.identity) else None
            note = result.notes[k] if k < len(result.notes) else None
            items.append((image, _join(label, identity_caption(report) if report is not None else None, note)))
            if k < len(result.attention):
                items.append((result.attention[k], _join(label, f"map of image {k + 1}")))
    return items


def result_status(results: Sequence, alphas: Sequence[float] | None) -> str:
    """The status line of a finished run: "2 image(s) · seed 42", plus what the page should know once."""
    done = [r for r in results if not r.interrupted and r.images]
    seed = done[0].seed if done else results[0].seed
    per_run = len(done[0].images) if done else 0
    if alphas is not None:
        status = f"alpha sweep: {len(done)} alphas x {per_run} image(s) · seed {seed} · the grid comes first"
    else:
        status = f"{per_run} image(s) · seed {seed}"
    hidden = sum(r.num_hidden for r in done)
    if hidden:
        status += f" · {hidden} of {sum(len(r.images) for r in done)} images hidden by the safety filter"
    if any(getattr(r, "detail_stopped", False) for r in done):
        status += " · stopped during the face pass: the images are kept, the unfinished face as it was"
    reports = [report for r in done for report in r.identity]
    if any(not report.available and report.reason != HIDDEN_REASON for report in reports):
        status += f" · {IDENTITY_UNAVAILABLE}"
    return status
