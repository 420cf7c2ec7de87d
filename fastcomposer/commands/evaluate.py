"""`python -m fastcomposer evaluate CASES_DIR --output DIR`: the paper's metrics on your own cases."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from ..messages import message_for
from ..pipeline.schedulers import SCHEDULERS
from .options import CLI_LIMITS, UserError, add_model_args


def add_parser(sub) -> None:
    e = sub.add_parser("evaluate", help="score identity and prompt consistency on your own cases (paper section 5)")
    _evaluate_args(e)


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
    e.add_argument("cases", metavar="CASES_DIR", nargs="?", default=None,
                   help="one folder per case: prompts.txt and photos 1.jpg, 2.jpg, ... (or folders 1/, 2/)")
    e.add_argument("--builtin", action="store_true",
                   help="the built-in cases instead: the bundled photos, 40 prompts each in the paper's four "
                   "categories, and two pairs of subjects (10 prompts each)")
    e.add_argument("--max-prompts", type=int, default=None, metavar="N",
                   help="only the first N prompts of each case (a quick look before a full run)")
    e.add_argument("--variants", default="", metavar="NAME[,NAME...]",
                   help="compare ways of generating on the same prompts and seeds, the first as the baseline: "
                   "original, balanced, fast, layout, separate, detail, lora=FILE:SCALE, photos=1")
    e.add_argument("--identity-model", choices=["arcface", "facenet"], default=d.identity_model,
                   help="arcface (default: the identity check's) or facenet (the paper's metric, FaceNet with MTCNN; "
                   "comparable with its 0.514; about 107 MB, downloaded once)")
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
    add_model_args(e)


def run(args: argparse.Namespace) -> int:
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
        clip_model=args.clip_model, identity_model=args.identity_model, variants=args.variants,
    )
    if (args.cases is None) == (not args.builtin):
        raise UserError("give CASES_DIR or --builtin (one of the two)")

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
        if args.builtin:
            from ..evaluation.cases import builtin_cases

            cases = builtin_cases(max_prompts=args.max_prompts)
        else:
            from ..evaluation.cases import load_cases

            cases = load_cases(args.cases)
            if args.max_prompts is not None:
                cases = [replace(c, prompts=c.prompts[: args.max_prompts]) for c in cases]
        result = evaluate(cases, args.output, settings, load, limits=CLI_LIMITS, device=device)
    except EvaluationError as e:
        raise UserError(str(e)) from None
    sys.stdout.write(result.markdown)
    sys.stdout.write(f"\n{result.output_dir / 'report.json'}\n{result.output_dir / 'contact_sheet.png'}\n")
    return 0
