"""Stage 1 of a pipeline call: the arguments checked before any model work, as diffusers' `check_inputs` does.

Every message names the argument, the value given and what is expected.
"""

from __future__ import annotations

from collections.abc import Sequence

import PIL.Image

from ..config import SETTINGS
from ..inputs.prompt import ParsedPrompt
from .boxes import BOX_PROBLEMS, box_problem


def check_call(
    parsed: ParsedPrompt,
    groups: list[list[PIL.Image.Image]],
    height: int,
    width: int,
    num_inference_steps: int,
    guidance_scale: float,
    alpha: float,
    num_images_per_prompt: int,
    cache_interval: int = 1,
    boxes: Sequence | None = None,
) -> None:
    """Raise `ValueError` for an argument a `FastComposerPipeline` call cannot run with."""
    n = len(groups)
    if parsed.num_subjects != n:
        raise ValueError(
            f"the prompt has {parsed.num_subjects} subject marker(s) but {n} subject image(s) were given "
            "(one `subject_images` entry per subject: a photo or a list of photos); write `img` after each "
            "subject word, one per subject, in the same order"
        )
    if n == 0:
        raise ValueError("at least one subject image and one `img` marker are needed")
    max_photos = SETTINGS.limits.max_photos_per_subject
    for k, group in enumerate(groups):
        if not 1 <= len(group) <= max_photos:
            raise ValueError(
                f"subject {k + 1} has {len(group)} photos in `subject_images`; give 1 to {max_photos}"
            )
    if not all(isinstance(im, PIL.Image.Image) for group in groups for im in group):
        raise ValueError("`subject_images` must be PIL images, or lists of PIL images (several per subject)")
    if height % 8 or width % 8 or height <= 0 or width <= 0:
        raise ValueError(f"`height` and `width` must be positive multiples of 8 but are {height} and {width}")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` must be a positive integer but is {num_inference_steps!r}")
    if not isinstance(cache_interval, int) or cache_interval < 1:
        raise ValueError(f"`cache_interval` must be a positive integer (1 = no caching) but is {cache_interval!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be between 0 and 1 but is {alpha}")
    if guidance_scale < 1.0:
        raise ValueError(
            f"`guidance_scale` must be >= 1 but is {guidance_scale}: below 1 pushes away from the prompt"
        )
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ValueError(f"`num_images_per_prompt` must be a positive integer but is {num_images_per_prompt!r}")
    problem = box_problem(boxes, n, height, width)
    if problem is not None:
        reason, facts = problem
        raise ValueError(BOX_PROBLEMS[reason].render("api", {"box_k": f"box {facts.get('k')}", **facts}))
