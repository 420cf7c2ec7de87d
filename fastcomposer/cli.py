"""Command line: `python -m fastcomposer generate ...` and `python -m fastcomposer convert IN OUT`.

User errors (bad files, prompts, settings, missing weights) exit with status 2 and one line on
stderr. Results (the seed and the files written) go to stdout.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from .config import SETTINGS

logger = logging.getLogger("fastcomposer")

# A local user may ask for more than the shared web server allows; keep only sanity bounds.
CLI_LIMITS = replace(
    SETTINGS.limits, max_images_per_run=16, max_steps=1000, min_side=64, max_side=2048,
    max_compute_units=float("inf"), max_prompt_chars=10_000,
)


class UserError(Exception):
    """Reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UserError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    d = SETTINGS.defaults
    parser = _Parser(prog="python -m fastcomposer", description="FastComposer: multi-subject image generation.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="generate images of the given subjects")
    g.add_argument("--prompt", required=True, help='text with `img` after each subject word, e.g. "a man img hiking"')
    g.add_argument("--image", action="append", required=True, metavar="PATH",
                   help="a subject photo; repeat in the order of the `img` markers")
    g.add_argument("--output", required=True, metavar="PATH.png",
                   help="where to save; with several images PATH_0.png, PATH_1.png, ...")
    g.add_argument("--negative-prompt", default=None, help='what to avoid (default: ours; "" for none)')
    g.add_argument("--steps", type=int, default=None,
                   help=f"denoising steps (default {d.num_inference_steps}; dpm {d.dpm_steps})")
    g.add_argument("--guidance", type=float, default=d.guidance_scale,
                   help=f"guidance scale (default {d.guidance_scale})")
    g.add_argument("--alpha", type=float, default=d.alpha,
                   help=f"share of steps that see the subjects: higher = more identity (default {d.alpha})")
    g.add_argument("--seed", type=int, default=-1, help="random seed (-1: random, printed)")
    g.add_argument("--num-images", type=int, default=d.num_images, help="images to generate")
    g.add_argument("--height", type=int, default=None, help="image height (default: the model's, 512)")
    g.add_argument("--width", type=int, default=None, help="image width (default: the model's, 512)")
    g.add_argument("--scheduler", choices=["pndm", "dpm", "ddim", "euler"], default=d.scheduler, help="sampler")
    g.add_argument("--no-face-crop", action="store_true",
                   help="give the encoder the whole photo (as the original demo)")
    g.add_argument("--no-safety-checker", action="store_true", help="do not filter images with the safety checker")
    _model_args(g)

    c = sub.add_parser("convert", help="convert the released pytorch_model.bin into a fast-loading folder")
    c.add_argument("input", help="the released checkpoint (pytorch_model.bin) or a .safetensors in its layout")
    c.add_argument("output", help="folder to write (diffusers layout, safetensors)")
    c.add_argument("--base-model", default=None, metavar="DIR", help="configs of another base model")
    c.add_argument("--image-encoder", default=None, metavar="DIR", help="config of another CLIP image encoder")
    c.add_argument("--dtype", choices=["same", "fp32", "fp16", "bf16"], default="fp32",
                   help="store weights as (default fp32: lossless, and loads as-is on a CPU; fp16 for GPUs); "
                   "'same' keeps the file's bf16/fp32 mix, which must then be loaded with an explicit dtype")
    c.add_argument("-v", "--verbose", action="store_true", help="more log output")
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto")
    p.add_argument("--weights", default=None, metavar="PATH|tiny",
                   help="checkpoint file or converted folder; 'tiny' for a random preview model (default: download)")
    p.add_argument("--base-model", default=None, metavar="DIR",
                   help="diffusers SD folder whose configs, tokenizer and scheduler replace the bundled ones")
    p.add_argument("--image-encoder", default=None, metavar="DIR",
                   help="CLIP folder whose config.json (CLIPConfig) replaces the bundled vision config")
    p.add_argument("-v", "--verbose", action="store_true", help="more log output")


def output_paths(output: str, n: int) -> list[Path]:
    path = Path(output)
    if path.suffix.lower() != ".png":
        path = path.with_name(path.name + ".png")
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{k}{path.suffix}") for k in range(n)]


def run_generate(args: argparse.Namespace) -> int:
    from .generation import GenerationError, GenerationRequest, generate, prepare_subjects, validate
    from .images import ImageError, load_image
    from .loader import load_pipeline
    from .messages import PhotoRef, message_for
    from .metadata import save_png
    from .prompt import load_tokenizer

    # 1. Read the photos safely (plain-words errors for bad files, naming the file as given)
    photos = [PhotoRef(f"photo {k + 1}", path) for k, path in enumerate(args.image)]
    try:
        images = [load_image(photo.path, name=photo) for photo in photos]
    except ImageError as e:
        raise UserError(e.message_for("cli")) from None

    d = SETTINGS.defaults
    default_steps = d.dpm_steps if args.scheduler == "dpm" else d.num_inference_steps
    steps = args.steps if args.steps is not None else default_steps
    request = GenerationRequest(
        prompt=args.prompt, images=images, negative_prompt=args.negative_prompt, alpha=args.alpha,
        guidance_scale=args.guidance, num_inference_steps=steps, num_images=args.num_images,
        height=args.height or 512, width=args.width or 512, seed=args.seed, scheduler=args.scheduler,
        face_crop=not args.no_face_crop,
    )

    # 2. Check the request with the default tokenizer before loading gigabytes (again below, with the model's)
    try:
        if not args.base_model:
            validate(request, load_tokenizer(), CLI_LIMITS)
        subjects = prepare_subjects(images, request.face_crop, names=photos)
    except ValueError as e:
        raise UserError(message_for(e, "cli")) from None

    # 3. Load the model
    from .checkpoint import CheckpointError
    from .weights import WeightsUnavailableError

    try:
        pipe = load_pipeline(
            args.weights, device=args.device, dtype=args.dtype, scheduler=args.scheduler,
            safety_checker=not args.no_safety_checker, base_model=args.base_model, image_encoder=args.image_encoder,
        )
    except (WeightsUnavailableError, CheckpointError, OSError, ValueError) as e:  # OSError: a damaged folder
        raise UserError(message_for(e, "cli").splitlines()[0]) from None
    if args.height is None or args.width is None:  # the model's own default size, as the original
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        request = replace(request, height=args.height or size, width=args.width or size)

    # 4. Generate and save
    def progress(done: int, total: int) -> None:
        logger.info("step %d/%d", done, total)

    try:
        on_step = progress if args.verbose else None
        result = generate(pipe, request, subjects=subjects, on_step=on_step, limits=CLI_LIMITS)
    except GenerationError as e:
        raise UserError(e.message_for("cli")) from None
    paths = output_paths(args.output, len(result.images))
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for image, record, path in zip(result.images, result.records, paths):
        save_png(image, path, record)
    sys.stdout.write(f"seed: {result.seed}\n")
    for path, hidden in zip(paths, result.nsfw):
        sys.stdout.write(f"{path}{'  (hidden by the safety checker)' if hidden else ''}\n")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from .architecture import build_modules, bundled_architecture, with_overrides
    from .checkpoint import CheckpointError, load_into_modules, read_state_dict
    from .loader import assemble
    from .messages import message_for
    from .weights import ResolvedWeights, write_provenance

    source, out = Path(args.input), Path(args.output)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new folder")
    try:
        arch = with_overrides(bundled_architecture(), args.base_model, args.image_encoder)
        modules = build_modules(arch, empty=True)
        from .loader import DTYPES

        dtype = None if args.dtype == "same" else DTYPES[args.dtype]
        load_into_modules(modules, read_state_dict(source), dtype=dtype, source=f"checkpoint {source.name}")
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise UserError(message_for(e, "cli")) from None
    pipe = assemble(modules, arch)
    pipe.save_pretrained(out, safe_serialization=True)
    write_provenance(out, ResolvedWeights("checkpoint", source, "local file"))
    sys.stdout.write(f"{out}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        level = logging.INFO if args.verbose else logging.WARNING
        logging.basicConfig(level=level, format="%(levelname)s %(message)s")
        return run_generate(args) if args.command == "generate" else run_convert(args)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
