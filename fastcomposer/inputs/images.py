"""Safe image loading: every uploaded photo passes through `load_image` before anything else sees it.

A public demo receives decompression bombs, truncated files, text renamed `.png`, 16-bit scans,
transparent PNGs and rotated phone photos. Pillow handles each, but not by default in the way we need:
its bomb guard only starts at 89 megapixels, RGBA->RGB drops alpha onto whatever colour hides under it,
16-bit->RGB clips, and EXIF rotation is not applied. Here each case becomes either a clean 8-bit RGB
image or an `ImageError` that names the photo, the problem and the fix, worded for the page, the command
line or Python code (`message_for`, see messages.py); only the command line's wording names the file.

Example: `load_image("face.jpg", name="photo 1")` gives 8-bit RGB, upright, first frame only, no metadata.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..config import SETTINGS, Limits
from ..messages import PhotoRef, UserFacingError, Wording

logger = logging.getLogger(__name__)

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# Pillow's plugins parse untrusted bytes; malformed headers have surfaced as all of these over the years.
# Each means "this file is unusable", never a bug of ours, so each becomes a message instead of a traceback.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError)


class ImageError(UserFacingError, ValueError):
    """A photo that cannot be used. `str(e)` and the page wording never hold a path (uploads are server files);
    `e.message_for("cli")` names the file, and `e.path` holds it when the photo was read from one."""


# Each problem as the three audiences read it. `{photo}` is "photo 2" on the page and in Python, and
# "--image PATH" on the command line when the photo came from a file.
NOT_FOUND = Wording(
    page="{photo} could not be found; upload it again",
    cli="{photo} could not be found; check the path",
    api="{photo} could not be found; check the path",
)
IS_A_FOLDER = Wording(
    page="{photo} is a folder, not an image; upload the photo file itself",
    cli="{photo} is a folder, not an image file; check the path and give the photo file itself",
    api="{photo} is a folder, not an image file; pass the path of the image file itself",
)
NOT_READABLE = Wording(
    page="{photo} could not be read; upload it again",
    cli="{photo} cannot be read (permission denied); check the file's permissions, e.g. `chmod u+r`",
    api="{photo} cannot be read (permission denied); check the file's permissions",
)
UNSUPPORTED = Wording(
    page="{photo} is not a supported image ({formats}); export it as PNG or JPEG and upload it again",
    cli="{photo} is not a supported image ({formats}); export it as PNG or JPEG and give that file",
    api="{photo} is not a supported image ({formats}); export it as PNG or JPEG",
)
DAMAGED = Wording(
    page="{photo} is damaged or not a supported image ({formats}); export it as PNG or JPEG and upload it again",
    cli="{photo} is damaged or not a supported image ({formats}); check the file, or export it as PNG or JPEG",
    api="{photo} is damaged or not a supported image ({formats}); export it as PNG or JPEG",
)
TRUNCATED = Wording(
    page="{photo} is damaged or truncated (only part of the file arrived); upload it again or export a new copy",
    cli="{photo} is damaged or truncated (the file is incomplete); check the file, or export a new copy",
    api="{photo} is damaged or truncated (the data is incomplete); export a new copy",
)
BOMB = Wording(
    page="{photo} declares an enormous size (a 'decompression bomb'); the limit is {megapixels}. "
    "Resize it (a 1024 px portrait is plenty) and upload it again",
    cli="{photo} declares an enormous size (a 'decompression bomb'); the limit is {megapixels}. "
    "Resize it (a 1024 px portrait is plenty) and give the smaller file",
    api="{photo} declares an enormous size (a 'decompression bomb'); the limit is {megapixels}. "
    "Resize it (a 1024 px portrait is plenty)",
)
TOO_MANY_PIXELS = Wording(
    page="{photo} is {w}x{h} pixels; the limit is {megapixels}. Resize it (a 1024 px portrait is plenty) and "
    "upload it again",
    cli="{photo} is {w}x{h} pixels; the limit is {megapixels}. Resize it (a 1024 px portrait is plenty) and "
    "give the smaller file",
    api="{photo} is {w}x{h} pixels; the limit is {megapixels}. Resize it (a 1024 px portrait is plenty)",
)
TOO_SMALL = Wording.same("{photo} is only {w}x{h} pixels; use a photo at least {min_side} px on each side")
TOO_ELONGATED = Wording(
    page="{photo} is {w}x{h} pixels, more than {aspect} times longer than wide; crop it around the person and "
    "upload it again",
    cli="{photo} is {w}x{h} pixels, more than {aspect} times longer than wide; crop it around the person and "
    "give the cropped file",
    api="{photo} is {w}x{h} pixels, more than {aspect} times longer than wide; crop it around the person",
)
COLOUR_FORMAT = Wording(
    page="{photo} uses a colour format that cannot be read; export it as PNG or JPEG and upload it again",
    cli="{photo} uses a colour format that cannot be read; export it as PNG or JPEG and give that file",
    api="{photo} is in mode {mode}, which cannot be converted to RGB; convert it first, or export it as PNG or "
    "JPEG",
)


def _formats_phrase(limits: Limits) -> str:
    *rest, last = limits.allowed_formats
    return f"{', '.join(rest)} or {last}" if rest else last


def _explain(error: Exception, photo: PhotoRef, limits: Limits) -> ImageError | None:
    """The user-facing error for an exception raised while opening or decoding; None if it is not one."""
    megapixels = f"{limits.max_upload_pixels / 1e6:.1f} megapixels"
    formats = _formats_phrase(limits)
    if isinstance(error, ImageError):
        return error
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageError(BOMB, photo, megapixels=megapixels)
    if isinstance(error, (FileNotFoundError, NotADirectoryError)):  # "a.png/b.png": a folder in the path is a file
        return ImageError(NOT_FOUND, photo)
    if isinstance(error, IsADirectoryError):
        return ImageError(IS_A_FOLDER, photo)
    if isinstance(error, PermissionError):
        return ImageError(NOT_READABLE, photo)
    if isinstance(error, UnidentifiedImageError):  # before OSError: it is a subclass
        return ImageError(UNSUPPORTED, photo, formats=formats)
    if isinstance(error, EOFError) or (isinstance(error, OSError) and "truncated" in str(error)):
        return ImageError(TRUNCATED, photo)
    if isinstance(error, _DECODE_ERRORS):
        return ImageError(DAMAGED, photo, formats=formats)
    return None


def _check_size(size: tuple[int, int], photo: PhotoRef, limits: Limits) -> None:
    """Refuse by the declared size, so a bomb is turned away before any pixel is decoded."""
    w, h = size
    if w * h > limits.max_upload_pixels:
        megapixels = f"{limits.max_upload_pixels / 1e6:.1f} megapixels"
        raise ImageError(TOO_MANY_PIXELS, photo, w=w, h=h, megapixels=megapixels)
    if min(w, h) < limits.min_upload_side:
        raise ImageError(TOO_SMALL, photo, w=w, h=h, min_side=limits.min_upload_side)
    if max(w, h) / min(w, h) > limits.max_upload_aspect:
        raise ImageError(TOO_ELONGATED, photo, w=w, h=h, aspect=f"{limits.max_upload_aspect:g}")


def _decode_first_frame(image: Image.Image) -> None:
    """Decode frame 0 in place. `tell()` rather than `n_frames`: counting a GIF's frames walks the whole file."""
    if image.tell() != 0:
        image.seek(0)
    image.load()


