"""Command line: `python -m fastcomposer generate ...`, `batch JOBS.jsonl --output DIR`, `convert IN OUT`,
`evaluate CASES_DIR --output DIR` and `serve` (the web app, with app.py's options).

User errors (bad files, prompts, settings, missing weights) exit with status 2 and one line on
stderr. Results (the seed and the files written) go to stdout.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from ..config import SETTINGS
from ..messages import message_for
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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UserError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m fastcomposer", description="FastComposer: multi-subject image generation.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="generate images of the given subjects")
    g.add_argument("--prompt", required=True, help='text with `img` after each subject word, e.g. "a man img hiking"')
    g.add_argument("--image", action="append", required=True, metavar="PATH[,PATH...]",
                   help="photos of one subject (several: comma-separated, 1-4); repeat --image per subject, in "
                   "the order of the `img` markers")
    g.add_argument("--output", required=True, metavar="PATH.png",
                   help="where to save; with several images PATH_0.png, PATH_1.png, ...")
    _generation_args(g)
    g.add_argument("--attention-maps", action="store_true",
                   help="also write PATH_attn.png: where each subject went (its cross-attention, one colour each)")
    _model_args(g)

    b = sub.add_parser("batch", help="run many jobs from a JSON Lines file (resumable; splits across GPUs under "
                       "accelerate launch)")
    b.add_argument("jobs", metavar="JOBS.jsonl",
                   help='one JSON object per line: {"prompt": ..., "images": [...]} and optional "id", "seed", '
                   '"steps", ... (see README, "Batch jobs")')
    b.add_argument("--output", required=True, metavar="DIR",
                   help="folder for DIR/<id>.png (<id>_<k>.png for several images) and DIR/summary.json")
    _generation_args(b, sweeps=False)
    _model_args(b)

    e = sub.add_parser("evaluate", help="score identity and prompt consistency on your own cases (paper section 5)")
    _evaluate_args(e)

    c = sub.add_parser("convert", help="convert the released pytorch_model.bin into a fast-loading folder")
    c.add_argument("input", help="the released checkpoint (pytorch_model.bin) or a .safetensors in its layout")
    c.add_argument("output", help="folder to write (diffusers layout, safetensors)")
    c.add_argument("--base-model", default=None, metavar="DIR", help="configs of another base model")
    c.add_argument("--image-encoder", default=None, metavar="DIR", help="config of another CLIP image encoder")
    c.add_argument("--dtype", choices=["same", "fp32", "fp16", "bf16"], default="fp32",
                   help="store weights as (default fp32: lossless, and loads as-is on a CPU; fp16 for GPUs); "
                   "'same' keeps the file's bf16/fp32 mix, which must then be loaded with an explicit dtype")
    c.add_argument("-v", "--verbose", action="store_true", help="more log output")

    # `serve` hands its arguments to the web app's own parser (see `main`); listed here for --help
    sub.add_parser("serve", help="start the web app (the options of `python app.py --help`)", add_help=False)
    return parser


def _generation_args(p: argparse.ArgumentParser, sweeps: bool = True) -> None:
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


def _model_args(p: argparse.ArgumentParser) -> None:
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
        identity_check=args.identity_check,
    )


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


def run_generate(args: argparse.Namespace) -> int:
    from ..generation.metadata import save_png
    from ..generation.run import GenerationError, generate, prepare_subjects, validate
    from ..generation.sweep import alpha_sweep, grid_path, sweep_grid, sweep_paths
    from ..generation.sweep import parse_alphas as check_sweep
    from ..inputs.prompt import load_tokenizer
    from ..models.lora import parse_lora_spec

    # 1. Read the photos safely (plain-words errors for bad files); one --image per subject
    images, names = load_subject_photos(args.image)
    alphas = parse_alphas(args.alpha)
    request = request_from_args(args, args.prompt, images, alphas[0])

    # 2. Check the request with the default tokenizer before loading gigabytes (again below, with the model's)
    try:
        if len(alphas) > 1:
            check_sweep(alphas)
        if not args.base_model:
            validate(request, load_tokenizer(), CLI_LIMITS)
        for spec in args.lora:  # a malformed --lora fails before any model work
            parse_lora_spec(spec)
        subjects = prepare_subjects(images, request.face_crop, names=names, margin=request.crop_margin)
    except ValueError as e:  # LoraError is a ValueError too
        raise UserError(message_for(e, "cli")) from None

    # 3. Load the model
    pipe = load_model(args)
    request = with_model_size(request, pipe, args)
    if args.attention_maps:
        request = replace(request, attention_maps=True)

    # 4. Generate (once, or once per alpha with one seed)
    def progress(done: int, total: int) -> None:
        logger.info("step %d/%d", done, total)

    on_step = progress if args.verbose else None
    try:
        if len(alphas) == 1:
            results = [generate(pipe, request, subjects=subjects, on_step=on_step, limits=CLI_LIMITS)]
            paths = [output_paths(args.output, len(results[0].images))]
        else:
            results = alpha_sweep(pipe, request, alphas, subjects=subjects, on_step=on_step, limits=CLI_LIMITS)
            paths = sweep_paths(args.output, alphas, request.num_images)
    except GenerationError as e:
        raise UserError(e.message_for("cli")) from None

    # 5. Save: every image with its settings, attention overlays beside them, the sweep's grid
    paths[0][0].parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.write(f"seed: {results[0].seed}\n")
    for result, files in zip(results, paths):
        for k, (image, record, path) in enumerate(zip(result.images, result.records, files)):
            save_png(image, path, record)
            hidden = result.nsfw[k] if k < len(result.nsfw) else False
            sys.stdout.write(f"{path}{'  (hidden by the safety checker)' if hidden else ''}\n")
            if k < len(result.attention):
                attn = path.with_name(f"{path.stem}_attn.png")
                result.attention[k].save(attn)
                sys.stdout.write(f"{attn}\n")
    if len(alphas) > 1:
        grid = grid_path(args.output)
        # With the identity check on, each cell's caption is its per-subject scores.
        captions = [[report.summary() for report in getattr(r, "identity", None) or []] for r in results]
        sweep_grid(results, alphas, captions if any(captions) else None).save(grid)
        sys.stdout.write(f"{grid}\n")
    for result, files in zip(results, paths):
        for path, report in zip(files, result.identity):
            sys.stdout.write(f"{path}: {report.summary()}\n")
    return 0


def _comma_list(kind: type):
    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            values = ()
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__} values")
        return values

    return parse


def _evaluate_args(e: argparse.ArgumentParser) -> None:
    from ..evaluation.runner import CLIP_REPO, EvaluationSettings

    d = EvaluationSettings()
    e.add_argument("cases", metavar="CASES_DIR",
                   help="one folder per case: prompts.txt and photos 1.jpg, 2.jpg, ... (or folders 1/, 2/)")
    e.add_argument("--output", required=True, metavar="DIR", help="a new folder for the images and the report")
    e.add_argument("--num-images", type=int, default=d.num_images,
                   help=f"images per prompt, seed and alpha (default {d.num_images})")
    e.add_argument("--seeds", type=_comma_list(int), default=d.seeds, metavar="S[,S...]",
                   help=f"seeds, e.g. 0,1,2 (default {','.join(map(str, d.seeds))})")
    e.add_argument("--alpha", type=_comma_list(float), default=d.alphas, metavar="A[,A...]",
                   help=f"alphas, e.g. 0.5,0.7,0.9 to trace identity against prompt (default {d.alphas[0]:g})")
    e.add_argument("--steps", type=int, default=d.num_inference_steps,
                   help=f"denoising steps (default {d.num_inference_steps})")
    e.add_argument("--guidance", type=float, default=d.guidance_scale,
                   help=f"guidance scale (default {d.guidance_scale:g})")
    e.add_argument("--scheduler", choices=list(SCHEDULERS), default=d.scheduler, help="sampler")
    e.add_argument("--negative-prompt", default=d.negative_prompt, help="what to avoid (default: none, as the paper)")
    e.add_argument("--height", type=int, default=d.height, help=f"image height (default {d.height})")
    e.add_argument("--width", type=int, default=d.width, help=f"image width (default {d.width})")
    e.add_argument("--no-face-crop", action="store_true", help="give the encoder the whole photos")
    e.add_argument("--no-safety-checker", action="store_true", help="do not filter images with the safety checker")
    e.add_argument("--clip-model", default=CLIP_REPO, metavar="DIR_OR_REPO",
                   help=f"CLIP for prompt consistency (default {CLIP_REPO}, downloaded once)")
    _model_args(e)


def run_evaluate(args: argparse.Namespace) -> int:
    from ..evaluation.runner import EvaluationError, EvaluationSettings, evaluate
    from ..pipeline.loading import load_pipeline, pick_device

    try:
        device = str(pick_device(args.device))
    except ValueError as e:
        raise UserError(message_for(e, "cli")) from None
    settings = EvaluationSettings(
        num_images=args.num_images, seeds=args.seeds, alphas=args.alpha, num_inference_steps=args.steps,
        guidance_scale=args.guidance, scheduler=args.scheduler, negative_prompt=args.negative_prompt,
        height=args.height, width=args.width, face_crop=not args.no_face_crop,
        clip_model=args.clip_model,
    )

    def load():
        from ..models.checkpoint import CheckpointError
        from ..models.weights import WeightsUnavailableError

        try:
            return load_pipeline(
                args.weights, device=args.device, dtype=args.dtype, scheduler=args.scheduler,
                safety_checker=not args.no_safety_checker, base_model=args.base_model,
                image_encoder=args.image_encoder, loras=args.lora,
            )
        except (WeightsUnavailableError, CheckpointError, OSError, ValueError) as e:
            raise UserError(message_for(e, "cli").splitlines()[0]) from None

    try:
        result = evaluate(args.cases, args.output, settings, load, limits=CLI_LIMITS, device=device)
    except EvaluationError as e:
        raise UserError(str(e)) from None
    sys.stdout.write(result.markdown)
    sys.stdout.write(f"\n{result.output_dir / 'report.json'}\n{result.output_dir / 'contact_sheet.png'}\n")
    return 0


def run_batch(args: argparse.Namespace) -> int:
    from .batch import run_batch as run

    return run(args)


def run_convert(args: argparse.Namespace) -> int:
    from ..messages import message_for
    from ..models.architecture import build_modules, bundled_architecture, with_overrides
    from ..models.checkpoint import CheckpointError, load_into_modules, read_state_dict
    from ..models.weights import ResolvedWeights, write_provenance
    from ..pipeline.loading import assemble

    source, out = Path(args.input), Path(args.output)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new folder")
    try:
        arch = with_overrides(bundled_architecture(), args.base_model, args.image_encoder)
        modules = build_modules(arch, empty=True)
        from ..pipeline.loading import DTYPES

        dtype = None if args.dtype == "same" else DTYPES[args.dtype]
        load_into_modules(modules, read_state_dict(source), dtype=dtype, source=f"checkpoint {source.name}")
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise UserError(message_for(e, "cli")) from None
    pipe = assemble(modules, arch)
    pipe.save_pretrained(out, safe_serialization=True)
    write_provenance(out, ResolvedWeights("checkpoint", source, "local file"))
    sys.stdout.write(f"{out}\n")
    return 0


def run_serve(argv: list[str]) -> int:
    """`python -m fastcomposer serve [app options]`: the web app without app.py (for an installed package)."""
    from ..ui.server import main as serve

    serve(argv, prog="python -m fastcomposer serve")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # the app parses its own options (and prints its own --help)
        return run_serve(argv[1:])
    try:
        args = build_parser().parse_args(argv)
        level = logging.INFO if args.verbose else logging.WARNING
        logging.basicConfig(level=level, format="%(levelname)s %(message)s")
        commands = {"generate": run_generate, "batch": run_batch, "convert": run_convert, "evaluate": run_evaluate}
        return commands[args.command](args)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
