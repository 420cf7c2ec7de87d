"""Layout: where each subject goes (a box per subject, drawn on a canvas) and "Keep people apart".

Three views of one value, kept in sync:
- the preset (Free, Side by side, Left · centre · right, Two in front · two behind, Custom), fitted to the number
  of subjects in the prompt;
- the boxes as text, `0,0,0.5,1 | 0.5,0,1,1` (one `x0,y0,x1,y1` per subject in `img` order, `-` for a free
  subject): what Generate sends, what a PNG restores, what an API client types;
- a canvas in the output's aspect ratio with each box in its subject's colour, to drag (move) and resize (the
  corner handle); a dropped box writes the text. It is a `gr.HTML` with its own small script (`js_on_load`), so
  it needs no third-party component.
The text is the source of truth: the preset and the canvas write it, and its change redraws the canvas.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass

import gradio as gr

from ..pipeline.boxes import format_boxes, parse_boxes_text, side_by_side
from ..pipeline.overlays import SUBJECT_COLOURS

SEPARATE_ENV = "FASTCOMPOSER_SEPARATE"  # "1": "Keep people apart" is on by default on this server
FREE, SIDE_BY_SIDE, FRONT_BEHIND, CUSTOM = "free", "side", "front-behind", "custom"
NEW_BOX = (0.3, 0.2, 0.7, 0.8)  # where a free subject's box appears when its chip under the canvas is clicked
SEPARATE_INFO = ("After the first steps, each person keeps the part of the image their word took, and the other "
                 "people's words and pixels are shut out of it, so two people do not blend into one face. Its effect "
                 "on the real model is not measured yet; compare with and without on your photos.")


def preset_boxes(preset: str, count: int) -> list | None:
    """The boxes of a layout preset for `count` subjects (None: free)."""
    if preset == SIDE_BY_SIDE and count >= 1:
        return side_by_side(count)
    if preset == FRONT_BEHIND and count == 4:  # subjects 1, 2 in front (lower, larger); 3, 4 behind them
        return [(0.0, 0.35, 0.5, 1.0), (0.5, 0.35, 1.0, 1.0), (0.1, 0.0, 0.5, 0.6), (0.5, 0.0, 0.9, 0.6)]
    return None


def preset_choices(count: int) -> list[tuple[str, str]]:
    """The presets that fit `count` subjects."""
    choices = [("Free", FREE)]
    if count == 2:
        choices.append(("Side by side", SIDE_BY_SIDE))
    elif count == 3:
        choices.append(("Left · centre · right", SIDE_BY_SIDE))
    elif count == 4:
        choices += [("Side by side", SIDE_BY_SIDE), ("Two in front · two behind", FRONT_BEHIND)]
    return choices + [("Custom", CUSTOM)]


def preset_of(text: str, count: int) -> str:
    """The preset whose boxes `text` holds, else Custom (Free for no boxes)."""
    try:
        boxes = parse_boxes_text(text)
    except ValueError:
        return CUSTOM
    if boxes is None or all(box is None for box in boxes):
        return FREE
    for _, name in preset_choices(count):
        given = preset_boxes(name, count)
        if given is not None and format_boxes(given) == format_boxes(boxes):
            return name
    return CUSTOM


def separate_default() -> tuple[bool, str]:
    """(on by default, the line under the checkbox): off unless the server's maintainer set FASTCOMPOSER_SEPARATE=1,
    having checked it with `evaluate --variants original,separate`."""
    if os.environ.get(SEPARATE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True, SEPARATE_INFO + f" On by default here ({SEPARATE_ENV})."
    return False, SEPARATE_INFO


def canvas_value(text: str, width: float, height: float, prompt: str, photo_count: int = 0) -> dict:
    """What the canvas draws: the boxes, the aspect ratio, each subject's name and colour, and any typing error."""
    from ..inputs.prompt import count_markers, subject_words  # on first use: it imports transformers
    count = count_markers(prompt or "") or photo_count
    words = subject_words(prompt or "")
    try:
        boxes, error = parse_boxes_text(text) or [], ""
    except ValueError as e:
        boxes, error = [], str(e)
    boxes = [list(box) if box is not None else None for box in boxes]
    boxes += [None] * (count - len(boxes))
    return {
        "boxes": boxes,
        "aspect": f"{max(1, int(width or 512))} / {max(1, int(height or 512))}",
        "names": [html.escape(f"{k + 1}: {words[k] if k < len(words) else 'subject'}") for k in range(len(boxes))],
        "colours": ["#{:02x}{:02x}{:02x}".format(*SUBJECT_COLOURS[k % len(SUBJECT_COLOURS)])
                    for k in range(len(boxes))],
        "error": html.escape(error),
    }


