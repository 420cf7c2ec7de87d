"""What the commands share: the flags of a generation and of the model, the command line's limits, `UserError`,
and the steps from flags to a request and a loaded model. Commands import this module; it imports no command.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

from ..config import DETAIL, SETTINGS
from ..messages import message_for
from ..pipeline.boxes import parse_box
from ..pipeline.presets import PRESETS, default_steps
from ..pipeline.schedulers import SCHEDULERS

logger = logging.getLogger("fastcomposer")

# A local user may ask for more than the shared web server allows; keep only sanity bounds.
CLI_LIMITS = replace(
    SETTINGS.limits, max_images_per_run=16, max_steps=1000, min_side=64, max_side=2048,
    max_compute_units=float("inf"), max_prompt_chars=10_000,
)


class UserError(Exception):
    """Reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UserError(f"{message} (see --help)")


def add_generation_args(p: argparse.ArgumentParser, sweeps: bool = True) -> None:
    """The settings of a generation (shared by `generate` and `batch`, where they are every job's defaults);
    `sweeps`: --alpha takes a comma list (generate's alpha sweep)."""
    d = SETTINGS.defaults
    p.add_argument("--negative-prompt", default=None, help='what to avoid (default: ours; "" for none)')
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="sampler, steps and caching in one word (default original: "
                   + "; ".join(f"{p.name}: {p.summary}" for p in PRESETS.values()) + ")")
    p.add_argument("--steps", type=int, default=None,
                   help=f"denoising steps (default: the preset's, {d.num_inference_steps}; dpm alone: {d.dpm_steps})")
    p.add_argument("--scheduler", choices=list(SCHEDULERS), default=None, help="sampler (default: the preset's, pndm)")
    p.add_argument("--cache-interval", type=int, default=None, metavar="N",
                   help="DeepCache: reuse deep UNet features for N-1 of every N steps (1 = off; default: the "
                   "preset's)")
    p.add_argument("--guidance", type=float, default=d.guidance_scale,
                   help=f"guidance scale (default {d.guidance_scale})")
    alpha_more = ("a comma list runs a sweep with one seed and writes PATH_alpha0.50.png, ... and PATH_grid.png"
                  if sweeps else 'a job\'s "alpha" wins')
    p.add_argument("--alpha", default=str(d.alpha), metavar="A[,A...]" if sweeps else "A",
                   help=f"share of steps that see the subjects: higher = more identity (default {d.alpha}); "
                   + alpha_more)
    p.add_argument("--seed", type=int, default=-1, help="random seed (-1: random, printed)")
    p.add_argument("--num-images", type=int, default=d.num_images, help="images to generate")
    p.add_argument("--height", type=int, default=None, help="image height (default: the model's, 512)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the model's, 512)")
    p.add_argument("--no-face-crop", action="store_true",
                   help="give the encoder the whole photo (as the original demo)")
    p.add_argument("--crop-margin", type=float, default=None, metavar="M",
                   help="how much of the person a face crop keeps: crop side over face width, from 1.4 (a tight "
                   "face) to 3.2 (head and shoulders); default 2.6")
    p.add_argument("--no-safety-checker", action="store_true", help="do not filter images with the safety checker")
    p.add_argument("--box", action="append", default=None, metavar="X0,Y0,X1,Y1",
                   help="where a subject goes, as fractions of width and height (0,0,0.5,1: the left half); repeat "
                   "once per subject in `img` order, '-' for a subject left free")
    p.add_argument("--separate", action="store_true",
                   help="keep the subjects apart without boxes: each keeps the region it takes in the first steps")
    p.add_argument("--detail-faces", nargs="?", type=float, const=DETAIL.strength, default=None, metavar="STRENGTH",
                   help="the face pass: redraw each subject's face at full size with that subject alone, from "
                   "STRENGTH of the schedule (default 0.4; 0.05-1)")
    p.add_argument("--identity-check", action="store_true",
                   help="score each image's faces against the subjects (ArcFace) and print one line per image")


def parse_alphas(text: str) -> list[float]:
    """"0.75" -> [0.75]; "0.5,0.6,0.7" -> a sweep. Raises UserError for anything else."""
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--alpha {text!r} is not a number or a comma-separated list of numbers") from None
    if not values:
        raise UserError("--alpha needs a value, e.g. 0.75 or 0.5,0.6,0.7")
    return values


def split_images(value: str) -> list[str]:
    """One --image value -> the photo paths of one subject. An existing file is taken whole (commas and all)."""
    if Path(value).is_file() or "," not in value:
        return [value]
    return [part.strip() for part in value.split(",") if part.strip()]


