"""The photo slots: one per subject, each taking 1-4 photos, with the crop drawn on each and the subject's order.

Each slot is an interactive gallery (thumbnails; upload, paste and webcam), then the photos again as the model
will use them: the crop square in the subject's colour (the colour its attention map uses too), the face box in
white, the rest dimmed. "Use whole photo" ticks photos to send uncropped; one "Crop" slider sets the margin for
every photo, from a tight face to head and shoulders. Slot k goes with the k-th `img` of the prompt: its header
shows the subject word written before that marker, and the ⇄ buttons swap neighbouring slots.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import gradio as gr

from ..config import Limits
from .crops import SubjectLoader
from .texts import MAX_SLOTS

OPEN_SLOTS = 2  # slots shown at first; 3 and 4 wait in an accordion (most prompts have one or two people)
ROW_PX = 175  # one row of two thumbnails in a slot ("auto" left an interactive gallery far taller than its photos)


def paths_of(value) -> list[str]:
    """The photo files of one slot, from a gallery's value (a list of (path, caption) pairs, or None)."""
    return [item[0] if isinstance(item, (list, tuple)) else item for item in value or [] if item]


def photos_of(values: list) -> list[tuple[int, list[str]]]:
    """(slot index, photo paths) of the slots that hold a photo."""
    return [(k, paths) for k, value in enumerate(values) if (paths := paths_of(value))]


def _markdown_word(word: str) -> str:
    return re.sub(r"([\\`*_{}\[\]<>#|~])", r"\\\1", word)


def header(k: int, word: str | None) -> str:
    """"**Subject 1** · woman": the slot's place in the marker order and, when the prompt says it, its word."""
    return f"**Subject {k + 1}**" + (f" · {_markdown_word(word)}" if word else "")


def headers_for(prompt: str | None) -> list[str]:
    """Every slot's header for `prompt` (a marker with no word before it leaves its slot unnamed)."""
    from ..inputs.prompt import subject_words

    words = subject_words(prompt or "") if len(prompt or "") <= 10_000 else []  # unqueued: keep it cheap
    return [header(k, words[k] if k < len(words) and not words[k].startswith("subject ") else None)
            for k in range(MAX_SLOTS)]


@dataclass
class PhotoSlots:
    """The components of the photo section."""

    photos: list[gr.Gallery]  # per subject, its 1-4 photos (the API's photo_1 ... photo_4)
    previews: list[gr.Gallery]  # per subject, each photo with its crop drawn
    statuses: list[gr.Markdown]
    wholes: list[gr.CheckboxGroup]  # per subject, the numbers (1-based) of the photos to use uncropped
    headers: list[gr.Markdown]  # "Subject 1 · woman"
    swaps: list[gr.Button]  # swap slot k and k+1 (their order is the marker order)
    face_crop: gr.Checkbox
    margin: gr.Slider  # crop side over face size, for every photo


def _slot(k: int, limits: Limits, parts: dict[str, list]) -> None:
    with gr.Column(min_width=260, elem_id=f"slot-{k + 1}", elem_classes=["subject-slot"]):
        parts["headers"].append(gr.Markdown(header(k, None), elem_id=f"subject-{k + 1}"))
        parts["photos"].append(gr.Gallery(
            label=f"Photos of subject {k + 1}", show_label=False, type="filepath", file_types=["image"],
            sources=["upload", "clipboard", "webcam"], interactive=True, columns=2, fit_columns=False, height=ROW_PX,
            object_fit="cover", buttons=[], elem_id=f"photo-{k + 1}", elem_classes=["photo-input"]))
        parts["previews"].append(gr.Gallery(
            label=f"What the model sees of subject {k + 1}", show_label=False, interactive=False, columns=2,
            fit_columns=False, height=ROW_PX, object_fit="contain", format="jpeg", buttons=["fullscreen"],
            visible=False, elem_id=f"preview-{k + 1}", elem_classes=["crop-preview"]))
        parts["statuses"].append(gr.Markdown(elem_id=f"status-{k + 1}", elem_classes=["slot-status"]))
        parts["wholes"].append(gr.CheckboxGroup(
            [(str(j + 1), j + 1) for j in range(limits.max_photos_per_subject)], value=[],
            label="Use whole photo (no crop)", visible=False, elem_id=f"whole-{k + 1}"))