def text_of_canvas(value: dict | None) -> str:
    return format_boxes((value or {}).get("boxes") or [])


CANVAS_TEMPLATE = """
<div class="fc-stage" style="aspect-ratio: ${value.aspect}">
  ${(value.boxes || []).map((b, k) => b ? `<div class="fc-box" data-k="${k}" style="left:${b[0] * 100}%;
     top:${b[1] * 100}%; width:${(b[2] - b[0]) * 100}%; height:${(b[3] - b[1]) * 100}%;
     border-color:${value.colours[k]}; background:${value.colours[k]}33"><span class="fc-name"
     style="background:${value.colours[k]}">${value.names[k]}</span><i class="fc-handle"
     style="background:${value.colours[k]}" title="drag to resize"></i></div>` : '').join('')}
</div>
<div class="fc-legend">${(value.boxes || []).map((b, k) => `<button type="button" class="fc-chip" data-chip="${k}"
  style="border-color:${value.colours[k]}">${value.names[k]}${b ? '' : ' · free (click to place)'}</button>`).join('')}
  ${value.error ? `<span class="fc-error">${value.error}</span>` : ''}</div>
"""

CANVAS_CSS = """
.fc-stage { position: relative; width: 100%; max-width: 420px; background: repeating-conic-gradient(#8881 0 25%,
  #0000 0 50%) 0 0 / 24px 24px; border: 1px solid var(--border-color-primary); border-radius: 6px;
  overflow: hidden; touch-action: none; }
.fc-box { position: absolute; box-sizing: border-box; border: 3px solid; border-radius: 4px; cursor: move;
  touch-action: none; }
.fc-name { position: absolute; left: 0; top: 0; color: #111; font-size: 12px; padding: 1px 4px;
  pointer-events: none; white-space: nowrap; }
.fc-handle { position: absolute; right: -2px; bottom: -2px; width: 18px; height: 18px; cursor: nwse-resize;
  border-radius: 3px; }
.fc-legend { display: flex; flex-wrap: wrap; gap: 6px; margin-top: 6px; align-items: center; }
.fc-chip { border: 2px solid; border-radius: 12px; padding: 2px 8px; font-size: 12px; background: none;
  color: var(--body-text-color); cursor: pointer; }
.fc-error { color: var(--error-text-color, #b00); font-size: 12px; }
"""

# Pointer events on the container (they survive each re-render of its contents): drag a box to move it, its corner
# to resize it; on release the new boxes become the value and `input` tells the page. A chip adds a free subject's box.
CANVAS_JS = """
const clamp = (v, lo, hi) => Math.min(Math.max(v, lo), hi);
const round = (v) => Math.round(v * 100) / 100;
let drag = null;
element.addEventListener('pointerdown', (e) => {
  const box = e.target.closest('.fc-box');
  if (!box) return;
  const stage = element.querySelector('.fc-stage').getBoundingClientRect();
  const k = Number(box.dataset.k);
  drag = {k, el: box, x: e.clientX, y: e.clientY, w: stage.width, h: stage.height, now: null,
          start: props.value.boxes[k].slice(), resize: e.target.classList.contains('fc-handle')};
  box.setPointerCapture(e.pointerId);
  e.preventDefault();
});
element.addEventListener('pointermove', (e) => {
  if (!drag) return;
  const dx = (e.clientX - drag.x) / drag.w, dy = (e.clientY - drag.y) / drag.h;
  let [x0, y0, x1, y1] = drag.start;
  if (drag.resize) {
    x1 = clamp(x1 + dx, x0 + 0.05, 1); y1 = clamp(y1 + dy, y0 + 0.05, 1);
  } else {
    const bw = x1 - x0, bh = y1 - y0;
    x0 = clamp(x0 + dx, 0, 1 - bw); y0 = clamp(y0 + dy, 0, 1 - bh); x1 = x0 + bw; y1 = y0 + bh;
  }
  drag.now = [x0, y0, x1, y1].map(round);
  const [a, b, c, d] = drag.now;
  Object.assign(drag.el.style, {left: a * 100 + '%', top: b * 100 + '%', width: (c - a) * 100 + '%',
                                height: (d - b) * 100 + '%'});
});
const drop = () => {
  const d = drag;
  drag = null;
  if (!d || !d.now) return;
  const boxes = props.value.boxes.slice();
  boxes[d.k] = d.now;
  props.value = {...props.value, boxes};
  trigger('input');
};
element.addEventListener('pointerup', drop);
element.addEventListener('pointercancel', drop);
element.addEventListener('click', (e) => {
  const chip = e.target.closest('.fc-chip');
  if (!chip) return;
  const k = Number(chip.dataset.chip), boxes = props.value.boxes.slice();
  boxes[k] = boxes[k] ? null : __NEW_BOX__;
  props.value = {...props.value, boxes};
  trigger('input');
});
""".replace("__NEW_BOX__", str(list(NEW_BOX)))


