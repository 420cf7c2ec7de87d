"""Where each subject went: per-subject cross-attention maps, captured on request.

FastComposer's central idea is localized cross-attention: training pushes each subject token's
cross-attention into that subject's region of the image (spec §5.5, the localization loss). Reading
the same attention back at inference shows where each subject landed, and explains failures (two
subjects on one spot, a subject that never formed).

What is captured, and why:
- **Layers**: the `attn2` (cross-attention) layers of the UNet blocks at 1/2 and 1/4 of the latent's
  resolution: 32x32 and 16x16 for a 512 px image, i.e. SD1.5's `down_blocks.1`, `down_blocks.2`,
  `up_blocks.1` and `up_blocks.2` (10 layers). These are the layers the localization loss trained,
  minus the 8x8 mid block, which is too coarse to show a face. (The authors' Fig. 4 used one of them,
  `up_blocks.1.attentions.0.transformer_blocks.0.attn2`; averaging all ten is less noisy.)
- **Values**: softmax(QK^T / sqrt(d)) from image positions to each subject's marked token, on the
  conditional half of the CFG batch only, averaged over heads, over the subject-conditioned steps
  (earlier steps see no subject) and over the layers, after bilinear upsampling to the finest of them.

Capturing must not change a single output pixel: `CaptureAttnProcessor` computes the probabilities
*beside* the layer's normal SDPA call (it subclasses diffusers' `AttnProcessor2_0` and calls it for
the output), and only the chosen layers get it; every other layer keeps its processor untouched.
With capture off nothing is installed at all.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.utils.torch_utils import unwrap_module

logger = logging.getLogger(__name__)

DEFAULT_FACTORS = (2, 4)  # latent side / layer side: 32x32 and 16x16 at 512 px
# One colour per subject (colour-blind-safe Okabe-Ito hues), in marker order.
SUBJECT_COLOURS = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (204, 121, 167))


def attention_layers(unet: torch.nn.Module, factors: Sequence[int] = DEFAULT_FACTORS) -> list[str]:
    """Names (as in `unet.attn_processors`) of the cross-attention layers at the given downsampling factors.

    A down block k works at 2^k of the latent's side; up block k at 2^(n-1-k); the mid block at 2^(n-1).
    """
    unet = unwrap_module(unet)
    n = len(unet.config.block_out_channels)
    factor_of = {f"down_blocks.{k}.": 2**k for k in range(n)}
    factor_of.update({f"up_blocks.{k}.": 2 ** (n - 1 - k) for k in range(n)})
    factor_of["mid_block."] = 2 ** (n - 1)
    names = []
    for name in unet.attn_processors:
        if ".attn2." not in name:  # attn1 is self-attention: it has no token to look at
            continue
        factor = next((f for prefix, f in factor_of.items() if name.startswith(prefix)), None)
        if factor in factors:
            names.append(name)
    return names


class AttentionStore:
    """Sums cross-attention probabilities per token over layers and steps, on a common grid.

    Args:
        num_images: images in the batch (the conditional half of the CFG batch).
        latent_size: (height, width) of the latents.
        grid_factor: the finest captured factor; maps are kept at latent_size / grid_factor.
        cond_offset: index of the first conditional row in the UNet batch (n with CFG, 0 without).
    """

    def __init__(self, num_images: int, latent_size: tuple[int, int], grid_factor: int, cond_offset: int):
        self.num_images, self.cond_offset = num_images, cond_offset
        self.latent_size = latent_size
        self.grid = (max(1, latent_size[0] // grid_factor), max(1, latent_size[1] // grid_factor))
        self.active = False  # set by the pipeline: True only on subject-conditioned iterations
        self.total: torch.Tensor | None = None  # (n, L, gh, gw) float32
        self.count = 0  # layer calls summed
        self.steps = 0  # iterations that contributed

    def add(self, probs: torch.Tensor) -> None:
        """probs: (n, heads, N, L) attention probabilities of one layer call (conditional rows only)."""
        n, _, tokens, length = probs.shape
        h, w = self.latent_size
        factor = round((h * w / tokens) ** 0.5)
        side = (h // factor, w // factor)
        if side[0] * side[1] != tokens:  # an odd size the UNet padded: not a grid we can place
            return
        maps = probs.float().mean(dim=1).transpose(1, 2).reshape(n, length, *side)  # (n, L, h', w')
        if side != self.grid:
            maps = F.interpolate(maps, size=self.grid, mode="bilinear", align_corners=False)
        self.total = maps if self.total is None else self.total + maps
        self.count += 1

    def token_maps(self) -> torch.Tensor:
        """(n, L, gh, gw): the average map of every token position (zeros when nothing was captured)."""
        if self.total is None or self.count == 0:
            return torch.zeros(self.num_images, 0, *self.grid)
        return (self.total / self.count).cpu()


class CaptureAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA processor plus a side computation of the probabilities for `store`.

    The output is the parent's, computed by the same code on the same inputs: bit-identical to a run
    without capture. The extra work (one more query projection and an N x 77 softmax per head) runs only
    while `store.active`.
    """

    def __init__(self, store: AttentionStore):
        super().__init__()
        self.store = store

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        store = self.store
        if (store.active and encoder_hidden_states is not None and hidden_states.ndim == 3
                and attn.group_norm is None and attn.spatial_norm is None):
            rows = slice(store.cond_offset, store.cond_offset + store.num_images)
            context = encoder_hidden_states[rows]
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
            query = attn.head_to_batch_dim(attn.to_q(hidden_states[rows]))
            key = attn.head_to_batch_dim(attn.to_k(context))
            probs = attn.get_attention_scores(query, key, None)  # (n * heads, N, L)
            store.add(probs.reshape(store.num_images, attn.heads, *probs.shape[1:]))
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


