"""Evaluation cases: a folder per case, with its subjects' photos and prompts, or the built-in set.

    CASES_DIR/<case>/prompts.txt   one prompt per line, `img` after each subject word; `#` lines and blank
                                   lines are skipped; every prompt has one marker per subject
    CASES_DIR/<case>/1.jpg, 2.png  one photo per subject, numbered in marker order
    CASES_DIR/<case>/1/, 2/        or a folder of several photos of that subject
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .errors import EvaluationError

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


PROMPTS_FILE = "prompts.txt"


@dataclass
class Case:
    """One folder of subjects and prompts."""

    name: str
    prompts: list[str]
    photos: list[list[Image.Image]]  # per subject, in marker order: its photos


def _photos_in(entry: Path, case: str, k: int) -> list[Image.Image]:
    from ..inputs.images import ImageError, load_image

    files = sorted(p for p in entry.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES) if entry.is_dir() else [entry]
    if not files:
        kinds = ", ".join(PHOTO_SUFFIXES)
        raise EvaluationError(f"case {case!r}: the folder for subject {k} holds no photo ({kinds})")
    try:
        return [load_image(p, name=f"case {case!r} subject {k} photo {p.name}") for p in files]
    except ImageError as e:
        raise EvaluationError(str(e)) from None


def load_case(folder: Path) -> Case:
    """Read one case folder (see the module docstring for the layout)."""
    from ..inputs.prompt import count_markers
    name = folder.name
    prompts_file = folder / PROMPTS_FILE
    if not prompts_file.is_file():
        raise EvaluationError(f"case {name!r} has no {PROMPTS_FILE} (one prompt per line, `img` after each subject)")
    subjects: dict[int, Path] = {}
    for entry in folder.iterdir():
        stem = entry.stem if entry.is_file() else entry.name
        if not stem.isdigit() or (entry.is_file() and entry.suffix.lower() not in PHOTO_SUFFIXES):
            continue
        if int(stem) in subjects:
            raise EvaluationError(f"case {name!r}: subject {int(stem)} is given twice ({subjects[int(stem)].name} and "
                                  f"{entry.name}); keep one file or one folder per subject")
        subjects[int(stem)] = entry
    if sorted(subjects) != list(range(1, len(subjects) + 1)) or not subjects:
        found = ", ".join(str(k) for k in sorted(subjects)) or "none"
        raise EvaluationError(f"case {name!r}: subjects must be numbered 1, 2, ... in marker order (1.jpg or a folder "
                              f"1/), found: {found}")
    lines = [(n, line.strip()) for n, line in enumerate(prompts_file.read_text(encoding="utf-8").splitlines(), 1)]
    prompts = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not prompts:
        raise EvaluationError(f"case {name!r}: {PROMPTS_FILE} holds no prompt")
    for n, prompt in prompts:
        if count_markers(prompt) != len(subjects):
            raise EvaluationError(f"case {name!r}, {PROMPTS_FILE} line {n}: {count_markers(prompt)} `img` marker(s) "
                                  f"but {len(subjects)} subject(s); write `img` after each subject word")
    return Case(name, [p for _, p in prompts], [_photos_in(subjects[k], name, k) for k in sorted(subjects)])


def load_cases(cases_dir: str | os.PathLike) -> list[Case]:
    """Every case under `cases_dir` (sorted by name), or `cases_dir` itself when it holds a prompts.txt."""
    root = Path(cases_dir)
    if not root.is_dir():
        raise EvaluationError(f"{root} is not a folder of cases")
    if (root / PROMPTS_FILE).is_file():
        return [load_case(root)]
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise EvaluationError(f"{root} holds no case folder (each with a {PROMPTS_FILE} and photos 1.jpg, 2.jpg, ...)")
    return [load_case(f) for f in folders]


# The built-in set: the bundled public-domain photos as subjects, prompts in the paper's four categories (about
# ten each, written for this set) for each single subject, and pairs for two: one of a woman and a man, and one
# of two women, the hard case where identities blend. {w} is the subject word.
ACCESSORY = ["a {w} img wearing a red hat", "a {w} img wearing sunglasses", "a {w} img wearing a wool scarf",
             "a {w} img with a backpack", "a {w} img wearing a pearl necklace", "a {w} img holding an umbrella",
             "a {w} img wearing a golden crown", "a {w} img wearing headphones", "a {w} img holding a cup of coffee",
             "a {w} img wearing a santa hat"]
STYLE = ["a painting of a {w} img in the style of Van Gogh", "a watercolor portrait of a {w} img",
         "a pencil sketch of a {w} img", "a cartoon drawing of a {w} img", "a pop art portrait of a {w} img",
         "an oil painting of a {w} img", "a black and white photo of a {w} img", "a mosaic of a {w} img",
         "a {w} img drawn as a comic book hero", "a cubist painting of a {w} img"]
ACTION = ["a {w} img reading a book", "a {w} img riding a bicycle", "a {w} img playing the guitar",
          "a {w} img cooking in a kitchen", "a {w} img swimming in a pool", "a {w} img running a marathon",
          "a {w} img taking a photo", "a {w} img drinking tea", "a {w} img dancing", "a {w} img typing on a laptop"]
CONTEXT = ["a {w} img on the beach", "a {w} img in a snowy forest", "a {w} img in front of the Eiffel Tower",
           "a {w} img in a busy street at night", "a {w} img on the moon", "a {w} img in a library",
           "a {w} img in a garden full of flowers", "a {w} img on a mountain top", "a {w} img in a cafe",
           "a {w} img underwater"]
PAIRS = ["{a} img and {b} img sitting in a park", "{a} img and {b} img shaking hands",
         "{a} img and {b} img having dinner in a restaurant", "{a} img and {b} img walking on the beach",
         "a painting of {a} img and {b} img in the style of Van Gogh", "{a} img and {b} img playing chess",
         "{a} img and {b} img on a bench in the snow", "{a} img and {b} img hiking in the mountains",
         "{a} img and {b} img at a wedding", "{a} img and {b} img taking a selfie"]
BUILTIN_SUBJECTS = {"astronaut": ("astronaut.png", "woman"), "grace_hopper": ("grace_hopper.jpg", "woman"),
                    "cameraman": ("camera.png", "man")}
CATEGORIES = {"accessory": ACCESSORY, "style": STYLE, "action": ACTION, "context": CONTEXT}


def builtin_cases(assets: str | os.PathLike | None = None, max_prompts: int | None = None) -> list[Case]:
    """The built-in cases: each bundled subject alone (40 prompts), a woman and a man, and two women (10 each)."""
    from ..inputs.images import load_image

    folder = Path(assets) if assets else Path(__file__).resolve().parents[2] / "assets"
    if not folder.is_dir():
        raise EvaluationError(f"the bundled photos are not in {folder}; run from the repository, or give CASES_DIR")
    photo = {name: [load_image(folder / file, name=name)] for name, (file, _) in BUILTIN_SUBJECTS.items()}
    cases = [Case(name, [p.format(w=word) for prompts in CATEGORIES.values() for p in prompts], [photo[name]])
             for name, (_, word) in BUILTIN_SUBJECTS.items()]
    cases.append(Case("woman_and_man", [p.format(a="a woman", b="a man") for p in PAIRS],
                      [photo["astronaut"], photo["cameraman"]]))
    cases.append(Case("two_women", [p.format(a="a woman", b="a woman") for p in PAIRS],
                      [photo["astronaut"], photo["grace_hopper"]]))
    if max_prompts is not None:
        cases = [Case(c.name, c.prompts[:max_prompts], c.photos) for c in cases]
    return cases
