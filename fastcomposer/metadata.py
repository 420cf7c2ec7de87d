"""Settings stored inside each PNG, so any image can be reproduced (or dropped back into the app).

Two text chunks: `fastcomposer` holds the settings as JSON (what we read back), `parameters` a
one-line human-readable summary in the style other Stable Diffusion tools use.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import PIL.Image
from PIL.PngImagePlugin import PngInfo

logger = logging.getLogger(__name__)

KEY = "fastcomposer"


@dataclass
class GenerationRecord:
    """Everything that determines an image."""

    prompt: str
    negative_prompt: str
    seed: int  # the seed actually used (a CPU torch.Generator seeded with it)
    alpha: float
    guidance_scale: float
    num_inference_steps: int
    scheduler: str
    height: int
    width: int
    num_images: int  # images drawn from the seed together; the noise of image i depends on this
    image_index: int = 0
    face_crop: bool = True
    model: str = ""  # which weights made it
    version: str = ""  # fastcomposer version

    def summary(self) -> str:
        return (
            f"{self.prompt}\nNegative prompt: {self.negative_prompt}\n"
            f"Steps: {self.num_inference_steps}, Sampler: {self.scheduler}, CFG scale: {self.guidance_scale}, "
            f"Alpha: {self.alpha}, Seed: {self.seed}, Size: {self.width}x{self.height}, "
            f"Batch: {self.image_index + 1}/{self.num_images}, Face crop: {self.face_crop}, Model: {self.model}"
        )


def png_info(record: GenerationRecord) -> PngInfo:
    info = PngInfo()
    info.add_text(KEY, json.dumps(asdict(record)))
    info.add_text("parameters", record.summary())
    return info


def with_metadata(image: PIL.Image.Image, record: GenerationRecord) -> PIL.Image.Image:
    """A copy of `image` whose `info` carries the record (kept by Gradio when it saves PNGs)."""
    out = image.copy()
    out.info[KEY] = json.dumps(asdict(record))
    out.info["parameters"] = record.summary()
    return out


def save_png(image: PIL.Image.Image, path: str | Path, record: GenerationRecord) -> Path:
    """Save `image` as PNG with the record embedded."""
    path = Path(path)
    image.save(path, format="PNG", pnginfo=png_info(record))
    return path


def read_record(source: str | Path | PIL.Image.Image) -> GenerationRecord | None:
    """The record stored in one of our PNGs, or None if it has none (or it is unreadable)."""
    try:
        image = source if isinstance(source, PIL.Image.Image) else PIL.Image.open(source)
        text = getattr(image, "text", None) or {}
        raw = text.get(KEY) or image.info.get(KEY)
        if not raw:
            return None
        data: dict[str, Any] = json.loads(raw)
        known = {f.name for f in fields(GenerationRecord)}
        return GenerationRecord(**{k: v for k, v in data.items() if k in known})
    except (OSError, ValueError, TypeError) as e:
        logger.info("no readable settings in the image (%s)", type(e).__name__)
        return None
