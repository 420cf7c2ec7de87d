"""The paper's evaluation protocol (FastComposer section 5) on your own subjects and prompts.

    python -m fastcomposer evaluate CASES_DIR --output DIR [--alpha 0.5,0.7 --seeds 0,1 --num-images 4]

Two numbers per generated image, averaged per case, per alpha and overall:
- **identity preservation**: the faces in the image against the subjects' reference photos, as ArcFace cosine
  similarity (`identity.py`). With several subjects, faces and subjects are paired GREEDILY (the most similar
  remaining pair first, as the authors' code does; the per-image check in `identity.py` uses the optimal
  Hungarian assignment instead) and the image scores the MINIMUM over subjects, floored at 0. A subject left
  without a face scores 0, so an image with no face scores 0, as in the authors' evaluation.
- **prompt consistency**: CLIP ViT-L/14 cosine similarity between the image and the prompt with its `img`
  markers removed (`openai/clip-vit-large-patch14`, downloaded once into the Hugging Face cache).

Case layout (one folder per case; CASES_DIR may also be a single case folder):

    CASES_DIR/<case>/prompts.txt   one prompt per line, `img` after each subject word; `#` lines and blank
                                   lines are skipped; every prompt has one marker per subject
    CASES_DIR/<case>/1.jpg, 2.png  one photo per subject, numbered in marker order
    CASES_DIR/<case>/1/, 2/        or a folder of several photos of that subject

Where this differs from the paper (whose multi-subject evaluation code was never released):
- ArcFace (facexlib's IR-SE50) embeds faces instead of FaceNet (InceptionResnetV1 on VGGFace2), and our face
  detector (RetinaFace, or OpenCV offline) finds them instead of MTCNN. The authors kept the N most confident
  faces and padded missing ones with blank images; we match over every detected face and score a subject
  without one 0. Absolute identity values are therefore not comparable with the paper's, only trends are.
- The subjects and prompts are yours, not the 15 CelebA identities and 40 prompts of the paper.
- A subject folder's photos (up to 4) are all given to the model, whose subject embedding is their mean, and
  are averaged into one identity reference.
- Images are scored as generated (PNG), not after a JPEG round trip; images hidden by the safety checker are
  left out of the averages and counted.
Defaults follow the authors' evaluation script: 4 images per prompt, seed 42, alpha 0.5, 50 PNDM steps,
guidance 5, no negative prompt.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import SETTINGS, VERSION, Limits
from ..downloads import hub_unreachable
from ..identity.checker import IdentityChecker, default_checker
from ..identity.matching import greedy_identity

logger = logging.getLogger(__name__)

CLIP_REPO = "openai/clip-vit-large-patch14"  # ViT-L/14, as the authors' `CLIPEvaluator(clip_model="ViT-L/14")`
CLIP_REVISION_ENV = "FASTCOMPOSER_CLIP_REVISION"  # pin a Hub commit of CLIP_REPO
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
PROMPTS_FILE = "prompts.txt"
# FastComposer's single-subject results in the paper (Table 1): FaceNet identity, CLIP ViT-L/14 prompt consistency.
PAPER = {"identity": 0.514, "prompt_consistency": 0.243}


class EvaluationError(ValueError):
    """A case folder, setting or model that cannot be used; the message says what to fix."""


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


@dataclass
class Case:
    """One folder of subjects and prompts."""

    name: str
    prompts: list[str]
    photos: list[list[Image.Image]]  # per subject, in marker order: its photos


@dataclass
class EvaluationResult:
    report: dict  # what report.json holds
    markdown: str  # the table printed and saved as report.md
    output_dir: Path
    images: list[Path] = field(default_factory=list)


# --- cases ---------------------------------------------------------------------------------------------


def _photos_in(entry: Path, case: str, k: int) -> list[Image.Image]:
    from ..inputs.images import ImageError, load_image

    files = sorted(p for p in entry.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES) if entry.is_dir() else [entry]
    if not files:
        kinds = ", ".join(PHOTO_SUFFIXES)
        raise EvaluationError(f"case {case!r}: the folder for subject {k} holds no photo ({kinds})")
    try:
        return [load_image(p, name=f"case {case!r} subject {k} photo {p.name}") for p in files]
    except ImageError as e:
        raise EvaluationError(str(e)) from None


def load_case(folder: Path) -> Case:
    """Read one case folder (see the module docstring for the layout)."""
    from ..inputs.prompt import count_markers
    name = folder.name
    prompts_file = folder / PROMPTS_FILE
    if not prompts_file.is_file():
        raise EvaluationError(f"case {name!r} has no {PROMPTS_FILE} (one prompt per line, `img` after each subject)")
    subjects: dict[int, Path] = {}
    for entry in folder.iterdir():
        stem = entry.stem if entry.is_file() else entry.name
        if not stem.isdigit() or (entry.is_file() and entry.suffix.lower() not in PHOTO_SUFFIXES):
            continue
        if int(stem) in subjects:
            raise EvaluationError(f"case {name!r}: subject {int(stem)} is given twice ({subjects[int(stem)].name} and "
                                  f"{entry.name}); keep one file or one folder per subject")
        subjects[int(stem)] = entry
    if sorted(subjects) != list(range(1, len(subjects) + 1)) or not subjects:
        found = ", ".join(str(k) for k in sorted(subjects)) or "none"
        raise EvaluationError(f"case {name!r}: subjects must be numbered 1, 2, ... in marker order (1.jpg or a folder "
                              f"1/), found: {found}")
    lines = [(n, line.strip()) for n, line in enumerate(prompts_file.read_text(encoding="utf-8").splitlines(), 1)]
    prompts = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not prompts:
        raise EvaluationError(f"case {name!r}: {PROMPTS_FILE} holds no prompt")
    for n, prompt in prompts:
        if count_markers(prompt) != len(subjects):
            raise EvaluationError(f"case {name!r}, {PROMPTS_FILE} line {n}: {count_markers(prompt)} `img` marker(s) "
                                  f"but {len(subjects)} subject(s); write `img` after each subject word")
    return Case(name, [p for _, p in prompts], [_photos_in(subjects[k], name, k) for k in sorted(subjects)])


def load_cases(cases_dir: str | os.PathLike) -> list[Case]:
    """Every case under `cases_dir` (sorted by name), or `cases_dir` itself when it holds a prompts.txt."""
    root = Path(cases_dir)
    if not root.is_dir():
        raise EvaluationError(f"{root} is not a folder of cases")
    if (root / PROMPTS_FILE).is_file():
        return [load_case(root)]
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise EvaluationError(f"{root} holds no case folder (each with a {PROMPTS_FILE} and photos 1.jpg, 2.jpg, ...)")
    return [load_case(f) for f in folders]


# --- the two scores ------------------------------------------------------------------------------------


def identity_score(checker: IdentityChecker, image: Image.Image, references: np.ndarray) -> dict:
    """One image's identity entry: `identity` (see `greedy_identity`), per-subject `subjects`, `num_faces`."""
    faces, emb = checker.embed_faces(image)
    sim = emb @ references.T if faces else np.zeros((0, len(references)))
    score, per_subject = greedy_identity(sim, len(references))
    return dict(identity=score, subjects=per_subject, num_faces=len(faces))