def sampling_plan(args: argparse.Namespace):
    """The sampler, steps and cache interval from --preset and the explicit flags (explicit flags win).

    Without --preset a lone --scheduler keeps its own step default (dpm 25), as before presets existed.
    """
    from ..pipeline.presets import resolve

    steps = args.steps
    if args.preset is None and args.scheduler is not None and steps is None:
        steps = default_steps(args.scheduler)
    return resolve(args.preset, args.scheduler, steps, args.cache_interval)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto")
    p.add_argument("--weights", default=None, metavar="PATH|tiny",
                   help="checkpoint file or converted folder; 'tiny' for a random preview model (default: download)")
    p.add_argument("--base-model", default=None, metavar="DIR",
                   help="diffusers SD folder whose configs, tokenizer and scheduler replace the bundled ones")
    p.add_argument("--image-encoder", default=None, metavar="DIR",
                   help="CLIP folder whose config.json (CLIPConfig) replaces the bundled vision config")
    p.add_argument("--lora", action="append", default=[], metavar="PATH_OR_HUB_REPO[:SCALE]",
                   help="a Stable Diffusion 1.5 LoRA (.safetensors file, Hub repo owner/name, or "
                   "owner/name/file.safetensors), at SCALE (default 1); repeat for several")
    p.add_argument("-v", "--verbose", action="store_true", help="more log output")


def output_paths(output: str, n: int) -> list[Path]:
    path = Path(output)
    if path.suffix.lower() != ".png":
        path = path.with_name(path.name + ".png")
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{k}{path.suffix}") for k in range(n)]


def load_subject_photos(values: list[str]):
    """--image values -> per subject, its photos (safely loaded) and how messages name each (with its path).

    Raises UserError for a bad file, naming the file as given.
    """
    from ..inputs.images import ImageError, load_image
    from ..messages import PhotoRef

    names = []
    for k, value in enumerate(values):
        paths = split_images(value)
        names.append([PhotoRef(f"photo {k + 1}" if len(paths) == 1 else f"photo {j + 1} of subject {k + 1}", path)
                      for j, path in enumerate(paths)])
    try:
        return [[load_image(ref.path, name=ref) for ref in group] for group in names], names
    except ImageError as e:
        raise UserError(e.message_for("cli")) from None


def request_from_args(args: argparse.Namespace, prompt: str, images: list, alpha: float):
    """A GenerationRequest from generation flags (see `_generation_args`); the size is settled after loading."""
    from ..generation.run import GenerationRequest

    plan = sampling_plan(args)
    return GenerationRequest(
        prompt=prompt, images=images, negative_prompt=args.negative_prompt, alpha=alpha,
        guidance_scale=args.guidance, num_inference_steps=plan.num_inference_steps, num_images=args.num_images,
        height=args.height or 512, width=args.width or 512, seed=args.seed, scheduler=plan.scheduler,
        face_crop=not args.no_face_crop, crop_margin=args.crop_margin, cache_interval=plan.cache_interval,
        preset=args.preset,
        identity_check=args.identity_check, boxes=parse_boxes(args.box), separate=bool(args.separate),
        detail_faces=args.detail_faces is not None,
        detail_strength=DETAIL.strength if args.detail_faces is None else args.detail_faces,
    )


def parse_boxes(values: list | None) -> list | None:
    """--box values -> per subject a 4-tuple of floats or None ('-'); None without --box. Lists (a batch job's
    "boxes") pass through as they are, for the request's own checks. Raises UserError for unreadable text."""
    if values is None:
        return None
    boxes = []
    for k, value in enumerate(values, start=1):
        if not isinstance(value, str):
            boxes.append(value)
            continue
        try:
            boxes.append(parse_box(value))
        except ValueError:
            raise UserError(f"--box {value!r} (number {k}) must be four numbers X0,Y0,X1,Y1 from 0 to 1, e.g. "
                            "0,0,0.5,1, or - for a free subject") from None
    return boxes


def load_model(args: argparse.Namespace):
    """load_pipeline from the model flags (see `_model_args`); its errors become one-line UserErrors."""
    from ..models.checkpoint import CheckpointError
    from ..models.weights import WeightsUnavailableError
    from ..pipeline.loading import load_pipeline

    try:
        return load_pipeline(
            args.weights, device=args.device, dtype=args.dtype, scheduler=sampling_plan(args).scheduler,
            safety_checker=not args.no_safety_checker, base_model=args.base_model, image_encoder=args.image_encoder,
            loras=args.lora,
        )
    except (WeightsUnavailableError, CheckpointError, OSError, ValueError) as e:  # OSError: a damaged folder
        raise UserError(message_for(e, "cli").splitlines()[0]) from None


def with_model_size(request, pipe, args: argparse.Namespace):
    """Without --height/--width, the model's own default size, as the original."""
    if args.height is not None and args.width is not None:
        return request
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return replace(request, height=args.height or size, width=args.width or size)
