"""`python -m fastcomposer generate`: one prompt, one image or several (or an alpha sweep), saved as PNGs."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace

from ..messages import message_for
from .options import (
    CLI_LIMITS,
    UserError,
    add_generation_args,
    add_model_args,
    load_model,
    load_subject_photos,
    output_paths,
    parse_alphas,
    request_from_args,
    with_model_size,
)

logger = logging.getLogger("fastcomposer")


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="generate images of the given subjects")
    g.add_argument("--prompt", required=True, help='text with `img` after each subject word, e.g. "a man img hiking"')
    g.add_argument("--image", action="append", required=True, metavar="PATH[,PATH...]",
                   help="photos of one subject (several: comma-separated, 1-4); repeat --image per subject, in "
                   "the order of the `img` markers")
    g.add_argument("--output", required=True, metavar="PATH.png",
                   help="where to save; with several images PATH_0.png, PATH_1.png, ...")
    add_generation_args(g)
    g.add_argument("--attention-maps", action="store_true",
                   help="also write PATH_attn.png: where each subject went (its cross-attention, one colour each)")
    add_model_args(g)



def run(args: argparse.Namespace) -> int:
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
