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

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.utils.torch_utils import unwrap_module

from .overlays import SUBJECT_COLOURS, overlay  # noqa: F401  (their old home; the drawing is in overlays.py)

logger = logging.getLogger(__name__)

DEFAULT_FACTORS = (2, 4)  # latent side / layer side: 32x32 and 16x16 at 512 px
def layer_factors(unet: torch.nn.Module) -> dict[str, int]:
    """Every attention layer (as named in `unet.attn_processors`) -> the downsampling factor of its grid.

    A down block k works at 2^k of the latent's side; up block k at 2^(n-1-k); the mid block at 2^(n-1).
    """
    unet = unwrap_module(unet)
    n = len(unet.config.block_out_channels)
    factor_of = {f"down_blocks.{k}.": 2**k for k in range(n)}
    factor_of.update({f"up_blocks.{k}.": 2 ** (n - 1 - k) for k in range(n)})
    factor_of["mid_block."] = 2 ** (n - 1)
    return {name: next(f for prefix, f in factor_of.items() if name.startswith(prefix))
            for name in unet.attn_processors if any(name.startswith(prefix) for prefix in factor_of)}


def attention_layers(
    unet: torch.nn.Module, factors: Sequence[int] = DEFAULT_FACTORS, kind: str = "attn2"
) -> list[str]:
    """Names of the cross-attention (`kind="attn2"`) or self-attention ("attn1") layers at the given factors."""
    return [name for name, factor in layer_factors(unet).items() if f".{kind}." in name and factor in factors]


@contextmanager
def use_processors(unet: torch.nn.Module, replacements: dict[str, object]) -> Iterator[None]:
    """Put `replacements` (layer name -> attention processor) on the UNet for the block, then the originals back."""
    unet = unwrap_module(unet)
    original = unet.attn_processors
    if any(type(original[name]) is not AttnProcessor2_0 for name in replacements):
        # Another processor (xformers, a custom one) would be replaced by SDPA: the output could change.
        logger.warning("replacing non-default attention processors on %d layers", len(replacements))
    unet.set_attn_processor({name: replacements.get(name, proc) for name, proc in original.items()})
    try:
        yield
    finally:
        unet.set_attn_processor(original)


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
        # Per layer, on the layer's own grid (not resampled): the sum of its maps and its number of calls.
        self.by_layer: dict[str, tuple[torch.Tensor, int]] = {}

    def add(self, probs: torch.Tensor, layer: str | None = None) -> None:
        """probs: (n, heads, N, L) attention probabilities of one layer call (conditional rows only)."""
        n, _, tokens, length = probs.shape
        h, w = self.latent_size
        factor = round((h * w / tokens) ** 0.5)
        side = (h // factor, w // factor)
        if side[0] * side[1] != tokens:  # an odd size the UNet padded: not a grid we can place
            return
        maps = probs.float().mean(dim=1).transpose(1, 2).reshape(n, length, *side)  # (n, L, h', w')
        if layer is not None:
            total, count = self.by_layer.get(layer, (0, 0))
            self.by_layer[layer] = (total + maps, count + 1)
        if side != self.grid:
            maps = F.interpolate(maps, size=self.grid, mode="bilinear", align_corners=False)
        self.total = maps if self.total is None else self.total + maps
        self.count += 1

    def layer_maps(self, positions: list[int]) -> dict[str, torch.Tensor]:
        """Per layer, (n, k, h', w'): its average attention to each of `positions`, on its own grid."""
        return {layer: (total / count)[:, positions].cpu() for layer, (total, count) in self.by_layer.items()}

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

    def __init__(self, store: AttentionStore, layer: str | None = None):
        super().__init__()
        self.store, self.layer = store, layer

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
            store.add(probs.reshape(store.num_images, attn.heads, *probs.shape[1:]), self.layer)
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
        regions: with a layout, (n_images, k_subjects, h, w) bool: each subject's region on the maps' grid (its
            box, or what automatic separation assigned it); None without one.
        boxes: with a layout, each subject's box as given (None for a free subject).
        layer_maps: per captured layer, (n_images, k_subjects, h', w') on that layer's own grid.
    """

    maps: torch.Tensor
    token_maps: torch.Tensor
    positions: list[int]
    layers: list[str]
    steps: int
    regions: torch.Tensor | None = None
    boxes: list | None = None
    layer_maps: dict[str, torch.Tensor] | None = None


@contextmanager
def capture_attention(
    unet: torch.nn.Module, num_images: int, latent_size: tuple[int, int], cond_offset: int,
    factors: Sequence[int] = DEFAULT_FACTORS,
) -> Iterator[tuple[AttentionStore, list[str]]]:
    """Install `CaptureAttnProcessor` on the chosen layers for the duration of the block, then restore."""
    names = attention_layers(unet, factors)
    store = AttentionStore(num_images, latent_size, min(factors), cond_offset)
    with use_processors(unet, {name: CaptureAttnProcessor(store, name) for name in names}):
        yield store, names