class PromptScorer:
    """CLIP image-text cosine similarity (a `transformers.CLIPModel` and its `CLIPProcessor`)."""

    def __init__(self, model, processor, device: str = "cpu"):
        self.model, self.processor, self.device = model.to(device).eval(), processor, device

    def __call__(self, image: Image.Image, text: str) -> float:
        import torch

        inputs = self.processor(text=[text], images=[image.convert("RGB")], return_tensors="pt", padding=True,
                                truncation=True, max_length=self.processor.tokenizer.model_max_length)
        with torch.inference_mode():
            out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        image_emb = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        text_emb = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        return float((image_emb * text_emb).sum())


def load_prompt_scorer(name_or_path: str = CLIP_REPO, device: str = "cpu") -> PromptScorer:
    """CLIP from a folder, or from the Hub into its cache (once). Raises `EvaluationError` saying how to supply it."""
    from transformers import CLIPModel, CLIPProcessor

    # A Hub id is "owner/name"; anything else (an absolute or relative path) is meant as a folder.
    local = Path(name_or_path).is_dir() or name_or_path.count("/") != 1 or name_or_path.startswith((".", "~", "/"))
    revision = None if local else os.environ.get(CLIP_REVISION_ENV) or "main"
    try:
        offline = hub_unreachable() is not None and not Path(name_or_path).is_dir()
        model = CLIPModel.from_pretrained(name_or_path, revision=revision, local_files_only=offline)
        processor = CLIPProcessor.from_pretrained(name_or_path, revision=revision, local_files_only=offline)
    except (OSError, ValueError) as e:
        from huggingface_hub.constants import HF_HUB_CACHE

        where = f"{name_or_path} is not a CLIP folder" if local else (
            f"{name_or_path} is not in the Hugging Face cache ({HF_HUB_CACHE}) and could not be downloaded")
        raise EvaluationError(
            f"prompt consistency needs CLIP ViT-L/14: {where} ({type(e).__name__}). On a machine online run "
            f"`hf download {CLIP_REPO}` and copy the cache, or pass --clip-model DIR (a CLIPModel and CLIPProcessor "
            "saved with save_pretrained)"
        ) from None
    return PromptScorer(model, processor, device)


