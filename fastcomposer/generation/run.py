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
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import PIL.Image
import torch

from ..config import SETTINGS, VERSION, Limits
from ..inputs.faces import DEFAULT_MARGIN, MARGIN_HEAD_AND_SHOULDERS, MARGIN_TIGHT_FACE
from ..inputs.prompt import ParsedPrompt, parse_prompt, subject_words
from ..messages import PhotoRef, UserFacingError, Wording
from ..pipeline.attention import overlay
from ..pipeline.previews import latents_to_rgb
from ..pipeline.schedulers import SCHEDULERS, max_steps
from .metadata import GenerationRecord, with_metadata

logger = logging.getLogger(__name__)

OOM_MESSAGE = "out of memory: try fewer images, fewer steps or a smaller size"  # the page's wording of OUT_OF_MEMORY
OUT_OF_MEMORY = Wording(
    page=OOM_MESSAGE,
    cli="out of memory: try fewer --num-images, fewer --steps or a smaller --width/--height",
    api="out of memory: try a smaller `num_images`, `num_inference_steps` or `height`/`width`",
)
# The subject count: the page's photo slots, the command line's --image flags, Python's `images` list.
TOO_FEW_PHOTOS = Wording(
    page="add at least one subject photo",
    cli="give at least one subject photo with --image",
    api="`images` is empty; pass at least one subject photo",
)
TOO_MANY_PHOTOS = Wording(
    page="{n} photos were given; at most {limit} subjects are supported",
    cli="{n} --image photos were given; at most {limit} subjects are supported",
    api="`images` holds {n} photos; at most {limit} subjects are supported",
)
COUNT_MISMATCH = Wording(
    page="{markers} subject(s) in the prompt but {n} photo(s): {fix} (write `img` after each subject word, one per "
    "photo, in photo order)",
    cli="{markers} subject(s) in the prompt but {n} photo(s): {fix} (write `img` after each subject word, one per "
    "--image, in the same order)",
    api="{markers} subject(s) in the prompt but {n} photo(s) in `images`: {fix} (write `img` after each subject "
    "word, one per photo, in the same order)",
)
ADD_A_PHOTO = Wording("add a photo or remove an `img`", "add an --image or remove an `img`",
                      "add a photo to `images` or remove an `img`")
REMOVE_A_PHOTO = Wording("remove a photo or add `img` after a subject word",
                         "drop an --image or add `img` after a subject word",
                         "remove a photo from `images` or add `img` after a subject word")


class GenerationError(UserFacingError, ValueError):
    """A request that cannot run as given; `message_for(audience)` words it for the page, CLI or Python."""


@dataclass
class GenerationRequest:
    """What the user asked for. `seed=-1` means a random seed; `negative_prompt=None` means our default."""

    prompt: str
    # Per `img` marker, in marker order: one safely loaded RGB photo, or a list of 1-4 photos of that subject.
    images: Sequence[PIL.Image.Image | Sequence[PIL.Image.Image]]
    negative_prompt: str | None = None
    alpha: float = SETTINGS.defaults.alpha
    guidance_scale: float = SETTINGS.defaults.guidance_scale
    num_inference_steps: int = SETTINGS.defaults.num_inference_steps
    num_images: int = SETTINGS.defaults.num_images
    height: int = SETTINGS.defaults.height
    width: int = SETTINGS.defaults.width
    seed: int = -1
    scheduler: str = SETTINGS.defaults.scheduler
    face_crop: bool = True
    crop_margin: float | None = None  # face crop side over face width (faces.py); None: faces.DEFAULT_MARGIN
    cache_interval: int = 1  # DeepCache: 1 = every UNet pass is full (see caching.py)
    preset: str | None = None  # the preset the settings came from, recorded in the PNG (informational)
    attention_maps: bool = False  # also return each image with its per-subject attention overlay
    identity_check: bool = False  # score each image's faces against the subjects (see identity.py)


@dataclass
class GenerationResult:
    images: list[PIL.Image.Image]  # with settings in `info` (written as PNG text chunks on save)
    records: list[GenerationRecord]
    seed: int
    nsfw: list[bool] = field(default_factory=list)  # per image: hidden by the safety checker
    subjects: list[list[PIL.Image.Image]] = field(default_factory=list)  # per subject, what the encoder saw
    interrupted: bool = False
    attention: list[PIL.Image.Image] = field(default_factory=list)  # per image, the overlay (when asked)
    steps_done: int = 0  # loop iterations that ran (all of them unless interrupted)
    total_steps: int = 0  # loop iterations planned
    identity: list = field(default_factory=list)  # per image, an `identity.IdentityReport` when it was asked for

    @property
    def num_hidden(self) -> int:
        return sum(self.nsfw)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()


