"""Settings stored inside each PNG, so any image can be reproduced (or dropped back into the app).

Two text chunks: `fastcomposer` holds the settings as JSON (what we read back), `parameters` a
one-line human-readable summary in the style other Stable Diffusion tools use.
"""

from __future__ import annotations

import json
import logging
import struct
import zlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import PIL.Image
from PIL.PngImagePlugin import PngInfo

from ..pipeline.boxes import format_boxes

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
    crop_margin: float | None = None  # face crop side over face width, when crops were used (older PNGs: None)
    model: str = ""  # which weights made it
    version: str = ""  # fastcomposer version
    cache_interval: int = 1  # DeepCache interval (1 = off)
    preset: str | None = None  # the speed preset the settings came from, if any
    photos_per_subject: list[int] | None = None  # counts only: no image data is ever stored
    identity: dict | None = None  # the identity check's report (`identity.IdentityReport.to_dict()`), if run
    loras: list[str] = field(default_factory=list)  # LoRAs applied, as `NAME:SCALE` (older PNGs: none)
    boxes: list | None = None  # layout: per subject [x0, y0, x1, y1] as fractions, or None (free); None: no boxes
    separate: bool = False  # layout: automatic separation of the subjects
    detail_faces: bool = False  # the face pass ran (face_detail.py)
    detail_strength: float | None = None  # its strength, when it ran
    identity_before: dict | None = None  # the identity check's report before the face pass, when both ran

    def summary(self) -> str:
        return (
            f"{self.prompt}\nNegative prompt: {self.negative_prompt}\n"
            f"Steps: {self.num_inference_steps}, Sampler: {self.scheduler}, CFG scale: {self.guidance_scale}, "
            f"Alpha: {self.alpha}, Seed: {self.seed}, Size: {self.width}x{self.height}, "
            f"Batch: {self.image_index + 1}/{self.num_images}, Face crop: {self.face_crop}, Model: {self.model}"
            + (f", Crop margin: {self.crop_margin:g}" if self.crop_margin is not None else "")
            + (f", Cache interval: {self.cache_interval}" if self.cache_interval != 1 else "")
            + (f", Photos per subject: {self.photos_per_subject}" if self.photos_per_subject else "")
            + (f", LoRAs: {' '.join(self.loras)}" if self.loras else "")
            + (f", Boxes: {format_boxes(self.boxes)}" if self.boxes else "")
            + (", Keep apart: on" if self.separate else "")
            + (f", Refine faces: {self.detail_strength:g}" if self.detail_faces and self.detail_strength else "")
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


def png_text_chunks(data: bytes, max_chunks: int = 1000) -> dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) of a PNG file's bytes, read without decoding any pixel.

    Uploaded files are untrusted: this never hands them to an image decoder, so a decompression bomb or a
    malformed image costs nothing, and a corrupt chunk ends the scan instead of raising.
    """
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return {}
    texts: dict[str, str] = {}
    pos = 8
    for _ in range(max_chunks):
        if pos + 8 > len(data):
            break
        length = struct.unpack(">I", data[pos : pos + 4])[0]
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        try:
            if kind == b"tEXt":
                key, _, value = body.partition(b"\0")
                texts[key.decode("latin-1")] = value.decode("latin-1")
            elif kind == b"zTXt":
                key, _, rest = body.partition(b"\0")
                texts[key.decode("latin-1")] = _inflate(rest[1:]).decode("latin-1")
            elif kind == b"iTXt":
                key, _, rest = body.partition(b"\0")
                compressed, rest = rest[0], rest[2:]
                _language, _, rest = rest.partition(b"\0")
                _translated, _, value = rest.partition(b"\0")
                texts[key.decode("latin-1")] = (_inflate(value) if compressed else value).decode("utf-8")
            elif kind == b"IEND":
                break
        except (ValueError, IndexError, zlib.error):
            continue  # one bad chunk: keep scanning the others
    return texts


def _inflate(data: bytes, limit: int = 1 << 20) -> bytes:
    """zlib-decompress at most `limit` bytes: a text chunk is never a bomb either."""
    return zlib.decompressobj().decompress(data, limit)


def read_record(source: str | Path | bytes | PIL.Image.Image) -> GenerationRecord | None:
    """The record stored in one of our PNGs, or None if there is none (or the file is not readable).

    Files are read as bytes and parsed by `png_text_chunks`; images already in memory use their `info`.
    """
    try:
        if isinstance(source, PIL.Image.Image):
            raw = source.info.get(KEY)
        else:
            data = source if isinstance(source, bytes) else Path(source).read_bytes()
            raw = png_text_chunks(data).get(KEY)
        if not raw:
            return None
        data_dict: dict[str, Any] = json.loads(raw)
        known = {f.name for f in fields(GenerationRecord)}
        return GenerationRecord(**{k: v for k, v in data_dict.items() if k in known})
    except (OSError, ValueError, TypeError) as e:
        logger.info("no readable settings in the file (%s)", type(e).__name__)
        return None