# --- the run -------------------------------------------------------------------------------------------


def evaluate(
    cases_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    settings: EvaluationSettings,
    load_pipe: Callable[[], object],
    *,
    limits: Limits = SETTINGS.limits,
    device: str = "cpu",
    checker: IdentityChecker | None = None,
    prompt_scorer: PromptScorer | None = None,
) -> EvaluationResult:
    """Generate every case's images and score them; write images, report.json, report.md and contact_sheet.png.

    Everything that can be checked (cases, settings, ArcFace, CLIP, reference faces) is checked before
    `load_pipe()` loads the model, so a mistake costs seconds, not a model load.

    Args:
        cases_dir: the cases (see the module docstring).
        output_dir: a new or empty folder.
        settings: how to generate.
        load_pipe: returns the loaded [`FastComposerPipeline`]; called once.
        limits: the request limits (the CLI's relaxed ones).
        device: where CLIP runs (ArcFace runs where the process-wide checker put it).
        checker, prompt_scorer: already built scorers (tests); the process-wide checker and CLIP otherwise.

    Raises:
        `EvaluationError` with a message that says what to fix.
    """
    # 1. Everything that needs no model: the output folder, the cases, the settings
    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EvaluationError(f"{out} exists and is not empty; choose a new folder")
    cases = load_cases(cases_dir)
    check_requests(cases, settings, limits)

    # 2. The scorers, and each subject's reference face
    checker = checker or default_checker()
    if reason := checker.unavailable_reason():
        raise EvaluationError(f"identity scoring needs ArcFace: {reason}")
    references = {case.name: reference_faces(checker, case) for case in cases}
    scorer = prompt_scorer or load_prompt_scorer(settings.clip_model, device)

    # 3. Generate and score
    pipe = load_pipe()
    out.mkdir(parents=True, exist_ok=True)
    entries: list[dict] = []
    tiles: list[tuple[Path, str]] = []
    for case in cases:
        run_case(pipe, case, settings, limits, out, np.stack(references[case.name]), checker, scorer, entries, tiles)

    # 4. The report
    return write_report(out, settings, pipe, checker, cases, entries, tiles)


def case_request(case: Case, prompt: str, alpha: float, seed: int, settings: EvaluationSettings):
    """The generation request for one case, prompt, alpha and seed."""
    from ..generation.request import GenerationRequest

    return GenerationRequest(
        prompt=prompt, images=[list(photos) for photos in case.photos], negative_prompt=settings.negative_prompt,
        alpha=alpha, guidance_scale=settings.guidance_scale, num_inference_steps=settings.num_inference_steps,
        num_images=settings.num_images, height=settings.height, width=settings.width, seed=seed,
        scheduler=settings.scheduler, face_crop=settings.face_crop,
    )


def check_requests(cases: list[Case], settings: EvaluationSettings, limits: Limits) -> None:
    """Every request the run will make, validated before the model loads."""
    from ..generation.request import GenerationError, validate
    from ..inputs.prompt import load_tokenizer

    tokenizer = load_tokenizer()
    for case in cases:
        try:
            for prompt in case.prompts:
                for alpha in settings.alphas:
                    for seed in settings.seeds:
                        validate(case_request(case, prompt, alpha, seed, settings), tokenizer, limits)
        except GenerationError as e:
            raise EvaluationError(f"case {case.name!r}: {e}") from None


