"""The two numbers of the paper's protocol: identity preservation and prompt consistency.

- Prompt consistency: CLIP ViT-L/14 cosine similarity between the image and the prompt with its `img` markers
  removed (`openai/clip-vit-large-patch14`, downloaded once into the Hugging Face cache).
- Identity: `ArcFaceIdentity` (the per-image identity check's model and detector; the default) or the paper's own
  metric, `identity.facenet.PaperIdentity` (FaceNet with MTCNN, `--identity-model facenet`). Both score an image
  the same way: faces and subjects paired greedily, the least similar subject's cosine, clamped at 0.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..downloads import hub_unreachable
from ..identity.checker import IdentityChecker
from ..identity.matching import greedy_identity, score_faces  # noqa: F401  (greedy_identity: its old home)
from .errors import EvaluationError

CLIP_REPO = "openai/clip-vit-large-patch14"  # ViT-L/14, as the authors' `CLIPEvaluator(clip_model="ViT-L/14")`


CLIP_REVISION_ENV = "FASTCOMPOSER_CLIP_REVISION"  # pin a Hub commit of CLIP_REPO


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


def identity_score(checker: IdentityChecker, image: Image.Image, references: np.ndarray) -> dict:
    """One image's identity entry with ArcFace over every detected face: `identity` (see `greedy_identity`),
    per-subject `subjects`, `num_faces`, `blended`."""
    faces, emb = checker.embed_faces(image)
    return score_faces(emb if faces else np.zeros((0, references.shape[1])), references)


class ArcFaceIdentity:
    """Identity by the per-image check's ArcFace and face detector, over every face found (the default model)."""

    def __init__(self, checker: IdentityChecker):
        self.checker = checker
        self.name = "ArcFace (facexlib IR-SE50)"

    def unavailable_reason(self) -> str | None:
        return self.checker.unavailable_reason() or None

    def reference(self, photos) -> np.ndarray | None:
        return self.checker.reference_embedding(photos)

    def score(self, image: Image.Image, references: np.ndarray) -> dict:
        return identity_score(self.checker, image, references)

    @property
    def detector_name(self) -> str:
        return self.checker.cropper.detector_name


IDENTITY_MODELS = ("arcface", "facenet")


def identity_model(name: str, checker: IdentityChecker | None = None, device: str = "cpu"):
    """The identity scorer `name` ("arcface": the default checker's, "facenet": the paper's metric)."""
    if name == "facenet":
        from ..identity.facenet import PaperIdentity

        return PaperIdentity(device=device)
    if name != "arcface":
        raise EvaluationError(f"unknown identity model {name!r}; choose {' or '.join(IDENTITY_MODELS)}")
    from ..identity.checker import default_checker

    return ArcFaceIdentity(checker or default_checker())
