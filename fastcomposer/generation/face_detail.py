"""The face pass: a second look at each subject's face, conditioned on that subject alone.

In a 512 px image of two or three people each face is 60-120 px wide, and Stable Diffusion 1.5 loses identity with
detail at that size. A detailer (as A1111's ADetailer does) finds each face, redraws a crop of it at the model's
full 512 px from a partly noised copy, and pastes it back. FastComposer knows whose face each one is, so the redraw
is a one-subject FastComposer run with that subject's photos alone (`pipeline.redraw`), on a canvas where
identity holds best.

Per image:
1. **Faces**: our face detector (RetinaFace, MTCNN offline).
2. **Whose**: the layout box holding the face's centre; else the subject whose attention (captured in the main run,
   or the region separation gave it) has the most mass in the face box, clearly more than the next; else the
   identity check's optimal assignment when the request has the check on (its report on the image, made before the
   pass with the same detector, says which face went to whom). A face matched to no subject is left alone.
3. **Redraw**: a square around the face (`margin` x its size), enlarged to 512 px, noised to `strength` and
   denoised with "a close-up portrait photo of a <word> img" and that subject's photos. The main prompt's style
   words are not added: whether they help cannot be measured on random weights; at strength 0.4 the crop keeps
   the main image's colours and style anyway.
4. **Paste**: scaled back down and blended in with a mask that fades over the crop's outer `feather` share, so no
   seam shows; every pixel outside the crop stays as it was.
Seeds are derived from the run's seed, the image's index and the face's index, so a run stays reproducible.

This is a step of `generate` rather than of the pipeline: it needs the face detector and, as its third way to match
faces, the identity check, which sit above the pipeline, and it reports progress and honours Stop as the run does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch

from ..config import DETAIL, DetailSettings  # noqa: F401  (re-exported: the face pass's settings)

logger = logging.getLogger(__name__)


FACE_PROMPT = "a close-up portrait photo of a {word} img"


@dataclass
class FaceMatch:
    """One detected face and whose it is."""

    face: tuple[int, int, int, int]  # the detected face box, in the image
    crop: tuple[int, int, int, int]  # the square that is redrawn
    subject: int | None  # the subject's index in marker order; None: left alone
    how: str = ""  # "box", "attention", "identity", or "" when unmatched


def detail_seed(seed: int, image_index: int, face_index: int) -> int:
    """The seed of one face's redraw: from the run's seed, so the whole run stays reproducible."""
    return (seed * 1_000_003 + 7_919 * (image_index + 1) + 104_729 * (face_index + 1)) % (2**31 - 1)


def face_crop(face: Sequence[int], size: tuple[int, int], margin: float = DETAIL.margin) -> tuple[int, int, int, int]:
    """A square `margin` x the face's larger side, centred on the face, shifted (never shrunk) into the image.

    Not `inputs.faces.square_box`: that one frames the encoder's head-and-shoulders crop (sized by the face's width,
    centred lower, shrunk to fit); this one frames the face itself, which is what is redrawn."""
    width, height = size
    x0, y0, x1, y1 = face
    side = min(round(max(x1 - x0, y1 - y0) * margin), width, height)
    left = min(max(round((x0 + x1 - side) / 2), 0), width - side)
    top = min(max(round((y0 + y1 - side) / 2), 0), height - side)
    return left, top, left + side, top + side


def by_box(face: Sequence[int], size: tuple[int, int], boxes: Sequence | None) -> int | None:
    """The subject whose layout box holds the face's centre (the nearest box centre when several do)."""
    if not boxes:
        return None
    cx, cy = (face[0] + face[2]) / 2 / size[0], (face[1] + face[3]) / 2 / size[1]
    holding = [(k, b) for k, b in enumerate(boxes) if b is not None and b[0] <= cx <= b[2] and b[1] <= cy <= b[3]]
    if not holding:
        return None
    def distance(kb):
        return ((kb[1][0] + kb[1][2]) / 2 - cx) ** 2 + ((kb[1][1] + kb[1][3]) / 2 - cy) ** 2

    return min(holding, key=distance)[0]


