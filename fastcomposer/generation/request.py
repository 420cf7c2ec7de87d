"""A generation request: what the user asked for, what came back, and the checks before any model work.

Everything a user can get wrong raises `GenerationError` with a message that names the problem and
the fix, before any model work starts; each message reads right on the page, the command line and in
Python (`message_for`, see messages.py): settings are named as each knows them (`{num_inference_steps}` is
"steps", "--steps" or "`num_inference_steps`").
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import PIL.Image

from ..config import DETAIL, SETTINGS, Limits
from ..inputs.faces import MARGIN_HEAD_AND_SHOULDERS, MARGIN_TIGHT_FACE
from ..inputs.prompt import ParsedPrompt, parse_prompt
from ..messages import UserFacingError, Wording
from ..pipeline.boxes import BOX_PROBLEMS, box_problem
from ..pipeline.schedulers import SCHEDULERS, max_steps
from .metadata import GenerationRecord

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


BOX_NAME = Wording("layout box {k}", "--box number {k}", "box {k} of `boxes`")  # `{box_k}` below
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
    # Layout (pipeline/layout.py): per subject in marker order, where it goes, `(x0, y0, x1, y1)` as fractions of
    # width and height, or None for a free subject; None: no boxes.
    boxes: Sequence[Sequence[float] | None] | None = None
    separate: bool = False  # keep the subjects apart without boxes (automatic separation)
    detail_faces: bool = False  # the face pass: each subject's face redrawn with that subject alone (face_detail.py)
    detail_strength: float = DETAIL.strength  # the share of the schedule the face pass runs again, from 0.05 to 1


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
    notes: list[str] = field(default_factory=list)  # per image, the face pass's word for its caption
    detail_stopped: bool = False  # Stop came during the face pass: the images are kept, the unfinished face as it was

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
         "{seed} must be a whole number from -1 (random) to {hi}, got {value}", hi=limits.max_seed, value=r.seed)
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

    need(isinstance(r.separate, bool), "{separate} must be true or false, got {value!r}", value=r.separate)
    need(isinstance(r.detail_faces, bool), "{detail_faces} must be true or false, got {value!r}", value=r.detail_faces)
    need(isinstance(r.detail_strength, (int, float)) and not isinstance(r.detail_strength, bool)
         and DETAIL.min_strength <= r.detail_strength <= DETAIL.max_strength,
         "{detail_strength} must be from {lo:g} to {hi:g}, got {value}", lo=DETAIL.min_strength,
         hi=DETAIL.max_strength, value=r.detail_strength)
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
    problem = box_problem(r.boxes, parsed.num_subjects, int(r.height), int(r.width))
    if problem is not None:
        raise GenerationError(BOX_PROBLEMS[problem[0]], box_k=BOX_NAME, **problem[1])
    return parsed


def negative_prompt_of(request: GenerationRequest) -> str:
    """The negative prompt a run uses: the request's, or ours when it gave none."""
    return SETTINGS.defaults.negative_prompt if request.negative_prompt is None else request.negative_prompt


def seed_of(seed: int, limits: Limits = SETTINGS.limits) -> int:
    """The seed a run uses: the one given, or a fresh random one for -1."""
    return secrets.randbelow(limits.max_seed + 1) if seed == -1 else int(seed)