@dataclass
class SubjectAttention:
    """What `return_attention=True` returns.

    Args:
        maps: (n_images, k_subjects, h, w) average attention to each subject's token, non-negative.
        token_maps: (n_images, 77, h, w) the same for every token position (for comparisons).
        positions: each subject's token position in the prompt ids.
        layers: the attention layers averaged.
        steps: the subject-conditioned iterations averaged.
    """

    maps: torch.Tensor
    token_maps: torch.Tensor
    positions: list[int]
    layers: list[str]
    steps: int


@contextmanager
def capture_attention(
    unet: torch.nn.Module, num_images: int, latent_size: tuple[int, int], cond_offset: int,
    factors: Sequence[int] = DEFAULT_FACTORS,
) -> Iterator[tuple[AttentionStore, list[str]]]:
    """Install `CaptureAttnProcessor` on the chosen layers for the duration of the block, then restore."""
    unet = unwrap_module(unet)
    names = attention_layers(unet, factors)
    store = AttentionStore(num_images, latent_size, min(factors), cond_offset)
    original = unet.attn_processors
    capture = CaptureAttnProcessor(store)
    if any(type(original[n]) is not AttnProcessor2_0 for n in names):
        # Another processor (xformers, a custom one) would be replaced by SDPA: the output could change.
        logger.warning("attention capture replaces non-default processors on %d layers", len(names))
    unet.set_attn_processor({name: capture if name in names else proc for name, proc in original.items()})
    try:
        yield store, names
    finally:
        unet.set_attn_processor(original)


# -- drawing -----------------------------------------------------------------------------------------------

def normalise(maps: torch.Tensor) -> np.ndarray:
    """(k, h, w) -> float32 in [0, 1], each map stretched from its own minimum to its own peak (a flat map -> 0).

    Attention to a token is spread thinly over the whole image; stretching shows where it is relatively strong.
    """
    array = maps.float().clamp(min=0).numpy()
    flat = array.reshape(array.shape[0], -1)
    low, high = flat.min(axis=1).reshape(-1, 1, 1), flat.max(axis=1).reshape(-1, 1, 1)
    span = high - low
    return np.where(span > 0, (array - low) / np.maximum(span, 1e-12), 0.0).astype(np.float32)


def overlay(
    image: PIL.Image.Image, maps: torch.Tensor, words: Sequence[str], strength: float = 0.7
) -> PIL.Image.Image:
    """The image tinted, at each pixel, in the colour of the subject that attends there most, as strongly as it
    does; with a legend naming each subject. `maps` is (k, h, w)."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    height, width = base.shape[:2]
    stretched = [np.asarray(PIL.Image.fromarray(m).resize((width, height), PIL.Image.Resampling.BILINEAR))
                 for m in normalise(maps)]
    stack = np.clip(np.stack(stretched), 0, 1)  # (k, H, W)
    winner = stack.argmax(axis=0)
    weight = (strength * stack.max(axis=0))[..., None]
    colours = np.array([SUBJECT_COLOURS[k % len(SUBJECT_COLOURS)] for k in range(len(stack))], dtype=np.float32)
    out = base * (1 - weight) + colours[winner] * weight
    tinted = PIL.Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    return with_legend(tinted, words)


def with_legend(image: PIL.Image.Image, words: Sequence[str]) -> PIL.Image.Image:
    """A strip under `image` with a colour swatch and the subject word for each subject."""
    font = PIL.ImageFont.load_default(size=max(10, image.width // 32))
    strip = max(18, image.width // 16)
    canvas = PIL.Image.new("RGB", (image.width, image.height + strip), (255, 255, 255))
    canvas.paste(image, (0, 0))
    draw = PIL.ImageDraw.Draw(canvas)
    x, pad = 4, strip // 5
    for k, word in enumerate(words):
        colour = SUBJECT_COLOURS[k % len(SUBJECT_COLOURS)]
        draw.rectangle([x, image.height + pad, x + strip - 2 * pad, image.height + strip - pad], fill=colour)
        x += strip - pad
        label = f"{k + 1}: {word}"
        draw.text((x, image.height + pad), label, fill=(20, 20, 20), font=font)
        x += int(draw.textlength(label, font=font)) + 2 * strip // 3
    return canvas
