"""Drawing where each subject went: each subject's attention tinted on the image, regions and boxes outlined."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

if TYPE_CHECKING:  # the drawing needs no torch itself: the page imports this module at start-up
    import torch

# One colour per subject (colour-blind-safe Okabe-Ito hues), in marker order.
SUBJECT_COLOURS = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (204, 121, 167))


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
    image: PIL.Image.Image, maps: torch.Tensor, words: Sequence[str], strength: float = 0.7,
    regions: torch.Tensor | None = None, boxes: Sequence | None = None,
) -> PIL.Image.Image:
    """The image tinted, at each pixel, in the colour of the subject that attends there most, as strongly as it
    does; with a legend naming each subject. `maps` is (k, h, w).

    With a layout, each subject's region (`regions`, (k, h, w) bool: what automatic separation assigned) is
    outlined in its colour, and each box (`boxes`, fractions of the image) drawn as a rectangle in its colour.
    """
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    height, width = base.shape[:2]
    stretched = [np.asarray(PIL.Image.fromarray(m).resize((width, height), PIL.Image.Resampling.BILINEAR))
                 for m in normalise(maps)]
    stack = np.clip(np.stack(stretched), 0, 1)  # (k, H, W)
    winner = stack.argmax(axis=0)
    weight = (strength * stack.max(axis=0))[..., None]
    colours = np.array([colour_of(k) for k in range(len(stack))], dtype=np.float32)
    out = base * (1 - weight) + colours[winner] * weight
    tinted = PIL.Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    if regions is not None:
        outline_regions(tinted, regions, skip=[b is not None for b in boxes or []])
    if boxes:
        draw_boxes(tinted, boxes)
    return with_legend(tinted, words)


def colour_of(k: int) -> tuple[int, int, int]:
    return SUBJECT_COLOURS[k % len(SUBJECT_COLOURS)]


def draw_boxes(image: PIL.Image.Image, boxes: Sequence, width: int | None = None) -> PIL.Image.Image:
    """Each subject's box (fractions of the image; None: none) as a rectangle in its colour, in place."""
    draw = PIL.ImageDraw.Draw(image)
    line = width or max(2, image.width // 128)
    for k, box in enumerate(boxes):
        if box is None:
            continue
        x0, y0, x1, y1 = box
        draw.rectangle([round(x0 * image.width), round(y0 * image.height), round(x1 * image.width) - 1,
                        round(y1 * image.height) - 1], outline=colour_of(k), width=line)
    return image


def outline_regions(image: PIL.Image.Image, regions: torch.Tensor, skip: Sequence[bool] = ()) -> PIL.Image.Image:
    """The edge of each subject's region, (k, h, w) bool on a coarse grid, in its colour, in place (a subject
    whose entry in `skip` is True is left out: its box is drawn instead)."""
    pixels = np.asarray(image).copy()
    height, width = pixels.shape[:2]
    thick = max(1, width // 160)
    for k, cells in enumerate(regions.bool().numpy()):
        if k < len(skip) and skip[k] or not cells.any():
            continue
        mask = np.asarray(PIL.Image.fromarray(cells.astype(np.uint8) * 255).resize((width, height),
                                                                                PIL.Image.Resampling.NEAREST)) > 0
        inner = mask.copy()  # the region shrunk by `thick` pixels: what is left of the region is its edge
        for axis in (0, 1):
            for shift in (-thick, thick):
                inner &= np.roll(mask, shift, axis=axis)
        pixels[mask & ~inner] = colour_of(k)
    image.paste(PIL.Image.fromarray(pixels))
    return image


def with_legend(image: PIL.Image.Image, words: Sequence[str]) -> PIL.Image.Image:
    """A strip under `image` with a colour swatch and the subject word for each subject."""
    font = PIL.ImageFont.load_default(size=max(10, image.width // 32))
    strip = max(18, image.width // 16)
    canvas = PIL.Image.new("RGB", (image.width, image.height + strip), (255, 255, 255))
    canvas.paste(image, (0, 0))
    draw = PIL.ImageDraw.Draw(canvas)
    x, pad = 4, strip // 5
    for k, word in enumerate(words):
        colour = colour_of(k)
        draw.rectangle([x, image.height + pad, x + strip - 2 * pad, image.height + strip - pad], fill=colour)
        x += strip - pad
        label = f"{k + 1}: {word}"
        draw.text((x, image.height + pad), label, fill=(20, 20, 20), font=font)
        x += int(draw.textlength(label, font=font)) + 2 * strip // 3
    return canvas
