"""What a pipeline call returns, and what a flagged image becomes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput

from .attention import SubjectAttention


@dataclass
class FastComposerPipelineOutput(BaseOutput):
    """What a pipeline call returns.

    Args:
        images: the generated images (PIL list, numpy array or tensor, by `output_type`). An image the
            safety checker flagged is replaced by a plain grey placeholder; its pixels are never returned.
        nsfw_content_detected: per image, whether the safety checker flagged it (None without a checker).
        interrupted: True when a step callback stopped the run; `images` is then empty.
        attention: with `return_attention=True`, each subject's cross-attention map (see attention.py).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: list[bool] | None
    interrupted: bool = False
    attention: SubjectAttention | None = None


def placeholder_image(width: int, height: int) -> PIL.Image.Image:
    """What a flagged image is replaced by: flat grey, so nothing of the original survives."""
    return PIL.Image.new("RGB", (width, height), (128, 128, 128))
