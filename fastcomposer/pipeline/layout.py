"""Layout: where each subject goes, as attention masks. Boxes per subject, and automatic separation.

FastComposer's failure in multi-subject images is *blending*: two subjects' identities mix into one face, or one
subject takes both places. Bounded Attention (Dahary et al., ECCV 2024, arXiv 2403.16990) shows that leakage
between similar subjects happens inside attention, and stops it with masks alone, in the forward pass; DenseDiffusion
(Kim et al., ICCV 2023) steers each word to its region with a bias on the attention logits that fades over the
run. Both only change logits, so no backward pass is needed and the cost stays small on a CPU. The rules here:

- **Regions.** Each subject may have a region: its box (`(x0, y0, x1, y1)` as fractions of width and height), or,
  with automatic separation, the latent cells its token attends to most during the text-only steps. S(p) is the
  set of subjects whose region holds cell p; cells in no region are background. Overlapping boxes are allowed:
  a cell in two boxes belongs to both subjects and is open to both.
- **Cross-attention**, on the conditional half of the batch only (the negative prompt holds no subject): a cell
  p in a region cannot attend to the token of a subject j outside S(p) (logit -inf). Inside its own box, subject
  j's token gets a bias `bias * (t / T) ** bias_power` on the logit: strong at the first steps, where the layout
  forms, and gone by the middle of the run. A subject without a box is free, but still shut out of the others'.
- **Self-attention**, at the 32x32 and 16x16 layers (at 512 px) and on both halves: cells of different subjects'
  regions do not attend to each other (S(p) and S(q) both non-empty and disjoint); background attends everywhere.
- **Both phases of delayed conditioning**: during the text-only steps the subject's token is the plain word at
  the same position (`text_only_positions` checks that they line up); afterwards it is the fused token.

This module holds the boxes' checks, the regions on every attention grid and the masks; `layout_attention.py`
holds the attention processor that applies them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .boxes import Box, box_problem, format_boxes, normalise_boxes, parse_boxes_text  # noqa: F401

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class LayoutConfig:
    """How strongly and where the layout acts. The defaults are the papers' choices, scaled to SD1.5's logits."""

    bias: float = 2.5  # logit added to a subject's token inside its box at t = T (e^2.5: about 12x the weight)
    bias_power: float = 5.0  # the bias fades as (t / T) ** 5: DenseDiffusion's schedule (0.33 at 0.8T, 0.03 at 0.5T)
    # Self-attention masks at these downsampling factors of the latent (2, 4: 32x32 and 16x16 at 512 px). At 1
    # (64x64) a mask is 4096 x 4096 per image, and benchmarks/bench_layout.py found it not worth its cost.
    self_factors: tuple[int, ...] = (2, 4)
    separation_threshold: float = 0.5  # a cell joins a subject's region from this share of the subject's peak
    separation_factors: tuple[int, ...] = (2, 4)  # the layers whose attention separation reads (as the capture)


LAYOUT = LayoutConfig()


def attention_grids(latent_size: tuple[int, int], depth: int) -> dict[int, tuple[int, int]]:
    """Downsampling factor -> the (height, width) of the UNet's attention grid there.

    Each down block halves the side with a stride-2 convolution of padding 1, which rounds up: ceil(h / 2).
    """
    grids, (h, w) = {}, latent_size
    for level in range(depth):
        grids[2**level] = (h, w)
        h, w = (h + 1) // 2, (w + 1) // 2
    return grids


def box_cells(box: Box, grid: tuple[int, int]) -> torch.Tensor:
    """(gh, gw) bool: the cells whose centre lies in `box`; the cell under the box's centre when none does,
    so a box is never lost on a coarse grid."""
    gh, gw = grid
    ys = (torch.arange(gh, dtype=torch.float64) + 0.5) / gh
    xs = (torch.arange(gw, dtype=torch.float64) + 0.5) / gw
    x0, y0, x1, y1 = box
    cells = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
    if not cells.any():
        cy = min(gh - 1, int((y0 + y1) / 2 * gh))
        cx = min(gw - 1, int((x0 + x1) / 2 * gw))
        cells[cy, cx] = True
    return cells


def regions_from_maps(maps: torch.Tensor, threshold: float, free: torch.Tensor | None = None) -> torch.Tensor:
    """Automatic separation: (n, k, h, w) attention of each subject's token -> (n, k, h, w) bool regions.

    Each map is smoothed over 3x3 cells (single stray cells would otherwise split a region) and scaled to its own
    peak; a cell goes to the subject whose token attends to it most, when that subject's share of its peak there
    is at least `threshold`; other cells stay background. `free`, (n, k) bool, says which subjects may get a
    region (a subject with a box keeps its box).
    """
    n, k, h, w = maps.shape
    smooth = F.avg_pool2d(maps.float().reshape(n * k, 1, h, w), 3, stride=1, padding=1, count_include_pad=False)
    smooth = smooth.reshape(n, k, h, w)
    peak = smooth.flatten(2).amax(dim=2).clamp(min=1e-12)[..., None, None]
    share = smooth / peak
    if free is not None:
        share = share.masked_fill(~free[..., None, None], -1.0)
    winner = share.argmax(dim=1, keepdim=True)  # (n, 1, h, w)
    best = share.gather(1, winner)
    chosen = torch.zeros(n, k, h, w, dtype=torch.bool)
    chosen.scatter_(1, winner, best >= threshold)
    return chosen


def resize_regions(regions: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(n, k, h, w) bool regions onto another grid (nearest cell)."""
    if tuple(regions.shape[-2:]) == tuple(grid):
        return regions
    return F.interpolate(regions.float(), size=grid, mode="nearest") > 0.5