@dataclass
class LayoutControls:
    """The components of the Layout section."""

    preset: gr.Radio
    boxes: gr.Textbox  # the boxes as text: what Generate sends
    canvas: gr.HTML
    separate: gr.Checkbox


def build_layout() -> LayoutControls:
    """Lay out the section (inside a Blocks context)."""
    separate_on, separate_info = separate_default()
    with gr.Accordion("Layout: where each person goes", open=False, elem_id="layout"):
        preset = gr.Radio(preset_choices(0), value=FREE, label="Layout", elem_id="layout-preset",
                          info="Free: the prompt decides. A box keeps its subject inside it and the others out.")
        canvas = gr.HTML(canvas_value("", 512, 512, ""), html_template=CANVAS_TEMPLATE, css_template=CANVAS_CSS,
                         js_on_load=CANVAS_JS, elem_id="layout-canvas", apply_default_css=False)
        boxes = gr.Textbox("", label="Boxes", elem_id="layout-boxes", placeholder="0,0,0.5,1 | 0.5,0,1,1",
                           info="x0,y0,x1,y1 per subject in `img` order (fractions of width and height), | between "
                           "subjects, - for a subject left free. Drag the boxes above, or type.")
        separate = gr.Checkbox(label="Keep people apart", value=separate_on, info=separate_info,
                               elem_id="keep-apart")
    return LayoutControls(preset, boxes, canvas, separate)


def wire_layout(layout: LayoutControls, prompt: gr.Textbox, width, height, galleries: list) -> None:
    """Preset -> text; canvas drag -> text; text, size, prompt or photos -> canvas and the preset's choices."""
    from .photos import photos_of

    quiet = dict(queue=False, show_progress="hidden", api_visibility="private")

    def count_of(prompt_text: str, values: tuple) -> int:
        from ..inputs.prompt import count_markers

        return count_markers(prompt_text or "") or len(photos_of(list(values)))

    def chosen(preset: str, text: str, prompt_text: str, *values):
        count = count_of(prompt_text, values)
        if preset == CUSTOM:  # keep what is there; a free subject gets a box to drag
            boxes = parse_boxes_or_none(text) or []
            boxes = [box if box is not None else NEW_BOX for box in boxes] + [NEW_BOX] * (count - len(boxes))
            return format_boxes(boxes[:count])
        return format_boxes(preset_boxes(preset, count))

    def redraw(text: str, w, h, prompt_text: str, *values):
        count = count_of(prompt_text, values)
        return (canvas_value(text, w, h, prompt_text, len(photos_of(list(values)))),
                gr.update(choices=preset_choices(count), value=preset_of(text, count)))

    layout.preset.input(chosen, [layout.preset, layout.boxes, prompt, *galleries], layout.boxes, **quiet)
    layout.canvas.input(text_of_canvas, layout.canvas, layout.boxes, **quiet)
    gr.on([layout.boxes.change, width.change, height.change, prompt.change, *(g.change for g in galleries)],
          redraw, [layout.boxes, width, height, prompt, *galleries], [layout.canvas, layout.preset], **quiet)


def parse_boxes_or_none(text: str | None) -> list | None:
    try:
        return parse_boxes_text(text)
    except ValueError:
        return None
