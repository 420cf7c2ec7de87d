"""The paper's evaluation protocol (FastComposer section 5) on your own subjects and prompts, or the built-in set,
for one way of generating or several side by side.

    python -m fastcomposer evaluate CASES_DIR --output DIR [--alpha 0.5,0.7 --seeds 0,1 --num-images 4]
    python -m fastcomposer evaluate --builtin --output DIR --variants original,balanced,fast --identity-model facenet

Two numbers per generated image (scoring.py), averaged per variant, case and alpha: identity preservation (the
image's faces against the subjects' photos; the least similar subject counts, 0 without a face) and prompt
consistency (CLIP ViT-L/14, image against the prompt without `img`). With several variants (variants.py), every
variant runs the same cases, prompts and seeds with one model load, and each variant's difference from the first
comes with a paired 95% interval over the prompt x seed pairs (stats.py).

Where this differs from the paper:
- `--identity-model arcface` (the default) scores with ArcFace and our face detector over every face found, so its
  values are not comparable with the paper's 0.514; `--identity-model facenet` is the paper's FaceNet with MTCNN at
  the authors' settings, the largest faces as many as subjects (identity/facenet.py): then they are.
- The subjects and prompts are yours (or the built-in set), not the 15 CelebA identities and 40 prompts.
- A subject folder's photos (up to 4) are all given to the model and averaged into one identity reference.
- Images are scored as generated (PNG), not after a JPEG round trip; images hidden by the safety checker are
  left out of the averages and counted.
Defaults follow the authors' evaluation script: 4 images per prompt, seed 42, alpha 0.5, 50 PNDM steps,
guidance 5, no negative prompt.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..config import SETTINGS, VERSION, Limits
from .cases import Case, load_cases
from .errors import EvaluationError  # noqa: F401  (re-exported: `evaluation.runner.EvaluationError`)
from .report import PAPER, EvaluationResult  # noqa: F401  (re-exported)
from .scoring import CLIP_REPO, PromptScorer, greedy_identity, identity_score, load_prompt_scorer  # noqa: F401
from .variants import Variant, parse_variants

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class EvaluationSettings:
    """How images are generated for the evaluation (defaults: the authors' evaluation script)."""

    num_images: int = 4  # images per prompt, seed and alpha
    seeds: tuple[int, ...] = (42,)
    alphas: tuple[float, ...] = (0.5,)  # several alphas trace the identity-versus-prompt trade-off
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    scheduler: str = "pndm"
    negative_prompt: str = ""  # the authors' evaluation used none
    height: int = 512
    width: int = 512
    face_crop: bool = True  # our generation default; the authors fed aligned CelebA photos whole
    clip_model: str = CLIP_REPO  # a Hub repo or a folder with a saved CLIPModel and CLIPProcessor
    identity_model: str = "arcface"  # "arcface" (ours) or "facenet" (the paper's metric, comparable with 0.514)
    variants: str = ""  # e.g. "original,fast": compared side by side; "" = one run with the settings as given


@dataclass
class _Run:
    """What every case and variant of one evaluation shares."""

    settings: EvaluationSettings
    limits: Limits
    out: Path
    identity: object  # scoring.ArcFaceIdentity or identity.facenet.PaperIdentity
    prompt_scorer: PromptScorer
    entries: list[dict] = field(default_factory=list)
    tiles: list[tuple[tuple, str, Path, str]] = field(default_factory=list)  # (key, variant, file, caption)


def evaluate(
    cases_dir: str | os.PathLike | list[Case],
    output_dir: str | os.PathLike,
    settings: EvaluationSettings,
    load_pipe: Callable[[], object],
    *,
    limits: Limits = SETTINGS.limits,
    device: str = "cpu",
    checker=None,
    prompt_scorer: PromptScorer | None = None,
    identity=None,
) -> EvaluationResult:
    """Generate every case's images (per variant) and score them; write images, report.json, report.md and
    contact_sheet.png.

    Everything that can be checked (cases, settings, variants, the face model, CLIP, reference faces) is checked
    before `load_pipe()` loads the model, so a mistake costs seconds, not a model load.

    Args:
        cases_dir: the cases folder (see cases.py), or already loaded cases (`cases.builtin_cases()`).
        output_dir: a new or empty folder.
        settings: how to generate, which variants, which identity model.
        load_pipe: returns the loaded [`FastComposerPipeline`]; called once.
        limits: the request limits (the CLI's relaxed ones).
        device: where CLIP (and FaceNet) run.
        checker: an `IdentityChecker` for the ArcFace model (tests); the process-wide one otherwise.
        prompt_scorer, identity: already built scorers (tests).

    Raises:
        `EvaluationError` with a message that says what to fix.
    """
    from .scoring import identity_model

    # 1. Everything that needs no model: the output folder, the cases, the variants, every request
    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EvaluationError(f"{out} exists and is not empty; choose a new folder")
    cases = cases_dir if isinstance(cases_dir, list) else load_cases(cases_dir)
    variants = parse_variants(settings.variants)
    check_requests(cases, settings, limits, variants)

    # 2. The scorers, and each subject's reference face
    identity = identity or identity_model(settings.identity_model, checker, device)
    if reason := identity.unavailable_reason():
        raise EvaluationError(f"identity scoring needs {identity.name}: {reason}")
    references = {case.name: reference_faces(identity, case) for case in cases}
    run = _Run(settings, limits, out, identity, prompt_scorer or load_prompt_scorer(settings.clip_model, device))

    # 3. Generate and score, variant by variant (a LoRA goes on once per variant)
    pipe = load_pipe()
    out.mkdir(parents=True, exist_ok=True)
    for variant in variants:
        with lora_for(pipe, variant):
            for case in cases:
                run_case(pipe, case, variant, run, np.stack(references[case.name]))

    # 4. The report
    from .report import write_report

    return write_report(run, report_settings(run, pipe), cases, [v.name for v in variants])


def case_request(case: Case, prompt: str, alpha: float, seed: int, settings: EvaluationSettings):
    """The generation request for one case, prompt, alpha and seed (before a variant's change)."""
    from ..generation.request import GenerationRequest

    return GenerationRequest(
        prompt=prompt, images=[list(photos) for photos in case.photos], negative_prompt=settings.negative_prompt,
        alpha=alpha, guidance_scale=settings.guidance_scale, num_inference_steps=settings.num_inference_steps,
        num_images=settings.num_images, height=settings.height, width=settings.width, seed=seed,
        scheduler=settings.scheduler, face_crop=settings.face_crop,
    )


def check_requests(cases: list[Case], settings: EvaluationSettings, limits: Limits,
                   variants: list[Variant]) -> None:
    """Every request the run will make, validated before the model loads."""
    from ..generation.request import GenerationError, validate
    from ..inputs.prompt import load_tokenizer

    tokenizer = load_tokenizer()
    for case in cases:
        try:
            for prompt in case.prompts:
                for alpha in settings.alphas:
                    for seed in settings.seeds:
                        for variant in variants:
                            validate(variant.change(case_request(case, prompt, alpha, seed, settings)), tokenizer,
                                     limits)
        except GenerationError as e:
            raise EvaluationError(f"case {case.name!r}: {e}") from None


def reference_faces(identity, case: Case) -> list[np.ndarray]:
    """Each subject's reference embedding; a subject whose photos show no face is an error."""
    references = []
    for k, photos in enumerate(case.photos, 1):
        ref = identity.reference(photos)
        if ref is None:
            raise EvaluationError(f"case {case.name!r}: no face found in subject {k}'s photo(s); use photos where "
                                  "the face is visible and front-facing")
        references.append(ref)
    return references


class lora_for:
    """A variant's LoRA on the pipeline for the block (and off after it); nothing for other variants."""

    def __init__(self, pipe, variant: Variant):
        self.pipe, self.variant = pipe, variant

    def __enter__(self):
        if self.variant.lora:
            from ..models.lora import apply_loras

            try:
                apply_loras(self.pipe, [self.variant.lora])
            except ValueError as e:
                raise EvaluationError(f"variant {self.variant.name!r}: {e}") from None

    def __exit__(self, *exc):
        if self.variant.lora:
            from ..models.lora import apply_loras

            apply_loras(self.pipe, [])


def run_case(pipe, case: Case, variant: Variant, run: _Run, refs: np.ndarray) -> None:
    """Generate and score every prompt, alpha and seed of one case under one variant."""
    from ..generation.metadata import save_png
    from ..generation.request import GenerationError
    from ..generation.run import generate, prepare_subjects
    from ..inputs.prompt import strip_markers

    s = run.settings
    folder = run.out / "images" / _safe(variant.name) / case.name
    folder.mkdir(parents=True, exist_ok=True)
    # The photos (the variant may take fewer) are cropped once for all the case's prompts, alphas and seeds
    photos = variant.change(case_request(case, case.prompts[0], s.alphas[0], s.seeds[0], s)).images
    try:
        subjects = prepare_subjects(photos, s.face_crop)
    except ValueError as e:
        raise EvaluationError(f"case {case.name!r}: {e}") from None
    for p, prompt in enumerate(case.prompts):
        for alpha in s.alphas:
            for seed in s.seeds:
                logger.info("%s, case %s: prompt %d/%d, alpha %g, seed %d", variant.name, case.name, p + 1,
                            len(case.prompts), alpha, seed)
                request = variant.change(case_request(case, prompt, alpha, seed, s))
                start = time.perf_counter()
                try:
                    result = generate(pipe, request, subjects=subjects, limits=run.limits)
                except (GenerationError, ValueError) as e:
                    raise EvaluationError(f"case {case.name!r}, prompt {p + 1}: {e}") from None
                seconds = (time.perf_counter() - start) / max(1, len(result.images))
                for k, (image, record) in enumerate(zip(result.images, result.records)):
                    path = save_png(image, folder / f"p{p:02d}_alpha{alpha:.2f}_seed{seed}_{k}.png", record)
                    entry = dict(variant=variant.name, case=case.name, prompt_index=p, prompt=prompt, alpha=alpha,
                                 seed=seed, index=k, file=path.relative_to(run.out).as_posix(),
                                 hidden=bool(result.nsfw[k]), identity=None, subjects=None, num_faces=None,
                                 blended=None, prompt_consistency=None, seconds=round(seconds, 3))
                    if not entry["hidden"]:
                        entry.update(run.identity.score(image, refs),
                                     prompt_consistency=run.prompt_scorer(image, strip_markers(prompt)))
                    run.entries.append(entry)
                    run.tiles.append(((case.name, p, alpha, seed, k), variant.name, path, _tile_label(entry)))


def _safe(name: str) -> str:
    """A variant's name as a folder name ("lora=a.safetensors:0.8" -> "lora_a.safetensors_0.8")."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def _tile_label(entry: dict) -> str:
    e = entry
    head = f"{e['case']} p{e['prompt_index'] + 1} alpha={e['alpha']:g} seed={e['seed']} #{e['index']}"
    if e["variant"] != "as given":
        head = f"{e['variant']} · {head}"
    if entry["hidden"]:
        return f"{head}\nhidden"
    return f"{head}\nID {entry['identity']:.2f} CLIP {entry['prompt_consistency']:.3f}"


def report_settings(run: _Run, pipe) -> dict:
    """The settings part of report.json: what generated and what scored."""
    return {**asdict(run.settings), "model": getattr(pipe, "weights_label", ""), "version": VERSION,
            "identity_model_name": run.identity.name, "face_detector": run.identity.detector_name}
