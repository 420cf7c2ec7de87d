"""The safe image loader (R1-R9): every bad upload becomes a plain message, every good one 8-bit RGB.

All files are made with PIL in `tmp_path`; nothing is downloaded. Bomb tests time themselves with generous
bounds: they guard against decoding (seconds and hundreds of MB), not against a slow machine.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from fastcomposer.config import SETTINGS
from fastcomposer.inputs.images import ImageError, load_image

LIMITS = SETTINGS.limits


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def pixel(image: Image.Image, xy: tuple[int, int] = (0, 0)) -> list[int]:
    return list(image.getpixel(xy))


def noise_jpeg(path: Path, size: int = 200) -> Path:
    rng = np.random.RandomState(0)  # noise: no run of identical bytes, so half the file is half the image
    return save(Image.fromarray((rng.rand(size, size, 3) * 255).astype(np.uint8)), path, format="JPEG")


# -- good files -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_supported_formats_load_as_detached_rgb(tmp_path, fmt):
    path = save(Image.new("RGB", (120, 80), (200, 30, 40)), tmp_path / f"a.{fmt.lower()}", format=fmt)
    for source in (path, str(path), path.read_bytes()):
        image = load_image(source, name="photo 1")
        assert image.mode == "RGB" and image.size == (120, 80)
        assert type(image) is Image.Image and image.info == {}  # no file behind it, no metadata
        assert np.abs(np.subtract(pixel(image, (60, 40)), [200, 30, 40])).max() <= 8  # lossy formats round


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="lists open files through /proc")
def test_the_file_is_closed_after_loading(tmp_path):
    # Pillow closes single-frame files itself after load(); animations stay open for seek() unless closed.
    frames = [Image.new("RGB", (100, 100), c) for c in ("red", "blue")]
    animation = tmp_path / "a.gif"
    frames[0].save(animation, save_all=True, append_images=frames[1:])
    still = save(frames[0], tmp_path / "a.png")
    for path in (animation, still):
        load_image(path)
        assert str(path) not in {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}


def test_pil_input_is_checked_but_not_modified(tmp_path):
    source = Image.new("L", (90, 90), 7)
    image = load_image(source)
    assert image is not source and image.mode == "RGB" and pixel(image) == [7, 7, 7]
    assert source.mode == "L"
    with pytest.raises(ImageError, match="5000x5000 pixels; the limit is 16.8 megapixels"):
        load_image(Image.new("1", (5000, 5000)), name="photo 1")
    with pytest.raises(ImageError, match="only 10x10 pixels"):
        load_image(Image.new("RGB", (10, 10)))


def test_pil_input_from_an_animated_file_gives_frame_zero(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (100, 100), c) for c in ("red", "blue", "green")]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(path) as opened:
        opened.seek(2)  # the caller left it on the last frame
        assert pixel(load_image(opened)) == [255, 0, 0]


# -- R1, R2: bombs and the pixel cap, refused from the header -------------------------------------------


def test_r1_decompression_bomb_is_refused_fast(tmp_path):
    bomb = save(Image.new("1", (20000, 20000)), tmp_path / "bomb.png")
    assert bomb.stat().st_size < 2_000_000  # 400 MP in a small file: file-size caps cannot catch it
    for source in (bomb, bomb.read_bytes()):
        start = time.perf_counter()
        with pytest.raises(ImageError, match="the limit is 16.8 megapixels") as err:
            load_image(source, name="photo 1")
        assert time.perf_counter() - start < 1.0
        assert "photo 1" in str(err.value) and str(tmp_path) not in str(err.value)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's own guard is left as it was


def test_r1_pillow_warning_zone_is_an_error_without_changing_global_filters(tmp_path):
    # 100 MP: above Pillow's warning threshold, below its error threshold.
    big = save(Image.new("1", (10000, 10000)), tmp_path / "big.png")
    filters = list(warnings.filters)
    with pytest.raises(ImageError, match="megapixels"):
        load_image(big, limits=dataclasses.replace(LIMITS, max_upload_pixels=200_000_000))
    assert warnings.filters == filters


def test_r2_pixel_cap_is_checked_from_the_header(tmp_path):
    big = save(Image.new("L", (8000, 8000)), tmp_path / "big.png")
    start = time.perf_counter()
    with pytest.raises(ImageError, match="photo 1 is 8000x8000 pixels; the limit is 16.8 megapixels. Resize"):
        load_image(big, name="photo 1")
    assert time.perf_counter() - start < 0.5


# -- R4: only the listed decoders run ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\x01garbage bytes" * 10,
        b"plain text renamed to png",
        b"<svg xmlns='http://www.w3.org/2000/svg' width='100' height='100'><rect/></svg>",
        b"",
    ],
    ids=["garbage", "text", "svg", "empty"],
)
def test_r4_non_images_are_not_supported(tmp_path, content):
    path = tmp_path / "photo.png"
    path.write_bytes(content)
    expected = "photo 2 is not a supported image (PNG, JPEG, WEBP, BMP or GIF); export it as PNG or JPEG"
    for source in (path, content):
        with pytest.raises(ImageError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            load_image(source, name="photo 2")


def test_r4_tiff_is_refused_even_though_pillow_reads_it(tmp_path):
    path = save(Image.new("RGB", (100, 100)), tmp_path / "scan.png", format="TIFF")  # misleading name too
    with Image.open(path) as tiff:
        assert tiff.format == "TIFF"
    with pytest.raises(ImageError, match="not a supported image"):
        load_image(path)


def test_r4_allowed_formats_come_from_limits(tmp_path):
    path = save(Image.new("RGB", (100, 100)), tmp_path / "a.jpg", format="JPEG")
    with pytest.raises(ImageError, match=r"not a supported image \(PNG\)"):
        load_image(path, limits=dataclasses.replace(LIMITS, allowed_formats=("PNG",)))


# -- R5: truncated files fail --------------------------------------------------------------------------------


def test_r5_truncated_jpeg_is_damaged(tmp_path):
    path = noise_jpeg(tmp_path / "t.jpg")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    for source in (path, data[: len(data) // 2]):
        with pytest.raises(ImageError, match="photo 1 is damaged or truncated"):
            load_image(source, name="photo 1")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_r5_truncated_png_and_lazily_opened_pil_input_are_damaged(tmp_path):
    rng = np.random.RandomState(1)
    png = save(Image.fromarray((rng.rand(200, 200, 3) * 255).astype(np.uint8)), tmp_path / "t.png")
    png.write_bytes(png.read_bytes()[:20000])
    with pytest.raises(ImageError, match="damaged or truncated"):
        load_image(png)
    with Image.open(png) as lazy:  # opened by the caller, never decoded: the loader decodes and checks it
        with pytest.raises(ImageError, match="damaged or truncated"):
            load_image(lazy)


def test_r5_a_global_truncation_override_is_refused_loudly(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        load_image(Image.new("RGB", (100, 100)))


# -- R6: EXIF orientation -----------------------------------------------------------------------------------


def test_r6_exif_orientation_is_applied_and_dropped(tmp_path):
    image = Image.new("RGB", (400, 200), "blue")
    image.paste((255, 0, 0), (0, 0, 200, 200))  # left half red
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = save(image, tmp_path / "phone.jpg", format="JPEG", exif=exif)
    upright = load_image(path)
    assert upright.size == (200, 400)
    top, bottom = pixel(upright, (100, 50)), pixel(upright, (100, 350))
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50  # clockwise: left became top
    assert 0x0112 not in upright.getexif()  # not applied twice by a later reader


# -- R7: modes --------------------------------------------------------------------------------------------------


def test_r7_transparency_is_composited_on_the_background(tmp_path):
    clear = save(Image.new("RGBA", (100, 100), (0, 0, 0, 0)), tmp_path / "clear.png")
    assert np.array(load_image(clear)).reshape(-1, 3).tolist() == [[255, 255, 255]] * 10000  # not black
    blue = dataclasses.replace(LIMITS, upload_background=(0, 0, 255))
    assert pixel(load_image(clear, limits=blue)) == [0, 0, 255]
    half = save(Image.new("RGBA", (100, 100), (255, 0, 0, 128)), tmp_path / "half.png")
    assert np.abs(np.subtract(pixel(load_image(half)), [255, 127, 127])).max() <= 2
    la = save(Image.new("LA", (100, 100), (0, 0)), tmp_path / "la.png")
    assert pixel(load_image(la)) == [255, 255, 255]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_r7_palette_transparency_is_composited(tmp_path, fmt):
    palette = Image.new("P", (100, 100), 0)
    palette.putpalette([0, 0, 0] + [10, 200, 30] * 255)
    palette.paste(1, (50, 0, 100, 100))  # right half opaque green
    path = save(palette, tmp_path / f"p.{fmt.lower()}", format=fmt, transparency=0)
    image = load_image(path)
    assert pixel(image, (10, 10)) == [255, 255, 255] and pixel(image, (80, 10)) == [10, 200, 30]


@pytest.mark.parametrize(
    ("mode", "colour", "fmt", "expected"),
    [
        ("CMYK", (0, 255, 255, 0), "JPEG", [255, 0, 0]),
        ("L", 77, "PNG", [77, 77, 77]),
        ("1", 1, "PNG", [255, 255, 255]),
        ("P", 0, "PNG", [0, 0, 0]),
        ("RGB", (1, 2, 3), "BMP", [1, 2, 3]),
    ],
)
def test_r7_other_modes_convert(tmp_path, mode, colour, fmt, expected):
    path = save(Image.new(mode, (100, 100), colour), tmp_path / f"m.{fmt.lower()}", format=fmt)
    image = load_image(path)
    assert image.mode == "RGB" and np.abs(np.subtract(pixel(image, (50, 50)), expected)).max() <= 3


@pytest.mark.parametrize(("value", "expected"), [(32768, 128), (65535, 255), (1000, 4), (0, 0)])
def test_r7_sixteen_bit_is_scaled_not_clipped(tmp_path, value, expected):
    sixteen = Image.fromarray(np.full((100, 100), value, dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    path = save(sixteen, tmp_path / "deep.png")
    with Image.open(path) as deep:
        assert deep.mode.startswith("I;16")  # really 16 bit on disk
    assert pixel(load_image(path), (50, 50)) == [expected] * 3


def test_r7_wide_integer_and_float_pil_inputs(tmp_path):
    assert pixel(load_image(Image.new("I", (100, 100), 32768))) == [128] * 3
    floats = Image.fromarray(np.array([[-5.0, 100.4, 300.0]] * 100, dtype=np.float32).repeat(40, axis=1))
    assert floats.mode == "F"
    image = load_image(floats)
    assert [pixel(image, (x, 0))[0] for x in (0, 50, 100)] == [0, 100, 255]  # clipped, not wrapped


# -- R8: animation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_r8_animations_give_their_first_frame(tmp_path, fmt):
    frames = [Image.new("RGB", (100, 100), c) for c in ("red", "blue", "green")]
    path = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
    with Image.open(path) as animation:
        assert animation.n_frames == 3
    image = load_image(path)
    assert image.mode == "RGB" and not getattr(image, "is_animated", False)
    assert not hasattr(image, "n_frames")
    assert pixel(image) == [255, 0, 0]


# -- R9: degenerate sizes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ((10, 10), "photo 3 is only 10x10 pixels; use a photo at least 64 px on each side"),
        ((2000, 100), "photo 3 is 2000x100 pixels, more than 8 times longer than wide; crop it"),
        ((100, 2000), "photo 3 is 100x2000 pixels, more than 8 times longer than wide"),
    ],
)
def test_r9_degenerate_sizes(tmp_path, size, message):
    path = save(Image.new("RGB", size), tmp_path / "odd.png")
    with pytest.raises(ImageError, match=message):
        load_image(path, name="photo 3")


@pytest.mark.parametrize("size", [(64, 64), (800, 100)])
def test_r9_sizes_at_the_limits_are_accepted(tmp_path, size):
    assert load_image(save(Image.new("RGB", size), tmp_path / "edge.png")).size == size


# -- messages never leak paths, logs never leak content ------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "page_fix"),
    [
        (lambda d: d / "gone.png", "upload it again"),
        (lambda d: (d / "g.png").write_bytes(b"not an image") and d / "g.png", "export it as PNG or JPEG and upload"),
        (lambda d: save(Image.new("RGB", (1800, 200)), d / "wide.png"), "crop it around the person and upload"),
    ],
    ids=["missing", "not-an-image", "too-elongated"],
)
def test_each_audience_gets_its_own_fix(tmp_path, make, page_fix):
    path = make(tmp_path)
    error = pytest.raises(ImageError, load_image, path, name="photo 2").value
    page, cli, api = (error.message_for(a) for a in ("page", "cli", "api"))
    assert page.startswith("photo 2 ") and page_fix in page and str(tmp_path) not in page
    assert cli.startswith(f"--image {path} ") and "upload" not in cli
    assert api.startswith("photo 2 ") and "upload" not in api and str(tmp_path) not in api
    # The same facts in each: only the photo's label and the fix differ.
    assert page.split(";")[0].removeprefix("photo 2") == cli.split(";")[0].removeprefix(f"--image {path}")


def test_a_photo_given_as_bytes_has_no_path_anywhere():
    error = pytest.raises(ImageError, load_image, b"not an image", name="photo 1").value
    assert error.path is None and error.message_for("cli").startswith("photo 1 is not a supported image")


def test_messages_never_contain_paths_and_logs_stay_quiet(tmp_path, caplog):
    secret = tmp_path / "secret-dir"
    secret.mkdir()
    bad = {
        "missing": secret / "nope.png",
        "garbage": secret / "g.png",
        "truncated": secret / "t.jpg",
        "tiff": secret / "s.tif",
        "tiny": secret / "tiny.png",
        "directory": secret,
    }
    bad["garbage"].write_bytes(b"not an image")
    data = noise_jpeg(bad["truncated"]).read_bytes()
    bad["truncated"].write_bytes(data[: len(data) // 2])
    Image.new("RGB", (100, 100)).save(bad["tiff"], format="TIFF")
    Image.new("RGB", (10, 10)).save(bad["tiny"])
    caplog.set_level(logging.DEBUG, logger="fastcomposer.inputs.images")
    for kind, path in bad.items():
        with pytest.raises(ImageError) as err:
            load_image(path, name="photo 4")
        for message in (str(err.value), err.value.message_for("page"), err.value.message_for("api")):
            assert message.startswith("photo 4 ") and str(tmp_path) not in message, kind
        # Only the command line names the file, the way it was given.
        assert err.value.message_for("cli").startswith(f"--image {path} ") and err.value.path == str(path), kind
        assert err.value.__cause__ is None and err.value.__suppress_context__, kind  # no chained Pillow error
    missing = pytest.raises(ImageError, load_image, bad["missing"], name="photo 4").value
    assert missing.message_for("page") == "photo 4 could not be found; upload it again"
    assert missing.message_for("cli") == f"--image {bad['missing']} could not be found; check the path"
    assert str(missing) == missing.message_for("api") == "photo 4 could not be found; check the path"
    folder = pytest.raises(ImageError, load_image, bad["directory"], name="photo 4").value
    assert "is a folder" in str(folder) and "upload the photo file itself" in folder.message_for("page")
    load_image(save(Image.new("RGB", (100, 100)), secret / "ok.png"), name="photo 4")
    assert all(r.levelno < logging.INFO for r in caplog.records)
    assert not any(str(tmp_path) in r.getMessage() for r in caplog.records)