def reference_faces(checker: IdentityChecker, case: Case) -> list[np.ndarray]:
    """Each subject's reference embedding; a subject whose photos show no face is an error."""
    references = []
    for k, photos in enumerate(case.photos, 1):
        ref = checker.reference_embedding(photos)
        if ref is None:
            raise EvaluationError(f"case {case.name!r}: no face found in subject {k}'s photo(s); use photos where "
                                  "the face is visible and front-facing")
        references.append(ref)
    return references


def run_case(pipe, case: Case, settings: EvaluationSettings, limits: Limits, out: Path, refs: np.ndarray,
             checker: IdentityChecker, scorer, entries: list[dict], tiles: list[tuple[Path, str]]) -> None:
    """Generate and score every prompt, alpha and seed of one case; append to `entries` and `tiles`."""
    from ..generation.metadata import save_png
    from ..generation.request import GenerationError
    from ..generation.run import generate, prepare_subjects
    from ..inputs.prompt import strip_markers

    try:
        subjects = prepare_subjects([list(photos) for photos in case.photos], settings.face_crop)
    except ValueError as e:
        raise EvaluationError(f"case {case.name!r}: {e}") from None
    folder = out / "images" / case.name
    folder.mkdir(parents=True, exist_ok=True)
    for p, prompt in enumerate(case.prompts):
        text = strip_markers(prompt)
        for alpha in settings.alphas:
            for seed in settings.seeds:
                logger.info("case %s: prompt %d/%d, alpha %g, seed %d", case.name, p + 1, len(case.prompts),
                            alpha, seed)
                request = case_request(case, prompt, alpha, seed, settings)
                try:
                    result = generate(pipe, request, subjects=subjects, limits=limits)
                except GenerationError as e:
                    raise EvaluationError(f"case {case.name!r}, prompt {p + 1}: {e}") from None
                for k, (image, record) in enumerate(zip(result.images, result.records)):
                    path = save_png(image, folder / f"p{p:02d}_alpha{alpha:.2f}_seed{seed}_{k}.png", record)
                    entry = dict(case=case.name, prompt_index=p, prompt=prompt, alpha=alpha, seed=seed, index=k,
                                 file=path.relative_to(out).as_posix(), hidden=bool(result.nsfw[k]),
                                 identity=None, subjects=None, num_faces=None, prompt_consistency=None)
                    if not entry["hidden"]:
                        entry.update(identity_score(checker, image, refs), prompt_consistency=scorer(image, text))
                    entries.append(entry)
                    tiles.append((path, _tile_label(entry)))


def write_report(out: Path, settings: EvaluationSettings, pipe, checker: IdentityChecker, cases: list[Case],
                 entries: list[dict], tiles: list[tuple[Path, str]]) -> EvaluationResult:
    """report.json, report.md and contact_sheet.png in `out`."""
    from .report import to_markdown, write_contact_sheet

    report = dict(
        settings={**asdict(settings), "model": getattr(pipe, "weights_label", ""), "version": VERSION,
                  "identity_model": "facexlib ArcFace IR-SE50", "face_detector": checker.cropper.detector_name},
        **_averages(entries, settings.alphas),
        cases={c.name: dict(subjects=len(c.photos), prompts=len(c.prompts),
                            **_averages([e for e in entries if e["case"] == c.name], settings.alphas))
               for c in cases},
        paper=dict(PAPER, note="FastComposer paper, single subject: FaceNet identity on 15 CelebA identities"),
        images=entries,
    )
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    markdown = to_markdown(report)
    (out / "report.md").write_text(markdown, encoding="utf-8")
    write_contact_sheet(tiles, out / "contact_sheet.png", columns=settings.num_images * len(settings.seeds))
    return EvaluationResult(report, markdown, out, [out / e["file"] for e in entries])


def _averages(entries: list[dict], alphas: tuple[float, ...]) -> dict:
    from .report import summarize

    return dict(overall=summarize(entries),
                by_alpha={f"{a:g}": summarize([e for e in entries if e["alpha"] == a]) for a in alphas})


def _tile_label(entry: dict) -> str:
    e = entry
    head = f"{e['case']} p{e['prompt_index'] + 1} alpha={e['alpha']:g} seed={e['seed']} #{e['index']}"
    if entry["hidden"]:
        return f"{head}\nhidden"
    return f"{head}\nID {entry['identity']:.2f} CLIP {entry['prompt_consistency']:.3f}"
