"""The safe image loader (R1-R9): every bad upload becomes a plain message, every good one 8-bit RGB."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image, ImageFile

from fastcomposer.images import ImageError, load_image


def save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP"])
def test_supported_formats_load_as_rgb(tmp_path, fmt):
    path = save(Image.new("RGB", (120, 80), (200, 30, 40)), tmp_path / f"a.{fmt.lower()}", format=fmt)
    image = load_image(path, name="photo 1")
    assert image.mode == "RGB" and image.size == (120, 80)
    assert np.abs(np.array(image)[40, 60].astype(int) - [200, 30, 40]).max() <= 8  # lossy formats round


def test_bytes_and_pil_inputs(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (100, 100), "white").save(buffer, format="PNG")
    assert load_image(buffer.getvalue()).size == (100, 100)
    assert load_image(Image.new("L", (90, 90), 7)).mode == "RGB"


def test_r1_decompression_bomb_is_refused_fast(tmp_path):
    bomb = save(Image.new("1", (20000, 20000)), tmp_path / "bomb.png")
    assert bomb.stat().st_size < 2_000_000
    start = time.perf_counter()
    with pytest.raises(ImageError, match="megapixels") as err:
        load_image(bomb, name="photo 1")
    assert time.perf_counter() - start < 1.0
    assert "photo 1" in str(err.value) and str(tmp_path) not in str(err.value)


def test_r2_pixel_cap_is_checked_from_the_header(tmp_path):
    big = save(Image.new("L", (8000, 8000)), tmp_path / "big.png")
    start = time.perf_counter()
    with pytest.raises(ImageError, match="8000x8000 pixels; the limit is 16.8 megapixels"):
        load_image(big)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(
    "content",
    [b"\x00\x01garbage bytes" * 10, b"plain text renamed to png", b"<svg xmlns='http://www.w3.org/2000/svg'></svg>"],
)
def test_r4_non_images_are_not_supported(tmp_path, content):
    path = tmp_path / "photo.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match="not a supported image"):
        load_image(path, name="photo 2")


def test_r4_tiff_is_refused_even_though_pillow_reads_it(tmp_path):
    path = save(Image.new("RGB", (100, 100)), tmp_path / "scan.tif", format="TIFF")
    with pytest.raises(ImageError, match="not a supported image"):
        load_image(path)


def test_r5_truncated_jpeg_is_damaged(tmp_path):
    rng = np.random.RandomState(0)
    path = save(Image.fromarray((rng.rand(200, 200, 3) * 255).astype(np.uint8)), tmp_path / "t.jpg", format="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="damaged or truncated"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_r6_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (400, 200), "white")
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = save(image, tmp_path / "phone.jpg", format="JPEG", exif=exif)
    assert load_image(path).size == (200, 400)


def test_r7_transparency_is_composited_on_the_background(tmp_path):
    clear = save(Image.new("RGBA", (100, 100), (0, 0, 0, 0)), tmp_path / "clear.png")
    assert np.array(load_image(clear)).reshape(-1, 3).tolist()[0] == [255, 255, 255]
    la = save(Image.new("LA", (100, 100), (0, 0)), tmp_path / "la.png")
    assert np.array(load_image(la))[0, 0].tolist() == [255, 255, 255]
    palette = Image.new("P", (100, 100), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    p = save(palette, tmp_path / "p.png", transparency=0)
    assert np.array(load_image(p))[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("mode", ["CMYK", "L", "1", "P"])
def test_r7_other_modes_convert(tmp_path, mode):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    path = save(Image.new(mode, (100, 100)), tmp_path / f"m.{fmt.lower()}", format=fmt)
    assert load_image(path).mode == "RGB"


def test_r7_sixteen_bit_is_scaled_not_clipped(tmp_path):
    sixteen = Image.fromarray(np.full((100, 100), 32768, dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    path = save(sixteen, tmp_path / "deep.png")
    value = np.array(load_image(path))[50, 50]
    assert 126 <= value[0] <= 130 and value.tolist() == [value[0]] * 3


def test_r8_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (100, 100), c) for c in ("red", "blue", "green")]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    image = load_image(path)
    assert image.mode == "RGB" and not getattr(image, "is_animated", False)
    assert np.array(image)[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize(("size", "message"), [((10, 10), "only 10x10 pixels"), ((2000, 100), "times longer")])
def test_r9_degenerate_sizes(tmp_path, size, message):
    path = save(Image.new("RGB", size), tmp_path / "odd.png")
    with pytest.raises(ImageError, match=message):
        load_image(path, name="photo 3")


def test_missing_file_does_not_leak_its_path(tmp_path):
    with pytest.raises(ImageError) as err:
        load_image(tmp_path / "secret-dir" / "nope.png", name="photo 4")
    assert "photo 4" in str(err.value) and "secret-dir" not in str(err.value)
