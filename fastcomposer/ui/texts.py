"""What the page says, and the bundled example photos it offers."""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

MAX_SLOTS = 4  # photo slots on the page (and photo_1..photo_4 in the API); Limits.max_subjects caps their use
ASSETS_ENV = "FASTCOMPOSER_ASSETS"  # a folder holding the example photos, for installs without the repository

HOW_TO = """\
# FastComposer Studio
1. Add photos of each person, one slot per person (1-4 photos each: more photos, steadier likeness). Subject 1
   goes with the first `img`, subject 2 with the second, and so on.
2. Write a prompt with `img` right after each subject word: *a woman img and a man img hiking in the Alps*.
3. Press **Generate**. No fine-tuning: one pass per image ([FastComposer](https://arxiv.org/abs/2305.10431)).
"""
CONSENT = ("Only use photos of people who agreed to it. Do not create images that deceive, harass or sexualise "
           "anyone. Uploaded photos are kept only for this session and deleted from the server within an hour.")
EXAMPLES = [
    ["a woman img in a sunflower field, golden hour, photo", "astronaut.png", None],
    ["a woman img and a woman img having tea in a garden", "astronaut.png", "grace_hopper.jpg"],
    ["a painting of a man img in the style of Van Gogh", "camera.png", None],
]

# The repository checkout this package sits in (fastcomposer/ui/texts.py -> the repository root).
REPO_ROOT = Path(__file__).resolve().parents[2]


def _has_examples(folder: Path) -> bool:
    return folder.is_dir() and all((folder / name).is_file() for _, a, b in EXAMPLES for name in (a, b) if name)


def find_assets() -> Path | None:
    """The folder of bundled example photos: $FASTCOMPOSER_ASSETS, else the repository's `assets/`, else
    `./assets`; None when none of them holds the photos (an installed package: the page then shows no examples).
    """
    chosen = os.environ.get(ASSETS_ENV)
    candidates = [Path(chosen).expanduser()] if chosen else [REPO_ROOT / "assets", Path.cwd() / "assets"]
    for folder in candidates:
        if _has_examples(folder):
            return folder.resolve()
    logger.info("no example photos found (%s); the page shows no examples", ", ".join(map(str, candidates)))
    return None

# Gradio draws a run's progress as an opaque overlay on its output. On the gallery that would hide the live
# previews and the earlier images under it, so the overlay is made see-through, with the bar at the top on a
# strip of its own, and the animated ETA fill (which covers the whole area) is left out.
# Captions may wrap: an identity line ("woman 0.62 · man not found") cut to its first word would say nothing.
PAGE_CSS = """
#gallery > .wrap.full:not(.hide):not(.generating) { background: transparent; justify-content: flex-start; }
#gallery > .wrap .eta-bar { display: none; }
#gallery > .wrap .progress-level { background: var(--block-background-fill); opacity: 0.92;
                                   border-radius: var(--radius-sm); padding: var(--size-1) 0; }
#gallery .caption-label { white-space: normal; overflow: visible; text-overflow: clip; }
.subject-slot { border-left: 4px solid transparent; padding-left: var(--size-2); }
@media (max-width: 640px) {  /* a phone: the whole Examples table in view, the prompt readable */
  #examples td:first-child { min-width: 7.5rem; }
  #examples td .container, #examples td .container img { width: 3.5rem; height: 3.5rem; }
}
"""


def page_css(colours) -> str:
    """PAGE_CSS, plus each slot's left edge in its subject's colour (the colour of its crop square and of its
    attention map), so the order of the subjects shows at a glance."""
    edges = "\n".join(f"#slot-{k + 1} {{ border-left-color: rgb({r}, {g}, {b}); }}"
                       for k, (r, g, b) in enumerate(colours))
    return PAGE_CSS + edges + "\n"


def page_theme():
    """Gradio's default theme, with every text readable (WCAG AA: 4.5:1 for text of this size), as the browser
    test's accessibility scan checks. The default's subdued text (info lines, slider ends, "- or -") is #bbbbc2 on
    white, 1.9:1; neutral 600 is 7.7:1. White on the default orange Generate is 2.8:1 and on red Stop 3.8:1; the
    700 shades are 5.2:1 and 6.5:1 (dark mode's buttons, one shade lighter, get the same). Dark mode's subdued text
    already passes."""
    import gradio as gr

    return gr.themes.Default().set(
        body_text_color_subdued="*neutral_600",
        button_primary_background_fill="*primary_700", button_primary_background_fill_hover="*primary_800",
        button_primary_background_fill_dark="*primary_700", button_primary_background_fill_hover_dark="*primary_800",
        button_cancel_background_fill="#b91c1c", button_cancel_background_fill_hover="#991b1b",  # red 700 and 800
    )
