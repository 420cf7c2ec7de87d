"""The denoising loop's plan and its add-ons: delayed subject conditioning, feature caching, attention capture.

`FastComposerPipeline.denoise` runs the loop; this module holds what it consults at each iteration:
- `DelayedConditioning`: which embedding the UNet's batch sees at iteration i (spec section 4);
- `LoopSettings`: the per-call choices that shape the loop (guidance, caching, capture, callbacks);
- `LoopAddons`: what is attached to the UNet for one call (the DeepCache hooks, the capture and layout attention
  processors) and what each iteration tells them, removed again when the call ends.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils import logging
from diffusers.utils.torch_utils import is_compiled_module, unwrap_module

from ..inputs.prompt import ParsedPrompt
from .attention import (
    DEFAULT_FACTORS,
    AttentionStore,
    SubjectAttention,
    attention_layers,
    capture_attention,
    layer_factors,
    use_processors,
)
from .caching import FeatureCache, is_full_pass
from .layout import resize_regions
from .layout_attention import LayoutAttnProcessor, LayoutPlan, LayoutState

logger = logging.get_logger(__name__)


def last_text_only_index(alpha: float, num_inference_steps: int) -> float:
    """The last loop index (inclusive) at which the conditional branch sees only the text.

    A float, not rounded, compared with the loop index as the released code did. With PNDM's
    N + 1 iterations and alpha = 1 the first iteration is still text-only.
    """
    return (1.0 - alpha) * num_inference_steps


@dataclass
class DelayedConditioning:
    """The two embeddings of the UNet batch and when it switches from the first to the second.

    With classifier-free guidance each is [negative; positive] (n rows each); without, the positive rows alone.
    The negative half never sees the subjects.
    """

    text: torch.Tensor  # the plain-text prompt (markers removed): the layout forms from it first
    subject: torch.Tensor  # the augmented prompt, subjects fused into their words: identities fill the layout
    switch: float  # `last_text_only_index`: iterations i <= switch see `text`
    num_iterations: int  # loop iterations planned (PNDM runs steps + 1)

    def is_subject_step(self, i: int) -> bool:
        return i > self.switch

    def at(self, i: int) -> torch.Tensor:
        return self.subject if self.is_subject_step(i) else self.text

    @property
    def first_subject_step(self) -> int | None:
        """The first iteration that sees the subjects (None when none does, e.g. alpha = 0)."""
        return next((i for i in range(self.num_iterations) if i > self.switch), None)


@dataclass
class LoopSettings:
    """One call's choices that shape the loop."""

    guidance_scale: float  # > 1: classifier-free guidance over a [negative; positive] batch
    num_images: int  # images per prompt: n rows per half of the batch
    cache_interval: int = 1  # DeepCache: a full UNet pass every N iterations (1 = every pass full)
    return_attention: bool = False  # capture each subject's cross-attention on the subject-conditioned steps
    extra_step_kwargs: dict[str, Any] = field(default_factory=dict)  # the sampler's `step` arguments (eta, ...)
    tensor_inputs: list[str] = field(default_factory=lambda: ["latents"])  # what the step callback receives
    callback: Callable[[Any, int, Any, dict], dict] | None = None  # `callback_on_step_end`
    cross_attention_kwargs: dict[str, Any] | None = None  # passed to the UNet's attention processors
    layout: LayoutPlan | None = None  # boxes and separation (layout.py); None or inactive: no masks at all

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def cond_offset(self) -> int:
        """The first row of the positive half in the UNet batch."""
        return self.num_images if self.do_cfg else 0


