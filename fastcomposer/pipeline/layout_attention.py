"""The layout in the UNet: the masks of one call (`LayoutState`) and the attention processor that applies them.

`LayoutState` turns the subjects' regions (see layout.py for the rules) into additive masks on the attention
logits, one set per attention grid, and keeps what changes per iteration: the phase of delayed conditioning
(which token positions hold the subjects) and the bias's weight. `LayoutAttnProcessor` is diffusers' SDPA
processor with that mask passed to `scaled_dot_product_attention`; on the capture layers it also hands the
(masked) probabilities to attention stores, so capture and layout work in one run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from .attention import AttentionStore
from .layout import (
    LAYOUT,
    Box,
    LayoutConfig,
    attention_grids,
    box_cells,
    cross_block,
    cross_boost,
    regions_from_maps,
    resize_regions,
    self_block,
)


@dataclass(frozen=True)
class LayoutPlan:
    """A call's layout, as the pipeline passes it to the loop."""

    boxes: list[Box | None]  # per subject in marker order; None: free
    separate: bool  # assign the free subjects regions from their attention during the text-only steps
    positions: list[int]  # each subject's token position in the augmented prompt
    text_positions: list[int]  # the same in the text-only prompt (`layout.text_only_positions`)
    config: LayoutConfig = LAYOUT

    @property
    def active(self) -> bool:
        return self.separate or any(box is not None for box in self.boxes)


@dataclass
class MaskTrace:
    """One masked attention call, recorded when `LayoutState.trace` is a list (for tests and debugging)."""

    layer: str
    step: int
    kind: str  # "cross" or "self"
    mask: torch.Tensor  # the additive mask passed to SDPA, (B or 1, 1, N, L)