def cross_block(cells: torch.Tensor, positions: Sequence[int], length: int) -> torch.Tensor:
    """(n, N, L) float: -inf where cell p may not attend to subject j's token (p in a region that is not j's).

    `cells` is (n, k, N) bool: subject j's region over the N cells of one grid.
    """
    n, k, cells_count = cells.shape
    owned = cells.any(dim=1)  # (n, N): the cell is in some region
    block = torch.zeros(n, cells_count, length)
    for j, position in enumerate(positions):
        shut = owned & ~cells[:, j]  # in a region, but not subject j's
        block[:, :, position] = torch.where(shut, float("-inf"), 0.0)
    return block


def cross_boost(cells: torch.Tensor, positions: Sequence[int], length: int, boxed: Sequence[bool]) -> torch.Tensor:
    """(n, N, L) float: 1 where subject j's token is biased (cell p inside j's own box), else 0."""
    n, k, cells_count = cells.shape
    boost = torch.zeros(n, cells_count, length)
    for j, position in enumerate(positions):
        if boxed[j]:
            boost[:, :, position] = cells[:, j].float()
    return boost


def self_block(cells: torch.Tensor) -> torch.Tensor:
    """(n, N, N) float: -inf between cells of different subjects' regions (both in a region, no subject shared)."""
    owned = cells.any(dim=1)  # (n, N)
    shared = torch.einsum("nkp,nkq->npq", cells.float(), cells.float()) > 0
    blocked = owned[:, :, None] & owned[:, None, :] & ~shared
    return torch.where(blocked, float("-inf"), 0.0)


def text_only_positions(tokenizer, text_only: str, input_ids: Sequence[int], positions: Sequence[int]) -> list[int]:
    """Where each subject's plain word sits in the text-only prompt's tokens (the first denoising steps' prompt).

    The augmented prompt is built from the prompt's pieces around each marker, the text-only one from the prompt
    with the markers cut out, so for ordinary prompts the two tokenise alike and every position is the same.
    Where one differs (text the tokenizer merges across a marker), the plain word is looked for nearby.
    """
    ids = tokenizer(text_only, padding="max_length", max_length=len(input_ids), truncation=True).input_ids
    found = []
    for position in positions:
        token = input_ids[position]
        if position < len(ids) and ids[position] == token:
            found.append(position)
            continue
        nearby = [i for i, t in enumerate(ids) if t == token]
        found.append(min(nearby, key=lambda i: abs(i - position)) if nearby else position)
        logger.warning("a subject word's token moved from %d to %d in the text-only prompt", position, found[-1])
    return found
