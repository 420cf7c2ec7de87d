"""The two pieces FastComposer adds to Stable Diffusion 1.5: subject image features and the post-fuse MLP.

Shapes below use k = number of subjects, D = the text encoder's width (768 for the released model).

    subject photos --pad to square, resize 256--> (1, k, 3, 256, 256) in [0, 1]
        --resize 224, CLIP mean/std--> CLIP ViT-L/14 --pooled CLS, visual projection--> (1, k, 1, D)
    prompt --text encoder--> (1, 77, D); at each subject position t:
        t' = LayerNorm(mlp2(mlp1([t, subject]) + t))           (every other token is left alone)

Reference: Xiao et al., "FastComposer: Tuning-Free Multi-Subject Image Generation with Localized
Attention", 2023 (arXiv 2305.10431); module and parameter names follow the released checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torchvision import transforms as T
from transformers import CLIPVisionModelWithProjection

# CLIP's normalisation constants (OpenAI CLIP); the image encoder was trained with them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class MLP(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear, with an optional residual (names match the checkpoint)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, use_residual: bool = True):
        super().__init__()
        if use_residual and in_dim != out_dim:
            raise ValueError(f"a residual MLP needs in_dim == out_dim, got {in_dim} and {out_dim}")
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.act_fn = nn.GELU()  # exact (erf) GELU, as trained
        self.use_residual = use_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(self.act_fn(self.fc1(self.layernorm(x))))
        return y + x if self.use_residual else y


class PostfuseModule(ModelMixin, ConfigMixin):
    """Fuses each subject's image embedding into its word's text embedding, after the text encoder.

    Fusing after the encoder (rather than before) keeps the subject from leaking into other tokens:
    only the marked positions change.
    """

    @register_to_config
    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.mlp1 = MLP(embed_dim * 2, embed_dim, embed_dim, use_residual=False)
        self.mlp2 = MLP(embed_dim, embed_dim, embed_dim, use_residual=True)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def fuse_fn(self, text_embeds: torch.Tensor, object_embeds: torch.Tensor) -> torch.Tensor:
        """(n, D) text vectors at subject positions + (n, D) image vectors -> (n, D) fused vectors."""
        fused = self.mlp1(torch.cat([text_embeds, object_embeds], dim=-1)) + text_embeds  # residual onto the text
        return self.layer_norm(self.mlp2(fused))

    def forward(
        self,
        text_embeds: torch.Tensor,
        object_embeds: torch.Tensor,
        image_token_mask: torch.Tensor,
        num_objects: torch.Tensor,
    ) -> torch.Tensor:
        """Replace the text vectors at `image_token_mask` with fused ones.

        Args:
            text_embeds (`torch.Tensor`): (B, L, D) text encoder output.
            object_embeds (`torch.Tensor`): (B, K, 1, D) or (B, K, D) subject embeddings, K >= subjects per row.
            image_token_mask (`torch.Tensor`): (B, L) bool, True at subject positions.
            num_objects (`torch.Tensor`): (B,) number of subjects per row; the first ones of each row are used.

        Returns:
            `torch.Tensor`: (B, L, D); a new tensor (the input is not modified).
        """
        batch, length, dim = text_embeds.shape
        object_embeds = object_embeds.to(text_embeds.dtype).reshape(batch, -1, dim)
        valid = torch.arange(object_embeds.shape[1], device=object_embeds.device)[None, :] < num_objects[:, None]
        subject_vectors = object_embeds[valid]  # (n, D) in row-major order: k-th marker gets k-th image
        flat_text = text_embeds.reshape(-1, dim)
        flat_mask = image_token_mask.reshape(-1)
        fused = self.fuse_fn(flat_text[flat_mask], subject_vectors)
        out = flat_text.masked_scatter(flat_mask[:, None], fused)
        return out.reshape(batch, length, dim)


class SubjectImageProcessor:
    """Turns subject photos into the (1, k, 3, R, R) tensor the released demo fed its image encoder.

    Pad to square with black (the model was trained on crops padded to square), then a bilinear,
    antialiased resize to R = 256 on the uint8 tensor, as the demo did; the encoder later resizes to 224.
    """

    def __init__(self, resolution: int = 256):
        self.resolution = resolution
        self.resize = T.Resize((resolution, resolution), interpolation=T.InterpolationMode.BILINEAR, antialias=True)

    @staticmethod
    def pad_to_square(image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) -> black bars of (long - short) // 2 on both short sides (one pixel short when odd)."""
        _, h, w = image.shape
        pad = abs(h - w) // 2
        if h > w:
            return F.pad(image, (pad, pad, 0, 0), mode="constant", value=0)
        if w > h:
            return F.pad(image, (0, 0, pad, pad), mode="constant", value=0)
        return image

    def __call__(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        tensors = []
        for image in images:
            pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)  # uint8 (3, H, W)
            pixels = self.resize(self.pad_to_square(pixels))
            tensors.append(T.functional.convert_image_dtype(pixels, torch.float32))
        return torch.stack(tensors).unsqueeze(0)


def encode_subjects(image_encoder: CLIPVisionModelWithProjection, pixels: torch.Tensor) -> torch.Tensor:
    """CLIP image features of subject photos, exactly as the released model computed them.

    Args:
        image_encoder (`CLIPVisionModelWithProjection`): the vision tower and its bias-free projection.
        pixels (`torch.Tensor`): (B, k, 3, h, w) in [0, 1], on the encoder's device and dtype.

    Returns:
        `torch.Tensor`: (B, k, 1, D): the projected pooled CLS token, *not* L2-normalised.
    """
    b, k, c, h, w = pixels.shape
    dtype = pixels.dtype
    pixels = pixels.reshape(b * k, c, h, w)
    if pixels.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        pixels = pixels.float()  # the CPU has no half-precision antialiased resize; GPUs keep the original's dtype
    size = image_encoder.config.image_size
    if (h, w) != (size, size):
        pixels = F.interpolate(pixels, (size, size), mode="bilinear", antialias=True)
    mean = torch.tensor(CLIP_MEAN, device=pixels.device, dtype=pixels.dtype)[:, None, None]
    std = torch.tensor(CLIP_STD, device=pixels.device, dtype=pixels.dtype)[:, None, None]
    embeds = image_encoder(pixel_values=((pixels - mean) / std).to(dtype)).image_embeds
    return embeds.reshape(b, k, 1, -1)