def by_attention(face: Sequence[int], size: tuple[int, int], maps: torch.Tensor | None,
                 lead: float = DETAIL.attention_lead) -> int | None:
    """The subject with the most attention mass in the face box, if it leads the next by `lead`; `maps` is
    (k, h, w) for this image (attention, or the regions separation assigned, as 0/1)."""
    if maps is None or len(maps) == 0:
        return None
    k, h, w = maps.shape
    x0, y0 = int(face[0] / size[0] * w), int(face[1] / size[1] * h)
    x1, y1 = max(x0 + 1, int(np.ceil(face[2] / size[0] * w))), max(y0 + 1, int(np.ceil(face[3] / size[1] * h)))
    mass = maps[:, y0:y1, x0:x1].float().sum(dim=(1, 2)).tolist()
    order = sorted(range(k), key=lambda j: mass[j], reverse=True)
    if mass[order[0]] <= 0 or (k > 1 and mass[order[0]] < lead * mass[order[1]]):
        return None
    return order[0]


def feather_mask(side: int, feather: float = DETAIL.feather) -> PIL.Image.Image:
    """A square "L" mask: 255 inside, fading linearly to 0 at the edges over `feather` x `side` pixels."""
    ramp = max(1, round(side * feather))
    edge = np.minimum(np.arange(side), np.arange(side)[::-1]).astype(np.float32)
    line = np.clip((edge + 0.5) / ramp, 0.0, 1.0)
    return PIL.Image.fromarray(np.round(np.outer(line, line) * 255).astype(np.uint8), mode="L")


def paste(image: PIL.Image.Image, redrawn: PIL.Image.Image, crop: tuple[int, int, int, int],
          feather: float = DETAIL.feather) -> PIL.Image.Image:
    """`redrawn` scaled to `crop` and blended into a copy of `image` through the feathered mask."""
    side = crop[2] - crop[0]
    out = image.copy()
    out.paste(redrawn.resize((side, side), PIL.Image.Resampling.LANCZOS), crop[:2], feather_mask(side, feather))
    return out


def match_faces(faces: list, size: tuple[int, int], boxes: Sequence | None, maps: torch.Tensor | None,
                identity: Callable | None = None, settings: DetailSettings = DETAIL) -> list[FaceMatch]:
    """Whose each face is (see the module docstring); each subject gets at most one face, the first found for it."""
    matches, taken = [], set()
    for face in faces:
        box = tuple(int(v) for v in face.box)
        subject, how = by_box(box, size, boxes), "box"
        if subject is None:
            subject, how = by_attention(box, size, maps, settings.attention_lead), "attention"
        if subject is None and identity is not None:
            subject, how = identity(box), "identity"
        if subject in taken:
            subject = None
        if subject is not None:
            taken.add(subject)
        how = how if subject is not None else ""
        matches.append(FaceMatch(box, face_crop(box, size, settings.margin), subject, how))
    return matches


@dataclass
class DetailResult:
    """The face pass over a run's images."""

    images: list[PIL.Image.Image]  # with their matched faces redrawn
    notes: list[str]  # per image, for its caption: "2 faces refined", "no face found", ...
    matches: list[list[FaceMatch]]  # per image, every face found and whose it is
    stopped: bool = False  # Stop came during the pass: the face being redrawn (and any after it) kept as they were


class FaceProgress:
    """The redraw's step callback: reports "image 1 · face 2/3" steps and passes on Stop."""

    def __init__(self, label: str, on_stage: Callable | None, stop):
        self.label, self.on_stage, self.stop = label, on_stage, stop

    def __call__(self, pipe, i: int, t, tensors: dict) -> dict:
        if self.on_stage is not None:
            self.on_stage(self.label, i + 1, pipe._num_timesteps)
        if self.stop is not None and self.stop.is_set():
            pipe.request_stop()
        return tensors


def image_maps(attention, k: int) -> torch.Tensor | None:
    """What decides faces by attention for image k: separation's regions when it ran, else the attention maps."""
    if attention is None:
        return None
    if attention.regions is not None and attention.regions[k].any():
        return attention.regions[k].float()
    return attention.maps[k]


