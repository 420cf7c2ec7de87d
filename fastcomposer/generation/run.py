"""One generation request, end to end, shared by the command line and the web app.

    request -> validate (limits, subject count) -> face crops -> seed -> pipeline -> PNGs with settings

Everything a user can get wrong raises `GenerationError` with a message that names the problem and
the fix, before any model work starts; each message reads right on the page, the command line and in
Python (`message_for`, see messages.py): settings are named as each knows them (`{num_inference_steps}` is
"steps", "--steps" or "`num_inference_steps`").
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace

import PIL.Image
import torch

from ..config import SETTINGS, VERSION, Limits
from ..inputs.faces import DEFAULT_MARGIN
from ..inputs.prompt import subject_words
from ..messages import PhotoRef, UserFacingError
from ..pipeline.boxes import normalise_boxes
from ..pipeline.overlays import overlay
from ..pipeline.previews import latents_to_rgb
from .metadata import GenerationRecord, with_metadata
from .request import (  # noqa: F401  (re-exported: `fastcomposer.generation.run.GenerationRequest` and co.)
    OUT_OF_MEMORY,
    GenerationError,
    GenerationRequest,
    GenerationResult,
    negative_prompt_of,
    seed_of,
    validate,
)

logger = logging.getLogger(__name__)

def photo_groups(images: Sequence) -> list[list[PIL.Image.Image]]:
    """Per subject, its list of photos (a plain image is one photo)."""
    return [[item] if isinstance(item, PIL.Image.Image) else list(item) for item in images]


def prepare_subjects(
    images: Sequence[PIL.Image.Image | Sequence[PIL.Image.Image]],
    face_crop: bool,
    crop_fn: Callable | None = None,
    names: Sequence[str | PhotoRef | Sequence[str | PhotoRef]] | None = None,
    margin: float | None = None,
) -> list[list[PIL.Image.Image]]:
    """Per subject, the images the encoder will see: face crops (default) or the photos as they are.

    `names` say how messages refer to each photo, per subject one name or one per photo ("photo 1", or "photo 2 of
    subject 1" when a subject has several, by default); a `PhotoRef` with the file's path lets the command line's
    wording name the file. `margin` is the crop side over the face width (None: the cropper's default); it is
    passed to `crop_fn` only when given, so a custom `crop_fn(image, name=...)` keeps working.
    """
    groups = photo_groups(images)
    if not face_crop:
        return groups
    if crop_fn is None:
        from ..inputs.faces import crop_subject as crop_fn

    def default(k: int, j: int, group: list) -> str:
        return f"photo {k + 1}" if len(group) == 1 else f"photo {j + 1} of subject {k + 1}"

    def name(k: int, j: int, group: list):
        if names is None:
            return default(k, j, group)
        given = names[k]
        return given[j] if isinstance(given, (list, tuple)) else given

    sized = {} if margin is None else {"margin": float(margin)}
    return [[crop_fn(image, name=name(k, j, group), **sized).image for j, image in enumerate(group)]
            for k, group in enumerate(groups)]


PREVIEW_EVERY = 2  # loop iterations between live previews: often enough to watch, cheap (< 1 ms each)


def generate(
    pipe,
    request: GenerationRequest,
    *,
    subjects: Sequence[PIL.Image.Image | Sequence[PIL.Image.Image]] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    on_preview: Callable[[int, int, list[PIL.Image.Image]], None] | None = None,
    stop: threading.Event | None = None,
    limits: Limits = SETTINGS.limits,
    crop_fn: Callable | None = None,
    on_stage: Callable[[str, int, int], None] | None = None,
) -> GenerationResult:
    """Validate, crop, seed and run one request.

    Args:
        pipe: a loaded [`FastComposerPipeline`].
        request: the user's settings.
        subjects: already-prepared encoder inputs (e.g. crops the user has seen), per subject one image or a
            list; cropped here when None.
        on_step: called as `on_step(done, total)` after each denoising iteration (for progress bars).
        on_preview: called as `on_preview(done, total, images)` every `PREVIEW_EVERY` iterations with cheap
            previews of the images forming (see previews.py); the final images still come from the VAE.
        stop: when set, the run ends after the current iteration and returns `interrupted=True`; during the face pass,
            the images are kept with the faces redrawn so far.
        on_stage: called as `on_stage("image 1 · face 2/3", done, total)` at each step of the face pass.

    Raises:
        `GenerationError` for bad requests, faces not found, and out-of-memory.
    """
    # 1. Check everything before any model work
    validate(request, pipe.tokenizer, limits)

    # 2. The encoder's inputs, per subject
    subjects = encoder_inputs(request, subjects, crop_fn)

    # 3. Seed: a CPU generator, so a seed means the same image on any device
    seed = seed_of(request.seed, limits)
    if stop is not None and stop.is_set():  # stopped while photos were prepared: run nothing
        return GenerationResult([], [], seed, interrupted=True)

    # 4. Run, reporting progress (and previews) and honouring Stop between iterations
    reporter = StepReporter(on_step, on_preview, stop)
    out = run_pipeline(pipe, request, subjects, seed, reporter)
    records = image_records(pipe, request, seed, subjects, len(out.images))

    # 5. The face pass: each subject's face redrawn with that subject alone (face_detail.py); the identity check
    # scores the image before it too, so the PNG shows what the pass did
    detail = face_pass(pipe, request, out, subjects, seed, records, on_stage, stop)

    # 6. Attach the settings to every image (and the identity check's report, when asked)
    identity = check_identity(request, out, subjects, records)
    images = [with_metadata(image, record) for image, record in zip(out.images, records)]
    nsfw = list(out.nsfw_content_detected or [False] * len(images))
    result = GenerationResult(images, records, seed, nsfw, subjects, out.interrupted, identity=identity,
                              steps_done=reporter.done, total_steps=reporter.total,
                              notes=detail.notes if detail else [], detail_stopped=bool(detail and detail.stopped))

    # 7. Attention overlays: each subject's map tinted on its image, with the subject words as a legend
    if request.attention_maps:
        result.attention = attention_overlays(request, out, images, nsfw)
    return result


def face_pass(pipe, request: GenerationRequest, out, subjects: list, seed: int, records: list,
              on_stage: Callable | None, stop: threading.Event | None):
    """Run the face pass on `out.images` in place when the request asks for it; its `DetailResult`, else None."""
    if not request.detail_faces or not out.images or out.interrupted:
        return None
    from .face_detail import assignment_of, detail_images

    hidden = list(out.nsfw_content_detected or [False] * len(out.images))
    before = check_identity(request, out, subjects, [])
    for record, report in zip(records, before):
        record.identity_before = report.to_dict()
    try:
        detail = detail_images(pipe, request, list(out.images), hidden, subjects, seed,
                               getattr(out, "attention", None), on_stage=on_stage, stop=stop,
                               identity=assignment_of(before))
    except torch.OutOfMemoryError:
        detail = None  # the main images are kept
    if detail is None:
        free_memory()
        logger.warning("the face pass ran out of memory; the images are kept without it")
        return None
    out.images = detail.images
    return detail


def encoder_inputs(request: GenerationRequest, subjects: Sequence | None, crop_fn: Callable | None) -> list[list]:
    """Per subject, the images the encoder sees: `subjects` as given, else the request's photos cropped."""
    if subjects is None:
        try:
            subjects = prepare_subjects(request.images, request.face_crop, crop_fn, margin=request.crop_margin)
        except UserFacingError as e:  # NoFaceFoundError: keep its wording for every audience
            raise GenerationError(e.wording, e.photo, **e.facts) from None
        except ValueError as e:  # from a custom crop_fn
            raise GenerationError(str(e)) from None
    return photo_groups(subjects)


class StepReporter:
    """The pipeline's step callback: counts iterations, reports them (and previews), and passes on Stop."""

    def __init__(self, on_step: Callable | None, on_preview: Callable | None, stop: threading.Event | None):
        self.on_step, self.on_preview, self.stop = on_step, on_preview, stop
        self.done = 0  # iterations finished
        self.total = 0  # iterations planned

    def __call__(self, pipe, i: int, t, tensors: dict) -> dict:
        self.done, self.total = i + 1, pipe._num_timesteps
        if self.on_step is not None:
            self.on_step(self.done, self.total)
        denoised = tensors.get("denoised")
        if self.on_preview is not None and denoised is not None and self.done % PREVIEW_EVERY == 0 \
                and self.done < self.total:
            self.on_preview(self.done, self.total, latents_to_rgb(denoised))
        if self.stop is not None and self.stop.is_set():
            pipe.request_stop()
        return tensors


def run_pipeline(pipe, request: GenerationRequest, subjects: list[list], seed: int, reporter: StepReporter):
    """One pipeline call for `request`; out of memory becomes a `GenerationError` after freeing what it can."""
    pipe.use_scheduler(request.scheduler)
    extra = {"callback_on_step_end_tensor_inputs": ["latents", "denoised"]} if reporter.on_preview else {}
    extra["cache_interval"] = int(request.cache_interval)  # explicit: a pipeline's own preset must not add caching
    if request.attention_maps or request.detail_faces:  # the face pass matches faces by attention
        extra["return_attention"] = True
    if request.boxes is not None or request.separate:  # only then: without them the call is exactly as before
        extra.update(boxes=request.boxes, separate=bool(request.separate))
    try:
        out = pipe(
            request.prompt,
            subjects,
            negative_prompt=negative_prompt_of(request),
            height=int(request.height),
            width=int(request.width),
            num_inference_steps=int(request.num_inference_steps),
            guidance_scale=float(request.guidance_scale),
            alpha=float(request.alpha),
            num_images_per_prompt=int(request.num_images),
            generator=torch.Generator("cpu").manual_seed(seed),
            callback_on_step_end=reporter,
            **extra,
        )
    except torch.OutOfMemoryError:
        out = None  # leave the except block first so the traceback's tensors can be freed
    if out is None:
        free_memory()
        raise GenerationError(OUT_OF_MEMORY)
    return out


def image_records(pipe, request: GenerationRequest, seed: int, subjects: list[list], count: int) -> list:
    """One `GenerationRecord` per image: every setting that made it, for its PNG."""
    base = GenerationRecord(
        prompt=request.prompt, negative_prompt=negative_prompt_of(request), seed=seed, alpha=float(request.alpha),
        guidance_scale=float(request.guidance_scale), num_inference_steps=int(request.num_inference_steps),
        scheduler=request.scheduler, height=int(request.height), width=int(request.width),
        num_images=int(request.num_images), face_crop=bool(request.face_crop), crop_margin=recorded_margin(request),
        model=getattr(pipe, "weights_label", ""), version=VERSION,
        cache_interval=int(request.cache_interval), preset=request.preset,
        photos_per_subject=[len(group) for group in subjects],
        loras=[lora.label for lora in getattr(pipe, "active_loras", [])],
        boxes=recorded_boxes(request, len(subjects)), separate=bool(request.separate),
        detail_faces=bool(request.detail_faces),
        detail_strength=float(request.detail_strength) if request.detail_faces else None,
    )
    return [replace(base, image_index=k) for k in range(count)]


def recorded_boxes(request: GenerationRequest, num_subjects: int) -> list | None:
    """The boxes as the PNG keeps them: one list of four floats (or None) per subject; None without boxes."""
    if request.boxes is None or all(box is None for box in request.boxes):
        return None
    return [None if box is None else [float(v) for v in box] for box in normalise_boxes(request.boxes, num_subjects)]


def attention_overlays(request: GenerationRequest, out, images: list, nsfw: list[bool]) -> list[PIL.Image.Image]:
    """Per image, its subjects' attention overlay (a hidden image keeps its placeholder); [] without capture."""
    attention = getattr(out, "attention", None)
    if attention is None or not images:
        return []
    words = subject_words(request.prompt)
    regions = attention.regions
    return [
        placeholder if hidden else overlay(image, attention.maps[k], words, regions=None if regions is None
                                           else regions[k], boxes=attention.boxes)
        for k, (image, hidden, placeholder) in enumerate(zip(images, nsfw, out.images))
    ]


def recorded_margin(request: GenerationRequest) -> float | None:
    """The crop margin the photos were cropped with, for the PNG (None when the photos went in whole)."""
    if not request.face_crop:
        return None
    return float(DEFAULT_MARGIN if request.crop_margin is None else request.crop_margin)


def check_identity(request: GenerationRequest, out, subjects: Sequence, records: list[GenerationRecord]) -> list:
    """When the request asks for it, one `identity.IdentityReport` per image of `out` against the encoder's
    inputs `subjects` (a photo, or a list of photos, per subject), stored in each record too. Never raises."""
    if not request.identity_check or not out.images:
        return []
    from ..identity.checker import default_checker, subject_names

    names = subject_names(request.prompt, len(subjects))
    reports = default_checker().check_images(out.images, subjects, names, hidden=out.nsfw_content_detected)
    for record, report in zip(records, reports):
        record.identity = report.to_dict()
    return reports


def free_memory() -> None:
    """Return cached accelerator memory after a failure, so the next request starts clean."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
