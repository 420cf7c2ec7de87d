"""One generation request, end to end, shared by the command line and the web app.

    request -> validate (limits, subject count) -> face crops -> seed -> pipeline -> PNGs with settings

Everything a user can get wrong raises `GenerationError` with a message that names the problem and
the fix, before any model work starts.
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

from . import __version__
from .attention import overlay
from .config import SETTINGS, Limits
from .metadata import GenerationRecord, with_metadata
from .previews import latents_to_rgb
from .prompt import ParsedPrompt, parse_prompt, subject_words
from .schedulers import SCHEDULERS, max_steps

logger = logging.getLogger(__name__)

OOM_MESSAGE = "out of memory: try fewer images, fewer steps or a smaller size"


class GenerationError(ValueError):
    """A request that cannot run as given; the message is safe to show to the user."""


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

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise GenerationError(message)

    need(isinstance(r.prompt, str) and r.prompt.strip() != "",
         "the prompt is empty; describe the scene, with `img` after each subject word")
    need(len(r.prompt) <= limits.max_prompt_chars,
         f"the prompt is {len(r.prompt)} characters; the limit is {limits.max_prompt_chars}")
    need(r.negative_prompt is None or isinstance(r.negative_prompt, str), "the negative prompt must be text")
    need(r.negative_prompt is None or len(r.negative_prompt) <= limits.max_prompt_chars,
         f"the negative prompt is too long; the limit is {limits.max_prompt_chars} characters")
    need(_is_int(r.num_inference_steps) and limits.min_steps <= r.num_inference_steps <= limits.max_steps,
         f"steps must be a whole number from {limits.min_steps} to {limits.max_steps}, got {r.num_inference_steps}")
    need(_is_int(r.num_images) and 1 <= r.num_images <= limits.max_images_per_run,
         f"images per run must be a whole number from 1 to {limits.max_images_per_run}, got {r.num_images}")
    need(isinstance(r.alpha, (int, float)) and 0.0 <= r.alpha <= 1.0, f"alpha must be between 0 and 1, got {r.alpha}")
    need(isinstance(r.guidance_scale, (int, float)) and limits.min_guidance <= r.guidance_scale <= limits.max_guidance,
         f"guidance must be between {limits.min_guidance} and {limits.max_guidance}, got {r.guidance_scale}")
    need(_is_int(r.seed) and (r.seed == -1 or 0 <= r.seed <= limits.max_seed),
         f"seed must be -1 (random) or a whole number from 0 to {limits.max_seed}, got {r.seed}")
    need(r.scheduler in SCHEDULERS, f"unknown sampler {r.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    need(_is_int(r.cache_interval) and 1 <= r.cache_interval <= limits.max_cache_interval,
         f"the cache interval must be a whole number from 1 (off) to {limits.max_cache_interval}, "
         f"got {r.cache_interval}")
    need(max_steps(r.scheduler) is None or r.num_inference_steps <= max_steps(r.scheduler),
         f"the {r.scheduler} sampler takes at most {max_steps(r.scheduler)} steps (it is made for 2-8)")
    for side_name, side in (("height", r.height), ("width", r.width)):
        need(_is_int(side) and limits.min_side <= side <= limits.max_side and int(side) % limits.size_multiple == 0,
             f"{side_name} must be a multiple of {limits.size_multiple} from {limits.min_side} to "
             f"{limits.max_side}, got {side}")
    units = r.num_images * r.num_inference_steps * (r.height * r.width) / (512 * 512)
    need(units <= limits.max_compute_units,
         f"this request is too large ({r.num_images} images x {r.num_inference_steps} steps at "
         f"{r.width}x{r.height}); use fewer images, fewer steps or a smaller size (limit: "
         f"{limits.max_compute_units:g} image-steps at 512x512)")

    try:
        parsed = parse_prompt(r.prompt, tokenizer, max_subjects=limits.max_subjects)
    except ValueError as e:
        raise GenerationError(str(e)) from None
    n_images = len(r.images)
    for k, item in enumerate(r.images):
        count = 1 if item is None or isinstance(item, PIL.Image.Image) else len(item)
        need(1 <= count <= limits.max_photos_per_subject,
             f"subject {k + 1} has {count} photos; give 1 to {limits.max_photos_per_subject} photos per subject")
    need(n_images >= 1, "add at least one subject photo")
    need(n_images <= limits.max_subjects,
         f"{n_images} photos were given; at most {limits.max_subjects} subjects are supported")
    if parsed.num_subjects != n_images:
        if parsed.num_subjects > n_images:
            fix = "add a photo or remove an `img`"
        else:
            fix = "remove a photo or add `img` after a subject word"
        raise GenerationError(
            f"{parsed.num_subjects} subject(s) in the prompt but {n_images} photo(s): {fix} "
            "(write `img` after each subject word, one per photo, in photo order)"
        )
    return parsed


def photo_groups(images: Sequence) -> list[list[PIL.Image.Image]]:
    """Per subject, its list of photos (a plain image is one photo)."""
    return [[item] if isinstance(item, PIL.Image.Image) else list(item) for item in images]


def prepare_subjects(
    images: Sequence[PIL.Image.Image | Sequence[PIL.Image.Image]], face_crop: bool, crop_fn: Callable | None = None
) -> list[list[PIL.Image.Image]]:
    """Per subject, the images the encoder will see: face crops (default) or the photos as they are."""
    groups = photo_groups(images)
    if not face_crop:
        return groups
    if crop_fn is None:
        from .faces import crop_subject as crop_fn

    def name(k: int, j: int, group: list) -> str:
        return f"photo {k + 1}" if len(group) == 1 else f"photo {j + 1} of subject {k + 1}"

    return [[crop_fn(image, name=name(k, j, group)).image for j, image in enumerate(group)]
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
            subjects = prepare_subjects(request.images, request.face_crop, crop_fn)
        except ValueError as e:  # NoFaceFoundError is a ValueError with a user-facing message
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
    if int(request.cache_interval) > 1:
        extra["cache_interval"] = int(request.cache_interval)
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
        raise GenerationError(OOM_MESSAGE)

    # 5. Attach the settings to every image
    base = GenerationRecord(
        prompt=request.prompt, negative_prompt=negative, seed=seed, alpha=float(request.alpha),
        guidance_scale=float(request.guidance_scale), num_inference_steps=int(request.num_inference_steps),
        scheduler=request.scheduler, height=int(request.height), width=int(request.width),
        num_images=int(request.num_images), face_crop=bool(request.face_crop),
        model=getattr(pipe, "weights_label", ""), version=__version__,
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


def check_identity(request: GenerationRequest, out, subjects: Sequence, records: list[GenerationRecord]) -> list:
    """When the request asks for it, one `identity.IdentityReport` per image of `out` against the encoder's
    inputs `subjects` (a photo, or a list of photos, per subject), stored in each record too. Never raises."""
    if not request.identity_check or not out.images:
        return []
    from .identity import default_checker, subject_names

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
