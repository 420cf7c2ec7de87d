"""The subjects into the prompt: photos through CLIP's image encoder (cached), then fused into the subject words.

Stage 3 of `FastComposerPipeline.__call__`, as a mixin so the pipeline file stays a readable script.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import PIL.Image
import torch

from ..inputs.prompt import ParsedPrompt
from ..models.postfuse import SubjectImageProcessor, encode_subjects

SUBJECT_CACHE_SIZE = 8  # photo sets whose CLIP embeddings are kept (a few KB each)

SubjectImages = Sequence[PIL.Image.Image | Sequence[PIL.Image.Image]]  # per subject: one photo or several


def subject_groups(subject_images: SubjectImages) -> list[list[PIL.Image.Image]]:
    """Per subject, the list of its photos: a plain image means one photo."""
    return [[item] if isinstance(item, PIL.Image.Image) else list(item) for item in subject_images]


def _fingerprint(image: PIL.Image.Image) -> tuple:
    return image.size, image.mode, hashlib.sha1(image.tobytes()).hexdigest()


class SubjectEncodingMixin:
    """`encode_subject_images` and `encode_augmented_prompt` for a pipeline with `image_encoder`, `text_encoder`
    and `postfuse_module`; `init_subject_encoding` sets up the per-pipeline cache."""

    def init_subject_encoding(self, image_encoder: torch.nn.Module, object_resolution: int) -> None:
        self.subject_processor = SubjectImageProcessor(object_resolution)
        self._subject_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # see encode_subject_images
        self._subject_cache_owner = image_encoder

    def encode_subject_images(self, subject_images: SubjectImages, device: torch.device) -> torch.Tensor:
        """(1, k, 1, D) CLIP embeddings of the k subjects (pad to square, 256, then 224 in the encoder).

        A subject with several photos gets the mean of its photos' projected CLIP embeddings, with equal
        weights and before the post-fuse MLP. That point, not after the MLP: the MLP is nonlinear and ends
        in a LayerNorm, so averaging its outputs gives a vector it never produced (shorter than any it
        does), while the mean of CLIP embeddings of one person is itself a CLIP-like embedding (CLIP's
        space is close to linear for such averages) with photo-specific pose and light averaged out, and
        the trained MLP then fuses it as it fuses any one photo. Unnormalised, like a single embedding.

        Identical photos within a subject count once, and every photo of every subject goes through the
        encoder in one batch in subject order, so one photo per subject encodes exactly as before and
        the same photo given twice equals giving it once, bit for bit.

        Cached for the last few photo sets (keyed on every photo of every subject): people re-run new
        prompts with the same photos, and the ViT-L/14 pass costs about a second per photo on a CPU.
        """
        if self._subject_cache_owner is not self.image_encoder:  # a new encoder: old embeddings are void
            self._subject_cache.clear()
            self._subject_cache_owner = self.image_encoder
        unique: list[list[PIL.Image.Image]] = []
        prints: list[tuple] = []
        for group in subject_groups(subject_images):
            seen: dict[tuple, PIL.Image.Image] = {}
            for image in group:
                seen.setdefault(_fingerprint(image), image)
            unique.append(list(seen.values()))
            prints.append(tuple(seen))
        key = (str(device), self.image_encoder.dtype, self.subject_processor.resolution, tuple(prints))
        if key in self._subject_cache:
            self._subject_cache.move_to_end(key)
            return self._subject_cache[key]
        embeds = self._encode_unique(unique, device)
        self._subject_cache[key] = embeds
        while len(self._subject_cache) > SUBJECT_CACHE_SIZE:
            self._subject_cache.popitem(last=False)
        return embeds

    def _encode_unique(self, unique: list[list[PIL.Image.Image]], device: torch.device) -> torch.Tensor:
        """Every photo in one encoder batch, then each subject's mean: (1, k, 1, D)."""
        flat = [image for group in unique for image in group]
        pixels = self.subject_processor(flat).to(device=device, dtype=self.image_encoder.dtype)
        embeds = encode_subjects(self.image_encoder, pixels)  # (1, photos, 1, D)
        per_subject, start = [], 0
        for group in unique:
            chunk = embeds[:, start:start + len(group)]
            start += len(group)
            # One photo: the embedding itself (no arithmetic, so bit-identical to a single-photo run).
            per_subject.append(chunk if len(group) == 1 else chunk.float().mean(dim=1, keepdim=True).to(chunk.dtype))
        return torch.cat(per_subject, dim=1)

    def encode_augmented_prompt(
        self, parsed: ParsedPrompt, object_embeds: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        """(1, L, D) text embeddings of the clean ids with each subject's embedding fused in."""
        input_ids = torch.tensor([parsed.input_ids], device=device)
        mask = torch.tensor([parsed.image_token_mask], device=device)
        text_embeds = self.text_encoder(input_ids)[0]
        num_objects = torch.tensor([parsed.num_subjects], device=device)
        return self.postfuse_module(text_embeds, object_embeds, mask, num_objects)
