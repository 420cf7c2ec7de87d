"""Layout boxes as users give them: checked, normalised, and as text (`0,0,0.5,1 | - | ...`).

Pure Python (no torch), so the web page and the PNG metadata use it without loading a model; layout.py turns
boxes into attention masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..messages import Wording

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1), fractions of the image's width and height


LATENT_CELL = 8  # pixels per latent cell (the VAE's downsampling): the smallest box that covers anything


def box_problem(boxes: Sequence | None, num_subjects: int, height: int, width: int) -> tuple[str, dict] | None:
    """What is wrong with `boxes`, as (reason, facts), or None when they can be used.

    Reasons: "not_a_list", "too_many", "not_four", "outside", "empty", "too_small". The callers word them for
    their audience (the pipeline's `ValueError`, the request's per-audience messages).
    """
    if boxes is None:
        return None
    if isinstance(boxes, (str, bytes)) or not isinstance(boxes, Sequence):
        return "not_a_list", {}
    if len(boxes) > num_subjects:
        return "too_many", {"n": len(boxes), "subjects": num_subjects}
    for k, box in enumerate(boxes, start=1):
        if box is None:
            continue
        if isinstance(box, (str, bytes)) or not isinstance(box, Sequence) or len(box) != 4 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
            return "not_four", {"k": k}
        x0, y0, x1, y1 = (float(v) for v in box)
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
            return "outside", {"k": k, "box": _show(box)}
        if x1 <= x0 or y1 <= y0:
            return "empty", {"k": k, "box": _show(box)}
        if (x1 - x0) * width < LATENT_CELL or (y1 - y0) * height < LATENT_CELL:
            w_px, h_px = round((x1 - x0) * width), round((y1 - y0) * height)
            return "too_small", {"k": k, "w_px": w_px, "h_px": h_px, "cell": LATENT_CELL}
    return None


# `box_problem`'s reasons, per audience: the page's Layout boxes, the command line's --box (in subject order),
# Python's `boxes` (the pipeline's own checks use that wording too). `{box_k}` names the box for the audience.
BOX_PROBLEMS = {
    "not_a_list": Wording.same("{boxes} must be a list with one (x0, y0, x1, y1) box or None per subject"),
    "too_many": Wording(
        page="{n} layout boxes for {subjects} subject(s); give one per subject",
        cli="{n} --box values for {subjects} subject(s); give one --box per subject, in `img` order (--box - for a "
        "free subject)",
        api="`boxes` has {n} entries for {subjects} subject(s); give one per subject, in marker order",
    ),
    "not_four": Wording(page="layout box {k} must be four numbers", cli="--box number {k} must be X0,Y0,X1,Y1",
                        api="`boxes` entry {k} must be four numbers (x0, y0, x1, y1) or None"),
    "outside": Wording.same("{box_k} {box} is outside the image: each value is a fraction of width or height, from "
                            "0 to 1"),
    "empty": Wording.same("{box_k} {box} is empty or inverted: x1 must be greater than x0, and y1 greater than y0"),
    "too_small": Wording.same("{box_k} is {w_px}x{h_px} px, smaller than one latent cell ({cell} px); make it larger"),
}


def _show(box: Sequence) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in box) + ")"


def side_by_side(count: int) -> list[Box]:
    """`count` equal columns, left to right, in marker order (the page's "Side by side", evaluate's `layout`)."""
    return [(round(k / count, 4), 0.0, round((k + 1) / count, 4), 1.0) for k in range(count)]


def format_boxes(boxes: Sequence | None) -> str:
    """"0,0,0.5,1 | - | ...": each subject's box as the command line's --box takes it ("-": free); "" for none."""
    if not boxes or all(box is None for box in boxes):
        return ""
    return " | ".join("-" if box is None else ",".join(f"{float(v):g}" for v in box) for box in boxes)


def parse_box(text: str) -> Box | None:
    """One subject's box from "x0,y0,x1,y1" (None for "-" or nothing: a free subject). Raises ValueError unless it
    is four numbers; the callers word the message for their audience."""
    text = text.strip()
    if text in ("-", ""):
        return None
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise ValueError("a box is four numbers")
    return values


def parse_boxes_text(text: str | None) -> list[Box | None] | None:
    """The inverse of `format_boxes`: None for empty text. Raises ValueError naming the part it cannot read."""
    text = (text or "").strip()
    if not text:
        return None
    boxes: list[Box | None] = []
    for k, part in enumerate(text.split("|"), start=1):
        try:
            boxes.append(parse_box(part))
        except ValueError:
            raise ValueError(f"box {k} ({part.strip()[:30]!r}) must be four numbers x0,y0,x1,y1 from 0 to 1, or - "
                             "for a free subject") from None
    return boxes


def normalise_boxes(boxes: Sequence | None, num_subjects: int) -> list[Box | None]:
    """One entry per subject: its box as a tuple of floats, or None (a shorter list leaves the rest free)."""
    given = list(boxes or [])
    return [None if b is None else tuple(float(v) for v in b) for b in given] + [None] * (num_subjects - len(given))
