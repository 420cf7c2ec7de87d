"""What `python -m fastcomposer evaluate` writes: averages, the Markdown table and the contact sheet.

Kept apart from `evaluate.py` (which generates and scores) so the protocol reads on its own.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

TILE = 192  # contact sheet thumbnail side, px
LABEL_HEIGHT = 30  # two lines of the default font under each thumbnail
MAX_TILES = 240  # a larger run still gets a readable sheet (of its first images); the JSON has them all


def summarize(entries: list[dict]) -> dict:
    """Means and standard deviations over the images that were scored (hidden ones are counted, not scored)."""
    scored = [e for e in entries if not e["hidden"]]
    out: dict = {"images": len(scored), "hidden": len(entries) - len(scored),
                 "no_face": sum(1 for e in scored if e["num_faces"] == 0)}
    for key in ("identity", "prompt_consistency"):
        values = np.array([e[key] for e in scored], dtype=np.float64)
        out[key] = float(values.mean()) if len(values) else None
        out[f"{key}_std"] = float(values.std()) if len(values) else None
    return out


def _cell(summary: dict, key: str) -> str:
    if summary[key] is None:
        return "—"
    return f"{summary[key]:.3f} ± {summary[f'{key}_std']:.3f}"


def to_markdown(report: dict) -> str:
    """The results table (overall and per case, one row per alpha), the paper's figures beside them, and notes."""
    rows = ["| cases | alpha | images | identity ↑ | prompt consistency ↑ |", "|---|---:|---:|---:|---:|"]

    def add(scope: str, by_alpha: dict) -> None:
        for alpha, s in by_alpha.items():
            rows.append(f"| {scope} | {alpha} | {s['images']} | {_cell(s, 'identity')} | "
                        f"{_cell(s, 'prompt_consistency')} |")

    add("**all**", report["by_alpha"])
    for name, case in report["cases"].items():
        add(f"{name} ({case['subjects']} subject{'s' if case['subjects'] > 1 else ''})", case["by_alpha"])
    paper = report["paper"]
    rows.append(f"| *FastComposer paper: single subject, FaceNet, 15 CelebA identities* | | | "
                f"{paper['identity']:.3f} | {paper['prompt_consistency']:.3f} |")
    s, o = report["settings"], report["overall"]
    notes = [
        "",
        "Identity: ArcFace cosine similarity between the image's faces and each subject's reference, faces and "
        "subjects paired greedily, the minimum over subjects, 0 when a subject has no face. Prompt consistency: "
        "CLIP ViT-L/14 cosine similarity between the image and the prompt without `img`. Mean ± standard deviation "
        "over images. The paper's identity figure comes from FaceNet on other people: compare trends, not values.",
        "",
        f"{o['images']} images scored, {o['no_face']} without a face, {o['hidden']} hidden by the safety checker. "
        f"Model {s['model']}, {s['scheduler']} {s['num_inference_steps']} steps, guidance {s['guidance_scale']:g}, "
        f"{s['width']}x{s['height']}, seeds {', '.join(str(x) for x in s['seeds'])}, face crop "
        f"{'on' if s['face_crop'] else 'off'}, detector {s['face_detector']}, CLIP {s['clip_model']}.",
    ]
    return "\n".join(["# FastComposer evaluation", "", *rows, *notes]) + "\n"


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def write_contact_sheet(tiles: list[tuple[Path, str]], path: Path, columns: int) -> Path:
    """A grid of the images (`columns` per row), each labelled with its two-line caption."""
    if len(tiles) > MAX_TILES:
        logger.info("contact sheet shows the first %d of %d images", MAX_TILES, len(tiles))
        tiles = tiles[:MAX_TILES]
    columns = max(1, min(columns, len(tiles) or 1))
    rows = max(1, -(-len(tiles) // columns))
    sheet = Image.new("RGB", (columns * TILE, rows * (TILE + LABEL_HEIGHT)), "white")
    draw, font = ImageDraw.Draw(sheet), _font(11)
    for n, (file, label) in enumerate(tiles):
        x, y = (n % columns) * TILE, (n // columns) * (TILE + LABEL_HEIGHT)
        with Image.open(file) as image:
            thumb = image.convert("RGB")
        if max(thumb.size) > TILE:
            thumb.thumbnail((TILE, TILE))
        elif max(thumb.size) < TILE:  # tiny previews: enlarged by a whole factor, without blurring
            scale = max(1, TILE // max(thumb.size))
            thumb = thumb.resize((thumb.width * scale, thumb.height * scale), Image.Resampling.NEAREST)
        sheet.paste(thumb, (x + (TILE - thumb.width) // 2, y + (TILE - thumb.height) // 2))
        draw.multiline_text((x + 3, y + TILE + 2), label, fill="black", font=font, spacing=2)
    sheet.save(path, format="PNG")
    return path