class LoopAddons:
    """What is attached to the UNet for one call, as a context manager, and told about each iteration.

    - the feature cache (caching.py) when `cache_interval > 1`: a full pass at the first iteration, at the first
      subject-conditioned one, then every N-th;
    - the attention capture (attention.py) when asked: active on the subject-conditioned iterations only;
    - the layout (layout.py) when there are boxes or separation: `LayoutAttnProcessor` on every cross-attention
      layer and on the self-attention layers it masks, feeding the capture where both are on. Separation also
      captures the free subjects' words during the text-only steps, and turns them into regions at the switch.
    With none of them, nothing is attached and the loop is the plain one.
    """

    def __init__(self, unet: torch.nn.Module, settings: LoopSettings, conditioning: DelayedConditioning,
                 latent_size: tuple[int, int], device: torch.device, dtype: torch.dtype,
                 num_train_timesteps: int = 1000):
        self.unet, self.settings, self.conditioning = unet, settings, conditioning
        self.latent_size = latent_size
        self.num_train_timesteps = num_train_timesteps
        self.cache_interval = settings.cache_interval
        if self.cache_interval > 1 and is_compiled_module(unet):
            # Not verified with CUDA graphs (the cached pass changes the graph every step): run every pass full.
            logger.warning("feature caching is off for a compiled UNet; every UNet pass runs in full")
            self.cache_interval = 1
        layout = settings.layout if settings.layout is not None and settings.layout.active else None
        depth = len(unwrap_module(unet).config.block_out_channels)
        self.layout = (LayoutState(layout, settings.num_images, settings.do_cfg, latent_size, depth, device, dtype)
                       if layout is not None else None)
        self.cache: FeatureCache | None = None
        self.store: AttentionStore | None = None  # the capture the caller asked for
        self.separation: AttentionStore | None = None  # the free subjects' words during the text-only steps
        self.layers: list[str] = []
        self._stack = ExitStack()

    def __enter__(self) -> LoopAddons:
        s = self.settings
        if self.cache_interval > 1:
            self.cache = self._stack.enter_context(FeatureCache.attach(self.unet, self.cache_interval))
        if self.layout is None:
            if s.return_attention:
                self.store, self.layers = self._stack.enter_context(
                    capture_attention(self.unet, s.num_images, self.latent_size, s.cond_offset)
                )
            return self
        self.layers = attention_layers(self.unet, DEFAULT_FACTORS)
        if s.return_attention:
            self.store = AttentionStore(s.num_images, self.latent_size, min(DEFAULT_FACTORS), s.cond_offset)
        if s.layout.separate:
            self.separation = AttentionStore(s.num_images, self.latent_size, min(DEFAULT_FACTORS), s.cond_offset)
        self._stack.enter_context(use_processors(self.unet, self._layout_processors()))
        return self

    def _layout_processors(self) -> dict[str, LayoutAttnProcessor]:
        """Every cross-attention layer (the capture layers feeding the stores) and the masked self-attention ones."""
        stores = [store for store in (self.separation, self.store) if store is not None]
        processors = {}
        for name, factor in layer_factors(self.unet).items():
            if ".attn2." in name:
                processors[name] = LayoutAttnProcessor(self.layout, name, stores if name in self.layers else ())
            elif ".attn1." in name and factor in self.layout.config.self_factors:
                processors[name] = LayoutAttnProcessor(self.layout, name)
        return processors

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def before_step(self, i: int, t: torch.Tensor) -> None:
        """Tell every add-on which iteration comes next."""
        subject_step = self.conditioning.is_subject_step(i)
        if self.cache is not None:
            self.cache.full = is_full_pass(i, self.cache_interval, self.conditioning.first_subject_step)
        if self.store is not None:
            self.store.active = subject_step
            self.store.steps += subject_step
        if self.separation is not None:
            self.separation.active = not subject_step
            self.separation.steps += not subject_step
            if i == self.conditioning.first_subject_step and self.separation.count:
                positions = self.settings.layout.text_positions
                self.layout.separate(self.separation.token_maps()[:, positions])
        if self.layout is not None:
            self.layout.before_step(i, t, subject_step, self.num_train_timesteps)

    def attention(self, parsed: ParsedPrompt) -> SubjectAttention | None:
        """Each subject's captured map (None when capture was off), with the layout's regions when there is one."""
        if self.store is None:
            return None
        positions = list(parsed.subject_positions)
        token_maps = self.store.token_maps()
        maps = token_maps[:, positions] if token_maps.shape[1] else token_maps
        regions, boxes = None, None
        if self.layout is not None:
            boxes = list(self.settings.layout.boxes)
            factor = min(DEFAULT_FACTORS)
            if factor in self.layout.regions:
                regions = resize_regions(self.layout.regions[factor], self.store.grid)
        return SubjectAttention(maps, token_maps, positions, self.layers, self.store.steps, regions, boxes,
                                self.store.layer_maps(positions))
