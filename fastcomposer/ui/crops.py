"""What the encoder sees of each photo: safe loading, the face crop at the chosen margin, and a preview that
shows where on the photo the crop was taken (the photo, the crop square drawn on it, the rest dimmed).

The preview and the generation call the same `SubjectLoader.load`, so the square on the page is the crop the
model gets. Messages name photos as the library does (`generation.prepare_subjects`): "photo 2" for a subject's
only photo, "photo 1 of subject 2" when it has several.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import gradio as gr
import PIL.Image
import PIL.ImageDraw
import PIL.ImageEnhance

from ..config import Limits
from ..messages import message_for

PREVIEW_SIDE = 384  # previews are thumbnails: a 16 MP upload must not travel back to the browser at full size
OUTSIDE_BRIGHTNESS = 0.45  # what the crop leaves out is darkened to this, so the square stands out on any photo
FACE_BOX_COLOUR = (255, 255, 255)


def photo_name(k: int, j: int, count: int) -> str:
    """How messages name photo j of subject k (0-based), as `generation.prepare_subjects` does."""
    return f"photo {k + 1}" if count == 1 else f"photo {j + 1} of subject {k + 1}"


@dataclass
class PhotoPreview:
    """One photo of a slot, as the page shows it."""

    image: PIL.Image.Image | None  # the photo with the crop drawn; None when it could not be read
    caption: str  # under the thumbnail, short enough for a phone: "2 · face ✓"
    status: str  # the slot's status line about it: "photo 1: face found ✓" (numbered within its subject) or "✗ ..."
    ok: bool  # usable as it is


def draw_crop(photo: PIL.Image.Image, crop_box: tuple | None, face_box: tuple | None,
              colour: tuple[int, int, int]) -> PIL.Image.Image:
    """The photo (at most PREVIEW_SIDE px) with the crop square in the subject's colour, the face box in white and
    everything outside the crop dimmed; the photo as it is when there is no crop."""
    rgb = photo.convert("RGB")
    scale = min(1.0, PREVIEW_SIDE / max(rgb.size))
    if scale < 1.0:
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))),
                         PIL.Image.Resampling.LANCZOS)
    if crop_box is None:
        return rgb
    box = tuple(round(v * scale) for v in crop_box)
    out = PIL.ImageEnhance.Brightness(rgb).enhance(OUTSIDE_BRIGHTNESS)
    out.paste(rgb.crop(box), box[:2])
    draw = PIL.ImageDraw.Draw(out)
    width = max(2, round(min(rgb.size) / 90))
    draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=colour, width=width)
    if face_box is not None:
        face = tuple(round(v * scale) for v in face_box)
        draw.rectangle((face[0], face[1], face[2] - 1, face[3] - 1), outline=FACE_BOX_COLOUR,
                       width=max(1, width // 2))
    return out


class SubjectLoader:
    """Photos of subject k+1 -> what the encoder sees, with our safe loader and the face cropper."""

    def __init__(self, limits: Limits, cropper, colours: Sequence[tuple[int, int, int]]):
        self.limits, self.cropper, self.colours = limits, cropper, colours

    def load(self, name: str, path: str, face_crop: bool, whole: bool, margin: float | None):
        """(photo, its `faces.FaceCrop` or None when used whole). Raises ImageError, NoFaceFoundError, or
        ValueError when no face detector can run at all; callers choose how to show each."""
        from ..inputs.images import load_image

        image = load_image(path, name=name, limits=self.limits)
        if not face_crop or whole:
            return image, None
        return image, self.cropper.crop(image, name=name, margin=margin)

    def for_generation(self, k: int, paths: Sequence[str], face_crop: bool, wholes: Sequence[int],
                       margin: float | None) -> list[PIL.Image.Image]:
        """The encoder's inputs for subject k+1, one per photo; every problem becomes a gr.Error naming the photo.

        `wholes` holds the 1-based numbers of the photos to use uncropped.
        """
        from ..inputs.faces import NoFaceFoundError
        from ..inputs.images import ImageError

        crops = []
        for j, path in enumerate(paths):
            try:
                image, crop = self.load(photo_name(k, j, len(paths)), path, face_crop, j + 1 in wholes, margin)
            except ImageError as e:  # the page's wording: never a path (see messages.py)
                raise gr.Error(e.message_for("page"), title="Photo problem") from None
            except NoFaceFoundError as e:
                raise gr.Error(e.message_for("page"), title="No face found") from None
            except ValueError as e:  # no detector at all (e.g. OpenCV 5 installed): the message says what to do
                raise gr.Error(message_for(e, "page"), title="Face crop unavailable") from None
            crops.append(image if crop is None else crop.image)
        return crops

    def preview_one(self, k: int, j: int, count: int, path: str, face_crop: bool, whole: bool,
                    margin: float | None) -> PhotoPreview:
        """Photo j+1 of subject k+1 as the page shows it; problems become its status."""
        from ..inputs.faces import NoFaceFoundError
        from ..inputs.images import ImageError, load_image

        number = j + 1
        here = f"photo {number}"  # inside subject k's slot its photos are numbered within the subject
        colour = self.colours[k % len(self.colours)]
        try:
            image, crop = self.load(here, path, face_crop, whole, margin)
        except ImageError as e:
            return PhotoPreview(None, f"{number} · ✗ unusable", f"✗ {e.message_for('page')}", False)
        except NoFaceFoundError:
            photo = load_image(path, limits=self.limits)
            return PhotoPreview(draw_crop(photo, None, None, colour), f"{number} · ✗ no face",
                                f"✗ no face found in {here}: tick {number} under 'Use whole photo' or try a "
                                "clearer photo", False)
        except ValueError as e:
            return PhotoPreview(None, f"{number} · ✗ no detector", f"✗ {message_for(e, 'page')}", False)
        if crop is None:
            return PhotoPreview(draw_crop(image, None, None, colour), f"{number} · whole photo",
                                f"{here}: whole photo", True)
        several = f" ({crop.num_faces} faces: the largest is used)" if crop.num_faces > 1 else ""
        return PhotoPreview(draw_crop(image, crop.box, crop.face_box, colour), f"{number} · face ✓",
                            f"{here}: face found ✓{several}", True)

    def preview(self, k: int, paths: Sequence[str], face_crop: bool, wholes: Sequence[int],
                margin: float | None) -> tuple[list, str]:
        """(the slot's preview gallery, its status line) for subject k+1's photos."""
        if not paths:
            return [], ""
        views = [self.preview_one(k, j, len(paths), path, face_crop, j + 1 in wholes, margin)
                 for j, path in enumerate(paths)]
        gallery = [(v.image, v.caption) for v in views if v.image is not None]
        if len(paths) > self.limits.max_photos_per_subject:
            lines = [f"✗ {len(paths)} photos: give at most {self.limits.max_photos_per_subject} per subject "
                     "(remove one with its ✕)"]
        elif len(views) == 1 or not all(v.ok for v in views):
            lines = [v.status for v in views if len(views) == 1 or not v.ok]
        else:
            lines = [f"{len(views)} photos ✓ (averaged into one subject)"]
        return gallery, "  \n".join(lines)
