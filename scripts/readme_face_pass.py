"""Make the README's face-pass picture on the tiny random model: `assets/readme/face-pass-tiny.jpg`.

The tiny model's own images are noise, with no face to find, so the pass runs here over a stand-in for a generated
image: two bundled photos side by side (the astronaut left, Grace Hopper right), with layout boxes that say whose
face is where. Left: the picture before; right: after, each face redrawn by a one-subject run from its own
subject's photo. The redrawn faces are noise too (random weights); what the picture shows is the mechanism: which
squares are redrawn and that everything outside them is untouched.

Usage:
    python scripts/readme_face_pass.py [--output assets/readme/face-pass-tiny.jpg]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
BOXES = [(0.0, 0.0, 0.6, 1.0), (0.6, 0.0, 1.0, 1.0)]  # the astronaut's side, Grace Hopper's side

logger = logging.getLogger(__name__)


def scene() -> tuple[Image.Image, list[Image.Image]]:
    """The stand-in image (768x512) and the two subjects' photos."""
    astronaut = Image.open(ROOT / "assets" / "astronaut.png").convert("RGB")
    hopper = Image.open(ROOT / "assets" / "grace_hopper.jpg").convert("RGB")
    image = Image.new("RGB", (768, 512), (128, 128, 128))
    image.paste(astronaut, (0, 0))
    image.paste(hopper.resize((256, 300)), (512, 100))
    return image, [astronaut, hopper]


def main() -> None:
    from fastcomposer.generation.face_detail import detail_images
    from fastcomposer.generation.request import GenerationRequest
    from fastcomposer.inputs.faces import FaceCropper
    from fastcomposer.pipeline.loading import load_pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(ROOT / "assets" / "readme" / "face-pass-tiny.jpg"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    pipe = load_pipeline("tiny", device="cpu", dtype="fp32", safety_checker=False)
    pipe.use_scheduler("dpm")
    before, photos = scene()
    request = GenerationRequest(prompt="a woman img and a woman img in a park", images=[], boxes=BOXES,
                                num_inference_steps=20, scheduler="dpm", detail_faces=True, width=768, height=512)
    result = detail_images(pipe, request, [before], [False], [[p] for p in photos], seed=5,
                           cropper=FaceCropper(allow_download=False, detector="mtcnn"))
    after = result.images[0]
    changed = np.any(np.asarray(before) != np.asarray(after), axis=2)
    logger.info("%s; %.1f%% of the pixels changed", result.notes[0], 100 * changed.mean())

    sheet = Image.new("RGB", (before.width * 2 + 16, before.height + 28), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (image, label) in enumerate(((before, "before"), (after, f"after: {result.notes[0]} (tiny model)"))):
        sheet.paste(image, (k * (before.width + 16), 28))
        draw.text((k * (before.width + 16) + 4, 8), label, fill="black")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.output, quality=85, optimize=True)  # a photo: JPEG keeps the README light
    logger.info("wrote %s", args.output)


if __name__ == "__main__":
    main()