class LayoutState:
    """The masks of one pipeline call, per attention grid, and the per-iteration phase and bias weight.

    Args:
        plan: the boxes, separation and token positions.
        num_images: images per prompt (n); the UNet batch is [negative; positive] (2n rows) with guidance.
        do_cfg: classifier-free guidance is on.
        latent_size: (h, w) of the latents; `depth` the number of UNet resolutions.
    """

    def __init__(self, plan: LayoutPlan, num_images: int, do_cfg: bool, latent_size: tuple[int, int], depth: int,
                 device: torch.device, dtype: torch.dtype):
        self.plan, self.config = plan, plan.config
        self.num_images, self.do_cfg = num_images, do_cfg
        self.device, self.dtype = device, dtype
        self.grids = attention_grids(latent_size, depth)  # factor -> (gh, gw)
        self.factor_of_tokens = {gh * gw: factor for factor, (gh, gw) in self.grids.items()}
        self.boxed = [box is not None for box in plan.boxes]
        self.regions: dict[int, torch.Tensor] = {}  # factor -> (n, k, gh, gw) bool; empty: no masks yet
        self.subject_phase = False  # False: the text-only steps (plain words at `text_positions`)
        self.step = -1
        self.beta = torch.zeros((), device=device, dtype=torch.float32)  # the bias weight at this step
        self.trace: list[MaskTrace] | None = None
        self._cross: dict[tuple[bool, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._self: dict[int, torch.Tensor] = {}
        if any(self.boxed):
            self.set_regions({factor: self.box_regions(grid) for factor, grid in self.grids.items()})

    # -- regions -------------------------------------------------------------------------------------------

    def box_regions(self, grid: tuple[int, int]) -> torch.Tensor:
        """(n, k, gh, gw) bool: each boxed subject's cells on `grid` (free subjects: none)."""
        cells = torch.stack([box_cells(box, grid) if box is not None else torch.zeros(grid, dtype=torch.bool)
                             for box in self.plan.boxes])
        return cells.unsqueeze(0).expand(self.num_images, -1, -1, -1)

    def separate(self, maps: torch.Tensor) -> None:
        """Automatic separation from `maps`, (n, k, h, w): each free subject's token attention over the text-only
        steps. Boxed subjects keep their boxes, and no free subject gets a cell inside a box."""
        grid = tuple(maps.shape[-2:])
        boxes = self.box_regions(grid)
        free = torch.tensor([not b for b in self.boxed]).expand(self.num_images, -1)
        outside_boxes = ~boxes.any(dim=1, keepdim=True)
        auto = regions_from_maps(maps * outside_boxes, self.config.separation_threshold, free) & outside_boxes
        regions = boxes | auto
        self.set_regions({factor: resize_regions(regions, g) for factor, g in self.grids.items()})

    def set_regions(self, regions: dict[int, torch.Tensor]) -> None:
        """New regions per grid: the masks are built once here, not at every attention call."""
        self.regions = regions
        self._cross.clear()
        self._self.clear()
        phases = {False: self.plan.text_positions, True: self.plan.positions}
        for factor, cells in regions.items():
            flat = cells.flatten(2)  # (n, k, N)
            tokens = flat.shape[-1]
            for phase, positions in phases.items():
                block = cross_block(flat, positions, 77)
                boost = cross_boost(flat, positions, 77, self.boxed)
                self._cross[phase, tokens] = (self._rows(block, cond_only=True), self._rows(boost, cond_only=True))
            if factor in self.config.self_factors:
                self._self[tokens] = self._rows(self_block(flat), cond_only=False)

    def _rows(self, per_image: torch.Tensor, cond_only: bool) -> torch.Tensor:
        """(n, N, L) per image -> (B, 1, N, L) for the UNet batch: the negative half zeros when `cond_only`."""
        if self.do_cfg:
            negative = torch.zeros_like(per_image) if cond_only else per_image
            per_image = torch.cat([negative, per_image])
        return per_image.unsqueeze(1).to(device=self.device, dtype=self.dtype)

    # -- per iteration -------------------------------------------------------------------------------------

    def before_step(self, i: int, t: torch.Tensor, subject_step: bool, num_train_timesteps: int) -> None:
        self.step, self.subject_phase = i, subject_step
        weight = self.config.bias * (float(t) / num_train_timesteps) ** self.config.bias_power
        self.beta.fill_(weight)

    def cross_mask(self, tokens: int, length: int) -> torch.Tensor | None:
        """The additive mask for a cross-attention call over `tokens` cells, or None (no regions on that grid)."""
        masks = self._cross.get((self.subject_phase, tokens))
        if masks is None or length != masks[0].shape[-1]:
            return None
        block, boost = masks
        return block + self.beta.to(block.dtype) * boost

    def self_mask(self, tokens: int) -> torch.Tensor | None:
        return self._self.get(tokens)

    def record(self, layer: str, kind: str, mask: torch.Tensor) -> None:
        if self.trace is not None:
            self.trace.append(MaskTrace(layer, self.step, kind, mask.detach().cpu().clone()))


class LayoutAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA attention with the layout's mask added to the logits; optionally capturing probabilities.

    Args:
        state: the call's `LayoutState`.
        layer: this layer's name (for the trace).
        stores: attention stores this (cross-attention) layer feeds; each captures while its `active` is set.
    """

    def __init__(self, state: LayoutState, layer: str, stores: Sequence[AttentionStore] = ()):
        super().__init__()
        self.state, self.layer, self.stores = state, layer, list(stores)

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        plain = (attention_mask is None and hidden_states.ndim == 3 and attn.spatial_norm is None
                 and attn.group_norm is None and attn.norm_q is None and attn.norm_k is None and not args)
        if not plain:  # not an SD1.5 transformer-block attention: nothing of the layout applies
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        cross = encoder_hidden_states is not None
        context = encoder_hidden_states if cross else hidden_states
        if cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        batch, tokens, _ = hidden_states.shape
        heads = attn.heads
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // heads
        query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, heads, head_dim).transpose(1, 2)

        state = self.state
        mask = state.cross_mask(tokens, key.shape[2]) if cross else state.self_mask(tokens)
        if mask is not None:
            state.record(self.layer, "cross" if cross else "self", mask)
        if cross and any(store.active for store in self.stores):
            self._capture(attn, query, key, mask)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def _capture(self, attn: Attention, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> None:
        """The masked probabilities of the positive half, (n, heads, N, L), to every active store."""
        for store in self.stores:
            if not store.active:
                continue
            rows = slice(store.cond_offset, store.cond_offset + store.num_images)
            logits = query[rows].float() @ key[rows].float().transpose(-1, -2) * attn.scale
            if mask is not None:
                logits = logits + mask[rows].float()
            store.add(logits.softmax(dim=-1), self.layer)
