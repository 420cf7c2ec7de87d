"""What `python -m fastcomposer evaluate` writes: averages, the variants' comparison, the Markdown tables and the
contact sheet (report.json, report.md, contact_sheet.png).

Kept apart from runner.py (which generates and scores) so the protocol reads on its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

# FastComposer's single-subject results in the paper (Table 1): FaceNet identity, CLIP ViT-L/14 prompt consistency.
PAPER = {"identity": 0.514, "prompt_consistency": 0.243}


@dataclass
class EvaluationResult:
    report: dict  # what report.json holds
    markdown: str  # the table printed and saved as report.md
    output_dir: Path
    images: list[Path] = field(default_factory=list)


TILE = 192  # contact sheet thumbnail side, px
LABEL_HEIGHT = 30  # two lines of the default font under each thumbnail
MAX_TILES = 240  # a larger run still gets a readable sheet (of its first images); the JSON has them all


def summarize(entries: list[dict]) -> dict:
    """Means and standard deviations over the images that were scored (hidden ones are counted, not scored), the
    shares with a subject not found and flagged "blended", and the seconds per image."""
    scored = [e for e in entries if not e["hidden"]]
    out: dict = {"images": len(scored), "hidden": len(entries) - len(scored),
                 "no_face": sum(1 for e in scored if e["num_faces"] == 0)}
    n = max(1, len(scored))
    out["subject_not_found_share"] = sum(1 for e in scored if min(e.get("subjects") or [0.0]) <= 0.0) / n
    out["blended_share"] = sum(1 for e in scored if e.get("blended")) / n
    times = [e["seconds"] for e in entries if e.get("seconds") is not None]
    out["seconds_per_image"] = float(np.mean(times)) if times else None
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
    s, o = report["settings"], report["overall"]
    facenet = s["identity_model"] == "facenet"
    paper_identity = f"{paper['identity']:.3f}" if facenet else "(FaceNet: not comparable)"
    rows.append(f"| *FastComposer paper: single subject, FaceNet, 15 CelebA identities* | | | "
                f"{paper_identity} | {paper['prompt_consistency']:.3f} |")
    comparable = ("The paper's metric (FaceNet with MTCNN at the authors' settings): the values compare with the "
                  "paper's, on other people." if facenet else
                  "The paper's identity figure comes from FaceNet on other people: compare trends, not values "
                  "(`--identity-model facenet` gives the paper's metric).")
    notes = [
        "",
        f"Identity: {s['identity_model_name']} cosine similarity between the image's faces and each subject's "
        "reference, faces and subjects paired greedily, the minimum over subjects, 0 when a subject has no face. "
        "Prompt consistency: CLIP ViT-L/14 cosine similarity between the image and the prompt without `img`. "
        f"Mean ± standard deviation over images. {comparable}",
        "",
        f"{o['images']} images scored, {o['no_face']} without a face, {o['hidden']} hidden by the safety checker. "
        f"Model {s['model']}, {s['scheduler']} {s['num_inference_steps']} steps, guidance {s['guidance_scale']:g}, "
        f"{s['width']}x{s['height']}, seeds {', '.join(str(x) for x in s['seeds'])}, face crop "
        f"{'on' if s['face_crop'] else 'off'}, detector {s['face_detector']}, CLIP {s['clip_model']}.",
    ]
    return "\n".join(["# FastComposer evaluation", "", *rows, *notes]) + "\n"


def compare_variants(entries: list[dict], names: list[str]) -> dict:
    """Per variant: its summary and, against the first, the paired 95% interval of the difference (stats.py)."""
    from .stats import paired_differences, paired_interval

    out = {}
    for name in names:
        mine = [e for e in entries if e["variant"] == name]
        entry = {**summarize(mine)}
        if name != names[0]:
            entry["difference"] = {key: paired_interval(paired_differences(entries, name, names[0], key))
                                   for key in ("identity", "prompt_consistency")}
        out[name] = entry
    return out


def _difference(entry: dict, key: str) -> str:
    d = entry.get("difference", {}).get(key)
    if d is None or d["mean"] is None:
        return "baseline" if "difference" not in entry else "—"
    if d["low"] is None:
        return f"{d['mean']:+.3f} (1 pair)"
    return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def variants_markdown(variants: dict, identity_name: str) -> list[str]:
    """The comparison table: one row per variant."""
    rows = ["", "## Variants", "",
            "| variant | images | identity ↑ | Δ identity (95% CI) | prompt consistency ↑ | Δ prompt (95% CI) | "
            "subject not found | blended | s / image |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, v in variants.items():
        seconds = "—" if v["seconds_per_image"] is None else f"{v['seconds_per_image']:.2f}"
        rows.append(f"| {name} | {v['images']} | {_cell(v, 'identity')} | {_difference(v, 'identity')} | "
                    f"{_cell(v, 'prompt_consistency')} | {_difference(v, 'prompt_consistency')} | "
                    f"{v['subject_not_found_share']:.0%} | {v['blended_share']:.0%} | {seconds} |")
    first = next(iter(variants))
    rows += ["", f"Δ: each variant minus {first} over the same prompts and seeds, with the paired 95% interval over "
             f"prompt x seed pairs (Student t). Identity by {identity_name}."]
    return rows


def write_report(run, settings: dict, cases: list, names: list[str]) -> EvaluationResult:
    """report.json, report.md and contact_sheet.png in `run.out` (`settings`: what generated and scored)."""
    import json

    s, entries, out = run.settings, run.entries, run.out
    report = dict(
        settings=settings,
        **averages(entries, s.alphas),
        cases={c.name: dict(subjects=len(c.photos), prompts=len(c.prompts),
                            **averages([e for e in entries if e["case"] == c.name], s.alphas)) for c in cases},
        variants=compare_variants(entries, names),
        paper=dict(PAPER, note="FastComposer paper, single subject: FaceNet identity on 15 CelebA identities"),
        images=entries,
    )
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    markdown = to_markdown(report)
    if len(names) > 1:
        markdown += "\n".join(variants_markdown(report["variants"], run.identity.name)) + "\n"
    (out / "report.md").write_text(markdown, encoding="utf-8")
    # The sheet: with variants, each row one prompt, seed and image, the variants side by side
    tiles = sorted(run.tiles, key=lambda t: (t[0], names.index(t[1]))) if len(names) > 1 else run.tiles
    columns = len(names) if len(names) > 1 else s.num_images * len(s.seeds)
    write_contact_sheet([(path, label) for _, _, path, label in tiles], out / "contact_sheet.png", columns=columns)
    return EvaluationResult(report, markdown, out, [out / e["file"] for e in entries])


def averages(entries: list[dict], alphas: tuple[float, ...]) -> dict:
    return dict(overall=summarize(entries),
                by_alpha={f"{a:g}": summarize([e for e in entries if e["alpha"] == a]) for a in alphas})


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
