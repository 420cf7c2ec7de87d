"""Safe image loading: every uploaded photo passes through `load_image` before anything else sees it.

A public demo receives decompression bombs, truncated files, text renamed `.png`, 16-bit scans,
transparent PNGs and rotated phone photos. Pillow handles each, but not by default in the way we need:
its bomb guard only starts at 89 megapixels, RGBA->RGB drops alpha onto whatever colour hides under it,
16-bit->RGB clips, and EXIF rotation is not applied. Here each case becomes either a clean 8-bit RGB
image or an `ImageError` whose message names the photo, the problem and the fix (never a path).
"""

from __future__ import annotations

import io
import logging
import os
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .config import SETTINGS, Limits

logger = logging.getLogger(__name__)

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageError(ValueError):
    """A photo that cannot be used; the message is safe to show to users."""


def _unsupported(name: str, limits: Limits) -> ImageError:
    formats = ", ".join(f for f in limits.allowed_formats if f != "GIF")
    return ImageError(
        f"{name} is not a supported image ({formats} or GIF); export it as PNG or JPEG and upload it again"
    )


def _check_size(image: Image.Image, name: str, limits: Limits) -> None:
    """Refuse by the header's size, before any pixel is decoded."""
    w, h = image.size
    if w * h > limits.max_upload_pixels:
        raise ImageError(
            f"{name} is {w}x{h} pixels; the limit is {limits.max_upload_pixels / 1e6:.1f} megapixels. "
            "Resize it (a 1024 px portrait is plenty) and upload it again"
        )
    if min(w, h) < limits.min_upload_side:
        raise ImageError(
            f"{name} is only {w}x{h} pixels; use a photo at least {limits.min_upload_side} px on each side"
        )
    if max(w, h) / min(w, h) > limits.max_upload_aspect:
        raise ImageError(
            f"{name} is {w}x{h} pixels, more than {limits.max_upload_aspect:g} times longer than wide; "
            "crop it around the person and upload it again"
        )


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, compositing transparency and scaling high bit depths."""
    if image.mode in SIXTEEN_BIT_MODES:
        # 16-bit values span 0..65535: scale to 8 bits instead of letting convert() clip at 255.
        array = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "La", "PA", "RGBa") or (image.mode == "L" and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode == "RGB" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        canvas = Image.new("RGB", image.size, background)
        canvas.paste(image, mask=image.getchannel("A"))  # alpha-composite onto a fixed colour
        return canvas
    return image.convert("RGB")


def load_image(
    source: str | os.PathLike | bytes | Image.Image,
    *,
    name: str = "the image",
    limits: Limits = SETTINGS.limits,
) -> Image.Image:
    """Decode one photo safely into a detached 8-bit RGB image.

    Args:
        source: a path, the file's bytes, or an already opened PIL image.
        name: how messages refer to the photo, e.g. "photo 2" (never a path: messages reach users).
        limits: pixel cap, minimum side, maximum aspect ratio, allowed formats, transparency background.

    Returns:
        `PIL.Image.Image` in mode RGB, EXIF orientation applied, first frame only.

    Raises:
        `ImageError` with a plain-words message.
    """
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # a truncated file must fail, not decode half-grey

    if isinstance(source, Image.Image):
        image = source
        _check_size(image, name, limits)
    else:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(fp, formats=list(limits.allowed_formats))
                _check_size(image, name, limits)  # header only: nothing decoded yet
                if getattr(image, "n_frames", 1) > 1:
                    image.seek(0)  # animations: the first frame is the photo
                image.load()
        except ImageError:
            raise
        except FileNotFoundError:
            raise ImageError(f"{name} could not be found; upload it again") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(
                f"{name} declares an enormous size (a 'decompression bomb'); the limit is "
                f"{limits.max_upload_pixels / 1e6:.1f} megapixels"
            ) from None
        except UnidentifiedImageError:
            raise _unsupported(name, limits) from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            if "truncated" in str(e) or isinstance(e, EOFError):
                raise ImageError(f"{name} is damaged or truncated (only part of the file arrived); "
                                 "upload it again or export a new copy") from None
            raise ImageError(f"{name} could not be decoded (damaged or not a supported image); "
                             "export it as PNG or JPEG and upload it again") from None

    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        image = ImageOps.exif_transpose(image) or image  # phone photos store rotation in EXIF
        rgb = _to_rgb(image, limits.upload_background)
    except (OSError, ValueError, SyntaxError) as e:
        logger.info("could not convert an upload (%s)", type(e).__name__)
        raise ImageError(f"{name} could not be decoded; export it as PNG or JPEG and upload it again") from None
    _check_size(rgb, name, limits)  # EXIF rotation swaps sides; the aspect check still holds
    return rgb.copy()  # detached from the file: the upload can be deleted