def build_photo_slots(limits: Limits) -> PhotoSlots:
    """Lay out the slots (inside a Blocks context)."""
    from ..inputs.faces import DEFAULT_MARGIN, MARGIN_HEAD_AND_SHOULDERS, MARGIN_TIGHT_FACE

    parts: dict[str, list] = {name: [] for name in ("headers", "photos", "previews", "statuses", "wholes")}
    with gr.Row(equal_height=False):
        for k in range(min(OPEN_SLOTS, MAX_SLOTS)):
            _slot(k, limits, parts)
    if MAX_SLOTS > OPEN_SLOTS:
        with gr.Accordion("More subjects", open=False, elem_id="more-subjects"):
            with gr.Row(equal_height=False):
                for k in range(OPEN_SLOTS, MAX_SLOTS):
                    _slot(k, limits, parts)
    with gr.Row(elem_id="swaps"):  # narrow buttons: one row on a phone too
        swaps = [gr.Button(f"⇄ {k + 1}↔{k + 2}", size="sm", min_width=60, elem_id=f"swap-{k + 1}")
                 for k in range(MAX_SLOTS - 1)]
    with gr.Row(equal_height=True):  # side by side on a screen; columns (not components) wrap on a phone
        with gr.Column(min_width=240):
            face_crop = gr.Checkbox(label="Crop to the face", value=True, elem_id="face-crop",
                                    info="recommended: the model was trained on head-and-shoulders crops")
        with gr.Column(min_width=240):
            margin = gr.Slider(MARGIN_TIGHT_FACE, MARGIN_HEAD_AND_SHOULDERS, value=DEFAULT_MARGIN, step=0.1,
                               label="Crop: tight face … head and shoulders", elem_id="crop-margin",
                               info=f"crop side / face width ({DEFAULT_MARGIN:g}: the default)")
    return PhotoSlots(parts["photos"], parts["previews"], parts["statuses"], parts["wholes"], parts["headers"],
                      swaps, face_crop, margin)


def _swap(a, b, wa, wb):
    return b, a, wb, wa


def wire_photo_slots(slots: PhotoSlots, loader: SubjectLoader, prompt: gr.Textbox) -> dict:
    """Crop previews on every change of photos, whole-photo ticks, face crop and margin; headers; swaps.

    Returns the event arguments that redo every slot's preview (`fn`, `inputs`, `outputs`), for changes of photos
    that fire no change event: Gradio 6.31's Gallery dispatches none when an example fills it.
    """
    photos, wholes, n = slots.photos, slots.wholes, len(slots.photos)

    def shown(k, value, face_crop, whole, margin):
        gallery, status = loader.preview(k, paths_of(value), bool(face_crop), whole or [], margin)
        # Without face crop the thumbnails above already are what the model sees. Every photo shows, in rows of two.
        rows = max(1, -(-len(gallery) // 2))
        return gr.update(value=gallery, visible=bool(gallery and face_crop), height=rows * ROW_PX), status

    def ticks(value, face_crop, whole):
        """The whole-photo choices follow the photos (one number per photo); ticks of removed photos go."""
        count = len(paths_of(value))
        return gr.update(choices=[(str(j + 1), j + 1) for j in range(count)],
                         value=[v for v in whole or [] if v <= count], visible=bool(count and face_crop))

    for k in range(n):
        trio = [photos[k], slots.face_crop, wholes[k], slots.margin]
        photos[k].change(lambda v, c, w, m, k=k: (*shown(k, v, c, w, m), ticks(v, c, w)), trio,
                         [slots.previews[k], slots.statuses[k], wholes[k]], api_name=f"preview_{k + 1}",
                         api_visibility="undocumented")
        wholes[k].input(lambda v, c, w, m, k=k: shown(k, v, c, w, m), trio, [slots.previews[k], slots.statuses[k]],
                        api_visibility="private")

    def preview_all(face_crop, margin, *values_and_wholes):
        values, whole_values = values_and_wholes[:n], values_and_wholes[n:]
        return [x for k in range(n) for x in (*shown(k, values[k], face_crop, whole_values[k], margin),
                                              ticks(values[k], face_crop, whole_values[k]))]

    everything = [x for k in range(n) for x in (slots.previews[k], slots.statuses[k], wholes[k])]
    refresh = dict(fn=preview_all, inputs=[slots.face_crop, slots.margin, *photos, *wholes], outputs=everything)
    gr.on([slots.face_crop.change, slots.margin.release], **refresh, api_name="preview_all",
          api_visibility="undocumented")
    prompt.change(headers_for, prompt, slots.headers, queue=False, show_progress="hidden", api_visibility="private")
    for k, button in enumerate(slots.swaps):
        pair = [photos[k], photos[k + 1], wholes[k], wholes[k + 1]]
        button.click(_swap, pair, pair, api_name=f"swap_{k + 1}", api_visibility="undocumented")
    return refresh
