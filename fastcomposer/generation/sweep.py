"""Alpha sweeps: one seed at several alphas, and a labelled grid to compare them.

Alpha is FastComposer's central knob (the authors call it "the most important parameter"): the share
of the denoising loop that sees the subjects. Higher keeps identity, lower follows the prompt. A sweep
runs the same request and seed at each alpha, so the only difference between cells is alpha, and each
cell is exactly the image a single run at that alpha gives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from ..config import SETTINGS, Limits
from .request import seed_of
from .run import GenerationRequest, GenerationResult, generate

MAX_SWEEP = 8  # alphas per sweep: a grid wider than this is unreadable on a screen


def parse_alphas(values: Sequence[float]) -> list[float]:
    """Check a sweep's alphas: 1 to MAX_SWEEP values in [0, 1], no repeats. Raises ValueError."""
    alphas = [float(a) for a in values]
    if not 1 <= len(alphas) <= MAX_SWEEP:
        raise ValueError(f"an alpha sweep takes 1 to {MAX_SWEEP} values, got {len(alphas)}")
    bad = [a for a in alphas if not 0.0 <= a <= 1.0]
    if bad:
        raise ValueError(f"alpha must be between 0 and 1, got {bad[0]:g}")
    if len(set(alphas)) != len(alphas):
        raise ValueError("each alpha of a sweep must differ from the others")
    return alphas


def alpha_sweep(
    pipe,
    request: GenerationRequest,
    alphas: Sequence[float],
    *,
    limits: Limits = SETTINGS.limits,
    on_run: Callable[[int, int], None] | None = None,
    **generate_kwargs,
) -> list[GenerationResult]:
    """Run `request` once per alpha with one seed (drawn once when the request's seed is -1).

    Args:
        on_run: called as `on_run(k, len(alphas))` before run k (for progress over the whole sweep).
        generate_kwargs: passed to every `generate` call (subjects, on_step, stop, ...).

    Returns:
        One `GenerationResult` per alpha, in order; a stopped run ends the sweep (its result is last).
    """
    alphas = parse_alphas(alphas)
    seed = seed_of(request.seed, limits)
    results = []
    for k, alpha in enumerate(alphas):
        if on_run is not None:
            on_run(k, len(alphas))
        result = generate(pipe, replace(request, alpha=alpha, seed=seed), limits=limits, **generate_kwargs)
        results.append(result)
        if result.interrupted:
            break
    return results


def sweep_paths(output: str | Path, alphas: Sequence[float], num_images: int) -> list[list[Path]]:
    """Per alpha, its files: NAME_alpha0.50.png, or NAME_alpha0.50_0.png, ... with several images."""
    path = Path(output)
    if path.suffix.lower() != ".png":
        path = path.with_name(path.name + ".png")
    stem = path.stem
    return [[path.with_name(f"{stem}_alpha{a:.2f}{'' if num_images == 1 else f'_{k}'}.png")
             for k in range(num_images)] for a in alphas]


def grid_path(output: str | Path) -> Path:
    path = Path(output)
    return path.with_name(f"{path.stem if path.suffix.lower() == '.png' else path.name}_grid.png")


def grid(
    columns: Sequence[Sequence[PIL.Image.Image]],
    titles: Sequence[str],
    captions: Sequence[Sequence[str]] | None = None,
    max_cell: int = 384,
) -> PIL.Image.Image:
    """A labelled grid: one column per entry (its title on top), one row per image, a caption under each cell.

    Cells are scaled down to at most `max_cell` pixels wide so a sweep of 512 px images stays a sensible file.
    """
    first = columns[0][0]
    scale = min(1.0, max_cell / first.width)
    cell_w, cell_h = round(first.width * scale), round(first.height * scale)
    font = PIL.ImageFont.load_default(size=max(11, cell_w // 22))
    title_h = font.size + 10
    caption_h = (font.size + 8) if captions else 0
    rows = max(len(c) for c in columns)
    pad = 4
    width = len(columns) * (cell_w + pad) + pad
    height = title_h + rows * (cell_h + caption_h + pad) + pad
    canvas = PIL.Image.new("RGB", (width, height), (255, 255, 255))
    draw = PIL.ImageDraw.Draw(canvas)
    for c, (images, title) in enumerate(zip(columns, titles)):
        x = pad + c * (cell_w + pad)
        draw.text((x + 2, 4), title, fill=(20, 20, 20), font=font)
        for r, image in enumerate(images):
            y = title_h + r * (cell_h + caption_h + pad)
            canvas.paste(image.convert("RGB").resize((cell_w, cell_h), PIL.Image.Resampling.LANCZOS), (x, y))
            if captions:
                text = captions[c][r] if r < len(captions[c]) else ""
                draw.text((x + 2, y + cell_h + 3), text, fill=(60, 60, 60), font=font)
    return canvas


def sweep_grid(results: Sequence[GenerationResult], alphas: Sequence[float],
               captions: Sequence[Sequence[str]] | None = None) -> PIL.Image.Image:
    """The grid of a sweep: a column per alpha ("alpha 0.50"), a row per image."""
    return grid([r.images for r in results], [f"alpha {a:.2f}" for a in alphas[: len(results)]], captions)