def detail_images(pipe, request, images: list, hidden: list[bool], subjects: list, seed: int, attention=None, *,
                  on_stage: Callable | None = None, stop=None, cropper=None, identity: Callable | None = None,
                  settings: DetailSettings = DETAIL) -> DetailResult:
    """Redraw each subject's face in each image (see the module docstring); hidden images are left alone.

    Args:
        request: the `GenerationRequest` (its prompt, boxes, strength, steps, guidance, negative prompt).
        subjects: per subject, the encoder's inputs (its crops); each face is redrawn with its subject's alone.
        attention: the main run's `SubjectAttention` (captured when the pass is on), for matching faces.
        on_stage: called as `on_stage("image 1 · face 2/3", done, total)` at each redraw step.
        identity: `identity(image_index, face_box) -> subject or None`, the third way to match (see
            `assignment_of`).
    """
    from ..inputs.faces import default_cropper
    from ..inputs.prompt import subject_words
    from ..pipeline.boxes import normalise_boxes
    from .request import negative_prompt_of

    cropper, words = cropper or default_cropper(), subject_words(request.prompt)
    boxes = normalise_boxes(request.boxes, len(subjects)) if request.boxes else None
    out = DetailResult([], [], [])
    for k, image in enumerate(images):
        faces = [] if hidden[k] else cropper.detect(image)
        ask = None if identity is None else (lambda box, k=k: identity(k, box))
        matches = match_faces(faces, image.size, boxes, image_maps(attention, k), ask, settings)
        todo = [m for m in matches if m.subject is not None]
        redrawn_faces = 0
        for f, match in enumerate(todo):
            if out.stopped:
                break
            word = words[match.subject] if match.subject < len(words) else "person"
            progress = FaceProgress(f"image {k + 1} · face {f + 1}/{len(todo)}", on_stage, stop)
            redrawn = pipe.redraw(
                image.crop(match.crop).resize((settings.side, settings.side), PIL.Image.Resampling.LANCZOS),
                FACE_PROMPT.format(word=word), [subjects[match.subject]], float(request.detail_strength),
                negative_prompt=negative_prompt_of(request), num_inference_steps=int(request.num_inference_steps),
                guidance_scale=float(request.guidance_scale),
                generator=torch.Generator("cpu").manual_seed(detail_seed(seed, k, f)), callback_on_step_end=progress)
            out.stopped = redrawn.interrupted
            if redrawn.image is not None:
                image = paste(image, redrawn.image, match.crop, settings.feather)
                redrawn_faces += 1
        out.images.append(image)
        out.matches.append(matches)
        out.notes.append(detail_note(matches, redrawn_faces, hidden[k], out.stopped and redrawn_faces < len(todo)))
    return out


def assignment_of(reports: Sequence) -> Callable | None:
    """The identity check's assignment as a way to match faces: `(image_index, face_box) -> subject or None`.

    Each image's report was made before the pass, on the same image with the same detector, so its face boxes are
    the pass's; the subject it gave a face to is read back, and nothing is embedded again. None
    without reports (the check off) or when they cannot say (unavailable).
    """
    if not reports or not any(r.available for r in reports):
        return None

    def whose(image_index: int, face_box: Sequence[int]) -> int | None:
        report = reports[image_index] if image_index < len(reports) else None
        if report is None or not report.available:
            return None
        found = [i for i, box in enumerate(report.faces) if tuple(int(v) for v in box) == tuple(face_box)]
        if not found:
            return None
        owners = [k for k, s in enumerate(report.subjects) if s.found and s.face == found[0]]
        return owners[0] if owners else None

    return whose


def detail_note(matches: list[FaceMatch], redrawn: int, hidden: bool, stopped: bool) -> str:
    """The caption's word on the face pass for one image."""
    if hidden:
        return ""
    if not matches:
        return "refine faces: no face found"
    if not any(m.subject is not None for m in matches):
        return "refine faces: no face matched a subject"
    note = f"{redrawn} face{'s' if redrawn != 1 else ''} refined"
    return note + (" (stopped: the rest kept as they were)" if stopped else "")