def validate(request: GenerationRequest, tokenizer, limits: Limits = SETTINGS.limits) -> ParsedPrompt:
    """Check every field against `limits` and the subject count; return the parsed prompt.

    Server-side on purpose: Gradio checks slider ranges but not integer steps or text lengths, and API
    clients can send anything.
    """
    r = request

    def need(ok: bool, template: str | Wording, **facts: object) -> None:
        """Raise unless `ok`. `template` is a messages.py template: values go in `facts`, never into the string."""
        if not ok:
            raise GenerationError(Wording.same(template) if isinstance(template, str) else template, **facts)

    need(isinstance(r.prompt, str) and r.prompt.strip() != "",
         "{prompt} is empty; describe the scene, with `img` after each subject word")
    need(len(r.prompt) <= limits.max_prompt_chars,
         "{prompt} is {n} characters; the limit is {limit}", n=len(r.prompt), limit=limits.max_prompt_chars)
    need(r.negative_prompt is None or isinstance(r.negative_prompt, str), "{negative_prompt} must be text")
    need(r.negative_prompt is None or len(r.negative_prompt) <= limits.max_prompt_chars,
         "{negative_prompt} is too long; the limit is {limit} characters", limit=limits.max_prompt_chars)
    need(_is_int(r.num_inference_steps) and limits.min_steps <= r.num_inference_steps <= limits.max_steps,
         "{num_inference_steps} must be a whole number from {lo} to {hi}, got {value}",
         lo=limits.min_steps, hi=limits.max_steps, value=r.num_inference_steps)
    need(_is_int(r.num_images) and 1 <= r.num_images <= limits.max_images_per_run,
         "{num_images} must be a whole number from 1 to {hi}, got {value}",
         hi=limits.max_images_per_run, value=r.num_images)
    need(isinstance(r.alpha, (int, float)) and 0.0 <= r.alpha <= 1.0, "{alpha} must be between 0 and 1, got {value}",
         value=r.alpha)
    need(isinstance(r.guidance_scale, (int, float)) and limits.min_guidance <= r.guidance_scale <= limits.max_guidance,
         "{guidance_scale} must be between {lo} and {hi}, got {value}",
         lo=limits.min_guidance, hi=limits.max_guidance, value=r.guidance_scale)
    need(_is_int(r.seed) and (r.seed == -1 or 0 <= r.seed <= limits.max_seed),
         "{seed} must be -1 (random) or a whole number from 0 to {hi}, got {value}", hi=limits.max_seed, value=r.seed)
    need(r.scheduler in SCHEDULERS, "unknown {scheduler} {value!r}; choose one of {choices}",
         value=r.scheduler, choices=", ".join(SCHEDULERS))
    need(_is_int(r.cache_interval) and 1 <= r.cache_interval <= limits.max_cache_interval,
         "{cache_interval} must be a whole number from 1 (off) to {hi}, got {value}",
         hi=limits.max_cache_interval, value=r.cache_interval)
    need(r.crop_margin is None or (isinstance(r.crop_margin, (int, float)) and not isinstance(r.crop_margin, bool)
                                   and MARGIN_TIGHT_FACE <= r.crop_margin <= MARGIN_HEAD_AND_SHOULDERS),
         "{crop_margin} must be from {lo} (a tight face) to {hi} (head and shoulders), got {value}",
         lo=MARGIN_TIGHT_FACE, hi=MARGIN_HEAD_AND_SHOULDERS, value=r.crop_margin)
    need(max_steps(r.scheduler) is None or r.num_inference_steps <= max_steps(r.scheduler),
         "the {name} sampler takes at most {hi} steps (it is made for 2-8); lower {num_inference_steps}",
         name=r.scheduler, hi=max_steps(r.scheduler))
    for side_name, side in (("height", r.height), ("width", r.width)):
        need(_is_int(side) and limits.min_side <= side <= limits.max_side and int(side) % limits.size_multiple == 0,
             f"{{{side_name}}} must be a multiple of {{multiple}} from {{lo}} to {{hi}}, got {{value}}",
             multiple=limits.size_multiple, lo=limits.min_side, hi=limits.max_side, value=side)
    units = r.num_images * r.num_inference_steps * (r.height * r.width) / (512 * 512)
    need(units <= limits.max_compute_units,
         "this request is too large ({n} images x {steps} steps at {width_px}x{height_px}); use fewer "
         "{num_images}, fewer {num_inference_steps} or a smaller size (limit: {limit} image-steps at 512x512)",
         n=r.num_images, steps=r.num_inference_steps, width_px=r.width, height_px=r.height,
         limit=f"{limits.max_compute_units:g}")

    try:
        parsed = parse_prompt(r.prompt, tokenizer, max_subjects=limits.max_subjects)
    except ValueError as e:
        raise GenerationError(str(e)) from None
    n_images = len(r.images)
    for k, item in enumerate(r.images):
        count = 1 if item is None or isinstance(item, PIL.Image.Image) else len(item)
        need(1 <= count <= limits.max_photos_per_subject,
             "subject {k} has {n} photos; give 1 to {limit} photos per subject",
             k=k + 1, n=count, limit=limits.max_photos_per_subject)
    need(n_images >= 1, TOO_FEW_PHOTOS)
    need(n_images <= limits.max_subjects, TOO_MANY_PHOTOS, n=n_images, limit=limits.max_subjects)
    if parsed.num_subjects != n_images:
        fix = ADD_A_PHOTO if parsed.num_subjects > n_images else REMOVE_A_PHOTO
        raise GenerationError(COUNT_MISMATCH, markers=parsed.num_subjects, n=n_images, fix=fix)
    return parsed


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
        stop: when set, the run ends after the current iteration and returns `interrupted=True`.

    Raises:
        `GenerationError` for bad requests, faces not found, and out-of-memory.
    """
    # 1. Check everything before any model work
    validate(request, pipe.tokenizer, limits)

    # 2. The encoder's inputs, per subject
    if subjects is None:
        try:
            subjects = prepare_subjects(request.images, request.face_crop, crop_fn, margin=request.crop_margin)
        except UserFacingError as e:  # NoFaceFoundError: keep its wording for every audience
            raise GenerationError(e.wording, e.photo, **e.facts) from None
        except ValueError as e:  # from a custom crop_fn
            raise GenerationError(str(e)) from None
    subjects = photo_groups(subjects)

    # 3. Seed: a CPU generator, so a seed means the same image on any device
    seed = secrets.randbelow(limits.max_seed + 1) if request.seed == -1 else int(request.seed)
    generator = torch.Generator("cpu").manual_seed(seed)
    negative = SETTINGS.defaults.negative_prompt if request.negative_prompt is None else request.negative_prompt

    # 4. Run, reporting progress (and previews) and honouring Stop between iterations
    progress = {"done": 0, "total": 0}

    def step_end(p, i: int, t, tensors: dict) -> dict:
        progress.update(done=i + 1, total=p._num_timesteps)
        if on_step is not None:
            on_step(i + 1, p._num_timesteps)
        denoised = tensors.get("denoised")
        if on_preview is not None and denoised is not None and (i + 1) % PREVIEW_EVERY == 0 \
                and i + 1 < p._num_timesteps:
            on_preview(i + 1, p._num_timesteps, latents_to_rgb(denoised))
        if stop is not None and stop.is_set():
            p.request_stop()
        return tensors

    if stop is not None and stop.is_set():  # stopped while photos were prepared: run nothing
        return GenerationResult([], [], seed, interrupted=True)
    pipe.use_scheduler(request.scheduler)
    extra = {"callback_on_step_end_tensor_inputs": ["latents", "denoised"]} if on_preview is not None else {}
    extra["cache_interval"] = int(request.cache_interval)  # explicit: a pipeline's own preset must not add caching
    if request.attention_maps:
        extra["return_attention"] = True
    try:
        out = pipe(
            request.prompt,
            subjects,
            negative_prompt=negative,
            height=int(request.height),
            width=int(request.width),
            num_inference_steps=int(request.num_inference_steps),
            guidance_scale=float(request.guidance_scale),
            alpha=float(request.alpha),
            num_images_per_prompt=int(request.num_images),
            generator=generator,
            callback_on_step_end=step_end,
            **extra,
        )
    except torch.OutOfMemoryError:
        out = None  # leave the except block first so the traceback's tensors can be freed
    if out is None:
        free_memory()
        raise GenerationError(OUT_OF_MEMORY)

    # 5. Attach the settings to every image
    base = GenerationRecord(
        prompt=request.prompt, negative_prompt=negative, seed=seed, alpha=float(request.alpha),
        guidance_scale=float(request.guidance_scale), num_inference_steps=int(request.num_inference_steps),
        scheduler=request.scheduler, height=int(request.height), width=int(request.width),
        num_images=int(request.num_images), face_crop=bool(request.face_crop), crop_margin=recorded_margin(request),
        model=getattr(pipe, "weights_label", ""), version=VERSION,
        cache_interval=int(request.cache_interval), preset=request.preset,
        photos_per_subject=[len(group) for group in subjects],
        loras=[lora.label for lora in getattr(pipe, "active_loras", [])],
    )
    records = [replace(base, image_index=k) for k in range(len(out.images))]
    identity = check_identity(request, out, subjects, records)
    images = [with_metadata(image, record) for image, record in zip(out.images, records)]
    nsfw = list(out.nsfw_content_detected or [False] * len(images))
    result = GenerationResult(images, records, seed, nsfw, subjects, out.interrupted, identity=identity,
                              steps_done=progress["done"], total_steps=progress["total"])

    # 6. Attention overlays: each subject's map tinted on its image, with the subject words as a legend
    attention = getattr(out, "attention", None)
    if attention is not None and images:
        words = subject_words(request.prompt)
        result.attention = [
            placeholder if hidden else overlay(image, attention.maps[k], words)
            for k, (image, hidden, placeholder) in enumerate(zip(images, nsfw, out.images))
        ]
    return result


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
