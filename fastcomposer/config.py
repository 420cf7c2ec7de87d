"""Defaults and limits, in one place.

Every number a user can meet (a slider's range, an upload cap, a default prompt) lives here, so the
web app, the command line and the checks agree. Each field says why it has its value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

VERSION = "0.1.0"  # the package's version, written into every PNG's settings

# The released checkpoint on the Hugging Face Hub. The commit hash and sha256 cannot be read from a
# machine without Hub access, so they default to the branch and "no pin"; a maintainer pins them with
# FASTCOMPOSER_REVISION / FASTCOMPOSER_SHA256 (see weights.py) once they have checked a download.
CHECKPOINT_REPO = "mit-han-lab/fastcomposer"
CHECKPOINT_FILE = "pytorch_model.bin"
CHECKPOINT_REVISION = "main"

# The safety checker Stable Diffusion 1.5 ships with (CLIP ViT-L/14 + concept embeddings, ~1.2 GB).
SAFETY_CHECKER_REPO = "CompVis/stable-diffusion-safety-checker"
SAFETY_CHECKER_REVISION = "main"

MARKER = "img"  # the word written after each subject noun, as in the released demo

# Plain words on purpose: diffusers reads "((ugly))"-style weights as literal text, so the original
# demo's nested-parenthesis list only added noise tokens.
DEFAULT_NEGATIVE_PROMPT = (
    "lowres, blurry, out of focus, jpeg artifacts, watermark, text, signature, deformed face, "
    "disfigured, bad anatomy, extra limbs, extra fingers, missing fingers, mutated hands, "
    "duplicate person, cropped head, ugly, worst quality"
)


@dataclass(frozen=True)
class GenerationDefaults:
    """What a run uses when the caller does not say (the released demo's values unless noted)."""

    guidance_scale: float = 5.0  # the demo's CFG weight; the paper's pipeline default 7.5 over-saturates faces
    num_inference_steps: int = 50  # the demo's value; with PNDM this is 51 loop iterations
    alpha: float = 0.75  # share of the loop that sees the subject; higher = more identity, lower = more prompt
    num_images: int = 1  # one image per run keeps CPU runs short; the demo made 4
    height: int = 512  # SD1.5's training resolution
    width: int = 512
    scheduler: str = "pndm"  # the sampler the released model was shown with
    object_resolution: int = 256  # the demo pads to square and resizes to 256 before the encoder's 224
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    dpm_steps: int = 25  # DPM-Solver++ reaches PNDM-50 quality in about half the steps
    few_steps: int = 4  # LCM and TCD, with their distilled LoRAs, are made for 2-8 steps


@dataclass(frozen=True)
class Limits:
    """Bounds that protect a shared server; the web app checks them, the CLI relaxes a few (see cli.py).

    Steps and guidance go beyond the first proposal (50 and 10) because the compute budget below already
    bounds the cost, and guidance above 10 has uses with strong negative prompts.
    """

    max_subjects: int = 4  # training used up to 4 subjects per image
    max_photos_per_subject: int = 4  # their embeddings are averaged; beyond 4 the mean barely moves
    max_images_per_run: int = 4  # one batch of 4 fits a 12 GB GPU at 512 px in fp16
    min_steps: int = 1
    max_steps: int = 100  # PNDM plateaus well before 100 steps; more only costs time
    min_guidance: float = 1.0  # 1 disables the text direction; below 1 inverts it
    max_guidance: float = 20.0
    min_side: int = 256  # output size; SD1.5 falls apart below 256 px
    max_side: int = 1024  # SD1.5 duplicates subjects above ~768 px; 1024 bounds memory
    size_multiple: int = 8  # the VAE downsamples by 8
    max_seed: int = 2**31 - 1  # fits every framework's int32 seed
    # Compute budget per request: images x steps x (pixels / 512^2). 4 images x 50 steps at 512 px = 200.
    max_compute_units: float = 200.0
    max_cache_interval: int = 10  # DeepCache's quality falls off beyond about 5; 10 bounds experiments
    max_prompt_chars: int = 1000  # Gradio does not enforce Textbox max_length; CLIP keeps 77 tokens anyway
    # Uploads. Pillow's own bomb guard only starts at 89 MP; ours refuses from the header first.
    max_upload_pixels: int = 4096 * 4096
    min_upload_side: int = 64  # smaller than this holds no usable face
    max_upload_aspect: float = 8.0  # panoramas and strips pad to mostly black squares
    max_file_size: str = "10mb"  # per upload, enforced by Gradio before our loader runs
    allowed_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "GIF")  # GIF: first frame only
    upload_background: tuple[int, int, int] = (255, 255, 255)  # transparent pixels are composited on white


@dataclass(frozen=True)
class ServerSettings:
    """How the web app is served."""

    queue_max_size: int = 16  # further requests are told "queue is full" instead of waiting for minutes
    concurrency_id: str = "gpu"  # every event that runs the pipeline shares one slot
    delete_cache: tuple[int, int] = (3600, 3600)  # uploaded faces are deleted after an hour


@dataclass(frozen=True)
class Settings:
    """Everything above, bundled so callers can pass one object."""

    defaults: GenerationDefaults = field(default_factory=GenerationDefaults)
    limits: Limits = field(default_factory=Limits)
    server: ServerSettings = field(default_factory=ServerSettings)


SETTINGS = Settings()


@dataclass(frozen=True)
class DetailSettings:
    """How the face pass works (generation/face_detail.py)."""

    strength: float = 0.4  # the share of the schedule run again: keeps the face's shape, redraws its detail
    min_strength: float = 0.05  # below this almost nothing is redrawn
    max_strength: float = 1.0  # 1: the face is drawn afresh from noise (its position kept by the paste)
    margin: float = 1.8  # crop side over face size: the whole face with hair and chin, so the model sees a face
    side: int = 512  # the canvas the face is redrawn on: SD1.5's native size
    feather: float = 0.15  # the paste fades over this share of the crop side at each edge: no seam
    attention_lead: float = 1.25  # by attention, a face goes to the subject with this much more mass than the next


DETAIL = DetailSettings()