def _open(source: str | os.PathLike | bytes, photo: PhotoRef, limits: Limits) -> Image.Image:
    """Open with only the allowed decoders, check the header's size, then decode frame 0."""
    fp = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else source
    image = None
    try:
        # Pillow warns (not raises) between 89 and 179 MP; escalate locally, never via MAX_IMAGE_PIXELS.
        # (catch_warnings is process-wide, not per thread; `_check_size` below refuses such sizes anyway.)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(fp, formats=list(limits.allowed_formats))
            _check_size(image.size, photo, limits)  # header only: nothing decoded yet
            _decode_first_frame(image)
        return image
    except Exception as e:
        if image is not None:
            image.close()
        error = _explain(e, photo, limits)
        if error is None:
            raise  # not a property of the file (e.g. a wrong argument type): a bug to see in full
        logger.debug("refused an upload: %s", type(e).__name__)
        raise error from None  # no chained traceback: Pillow's messages can carry the path


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode -> a new 8-bit RGB image, compositing transparency and scaling high bit depths."""
    transparency = image.info.get("transparency")
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        # 16-bit values span 0..65535: scale to 8 bits instead of letting convert() clip everything above 255.
        scaled = values if image.mode == "F" else values / 257.0
        grey = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
        if isinstance(transparency, int) and image.mode != "F":  # 16-bit tRNS: one grey value is see-through
            grey.putalpha(Image.fromarray(np.where(values == transparency, 0, 255).astype(np.uint8)))
        image = grey
    elif transparency is not None and image.mode in ("1", "L", "P", "RGB"):
        image = image.convert("RGBA")  # convert() honours the tRNS colour / palette alpha on the way
    if image.mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        # Stored colours under transparent pixels are arbitrary (often black): composite on a fixed colour.
        canvas = Image.new("RGB", image.size, background)
        canvas.paste(image, mask=image.getchannel("A"))
        return canvas
    return image.convert("RGB")  # always a new image, even from RGB


def load_image(
    source: str | os.PathLike | bytes | Image.Image,
    *,
    name: str | PhotoRef = "the image",
    limits: Limits = SETTINGS.limits,
) -> Image.Image:
    """
    Decode one photo safely into a detached 8-bit RGB image.

    Args:
        source (`str`, `os.PathLike`, `bytes` or `PIL.Image.Image`):
            A path, the file's bytes, or an already opened PIL image (checked the same way, not re-decoded).
        name (`str` or `PhotoRef`, *optional*, defaults to `"the image"`):
            How messages refer to the photo, e.g. `"photo 2"`. Never a path: messages reach web users. The path
            of a `source` read from a file is recorded on its own, for the command line's wording.
        limits (`Limits`, *optional*, defaults to `SETTINGS.limits`):
            Pixel cap, minimum side, maximum aspect ratio, allowed formats and the transparency background.

    Returns:
        `PIL.Image.Image`: mode RGB, EXIF orientation applied, first frame only, no metadata, no open file.

    Raises:
        `ImageError`: for any unusable photo, with a plain-words message that names the problem and the fix
        (`message_for("page" | "cli" | "api")`; `str()` is the "api" one).
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # A global flag someone else flipped: half a photo would decode as grey and reach the model unnoticed.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES must stay False; truncated uploads would pass")

    path = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
    photo = PhotoRef.of(name, path=path if isinstance(path, str) else None)
    opened = not isinstance(source, Image.Image)
    if opened:
        image = _open(source, photo, limits)
    else:
        image = source
        _check_size(image.size, photo, limits)
        try:  # a lazily opened image may still hold undecoded (and damaged) data
            _decode_first_frame(image)
        except _DECODE_ERRORS as e:
            raise _explain(e, photo, limits) from None

    mode = image.mode
    try:
        try:
            upright = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
        except _DECODE_ERRORS as e:  # a broken EXIF block should not cost the user a good photo
            logger.debug("ignored unreadable EXIF: %s", type(e).__name__)
            upright = image
        rgb = _to_rgb(upright, limits.upload_background)
    except _DECODE_ERRORS as e:  # e.g. a PIL input in LAB or HSV, which convert() cannot turn into RGB
        logger.debug("could not convert mode %s: %s", mode, type(e).__name__)
        raise ImageError(COLOUR_FORMAT, photo, mode=mode) from None
    finally:
        if opened:
            image.close()  # the upload's file handle, so it can be deleted
    rgb.info.clear()  # EXIF can hold GPS position and owner names; nothing downstream needs metadata
    logger.debug("loaded %s: %dx%d from mode %s", photo.name, *rgb.size, mode)
    return rgb
