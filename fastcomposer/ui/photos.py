"""The photo slots: upload, what the model will see (the face crop), the "use whole photo" fallback, reordering."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from ..config import Limits
from ..messages import message_for
from .texts import MAX_SLOTS


def photos_of(files: list) -> list[tuple[int, str]]:
    """(slot index, path) of the slots that hold a photo."""
    return [(k, f) for k, f in enumerate(files) if f]


class SubjectLoader:
    """Photo k+1 -> (photo, what the encoder sees, status), with our safe loader and the face cropper."""

    def __init__(self, limits: Limits, cropper):
        self.limits, self.cropper = limits, cropper

    def load(self, k: int, path: str, face_crop: bool, whole: bool):
        """Raises ImageError, NoFaceFoundError, or ValueError when no face detector can run at all; callers choose
        how to show each."""
        from ..images import load_image

        name = f"photo {k + 1}"
        image = load_image(path, name=name, limits=self.limits)
        if not face_crop or whole:
            return image, image, f"{name}: whole photo"
        crop = self.cropper.crop(image, name=name)
        note = f" ({crop.num_faces} faces: the largest is used)" if crop.num_faces > 1 else ""
        return image, crop.image, f"{name}: face found ✓{note}"

    def for_generation(self, k: int, path: str, face_crop: bool, whole: bool):
        """`load` for a generation: every problem becomes a gr.Error naming the photo."""
        from ..faces import NoFaceFoundError
        from ..images import ImageError

        try:
            return self.load(k, path, face_crop, whole)
        except ImageError as e:  # the page's wording: never a path (see messages.py)
            raise gr.Error(e.message_for("page"), title="Photo problem") from None
        except NoFaceFoundError as e:
            raise gr.Error(e.message_for("page"), title="No face found") from None
        except ValueError as e:  # no detector at all (e.g. OpenCV 5 installed): the message says what to do
            raise gr.Error(message_for(e, "page"), title="Face crop unavailable") from None

    def preview(self, path: str | None, face_crop: bool, whole: bool, k: int):
        """What the model will see for photo k+1, shown right after upload; problems become the status."""
        from ..faces import NoFaceFoundError
        from ..images import ImageError, load_image

        if not path:
            return None, "", gr.update(visible=False, value=False)
        try:
            _, seen, status = self.load(k, path, face_crop, whole)
            return seen, status, gr.update(visible=whole, value=whole)
        except ImageError as e:
            return None, f"✗ {e.message_for('page')}", gr.update(visible=False)
        except NoFaceFoundError:
            status = f"✗ no face found in photo {k + 1}: tick 'Use whole photo' or try a clearer photo"
            return load_image(path, limits=self.limits), status, gr.update(visible=True)
        except ValueError as e:
            return None, f"✗ {message_for(e, 'page')}", gr.update(visible=True)


@dataclass
class PhotoSlots:
    """The components of the photo section."""

    files: list[gr.File]
    previews: list[gr.Image]  # the crop the encoder sees
    statuses: list[gr.Markdown]
    wholes: list[gr.Checkbox]  # "use whole photo", shown when no face was found
    swaps: list[gr.Button]  # swap photo k and k+1 (their order is the marker order)
    face_crop: gr.Checkbox


def build_photo_slots() -> PhotoSlots:
    """Lay out the slots (inside a Blocks context)."""
    files, previews, statuses, wholes = [], [], [], []
    with gr.Row():
        for k in range(MAX_SLOTS):
            with gr.Column(min_width=140):
                files.append(gr.File(label=f"Photo {k + 1}", file_types=["image"], type="filepath", height=110,
                                     elem_id=f"photo-{k + 1}"))
                previews.append(gr.Image(label=f"Model sees {k + 1}", interactive=False, height=140,
                                         show_label=False, elem_id=f"preview-{k + 1}"))
                statuses.append(gr.Markdown(elem_id=f"status-{k + 1}"))
                wholes.append(gr.Checkbox(label="Use whole photo", value=False, visible=False))
    with gr.Row():
        swaps = [gr.Button(f"⇄ {k + 1}↔{k + 2}", size="sm") for k in range(MAX_SLOTS - 1)]
    face_crop = gr.Checkbox(label="Crop to the face (recommended: the model was trained on head-and-shoulders crops)",
                            value=True)
    return PhotoSlots(files, previews, statuses, wholes, swaps, face_crop)


def _swap(a, b, pa, pb):
    return b, a, pb, pa


def wire_photo_slots(slots: PhotoSlots, loader: SubjectLoader) -> None:
    """Crop previews on upload and on every face-crop change; the swap buttons."""
    files, wholes = slots.files, slots.wholes
    outputs = [[slots.previews[k], slots.statuses[k], wholes[k]] for k in range(MAX_SLOTS)]
    for k in range(MAX_SLOTS):
        gr.on([files[k].change, wholes[k].change], lambda p, c, w, k=k: loader.preview(p, c, w, k),
              [files[k], slots.face_crop, wholes[k]], outputs[k], api_name=f"preview_{k + 1}",
              api_visibility="undocumented")

    def preview_all(face_crop, *files_and_wholes):
        return [x for k in range(MAX_SLOTS)
                for x in loader.preview(files_and_wholes[k], face_crop, files_and_wholes[MAX_SLOTS + k], k)]

    slots.face_crop.change(preview_all, [slots.face_crop, *files, *wholes], [x for out in outputs for x in out],
                           api_name="preview_all", api_visibility="undocumented")
    for k, button in enumerate(slots.swaps):
        pair = [files[k], files[k + 1], wholes[k], wholes[k + 1]]
        button.click(_swap, pair, pair, api_name=f"swap_{k + 1}", api_visibility="undocumented")
