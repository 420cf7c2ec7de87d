"""A newcomer's first minute: the Examples table (each subject's photo in its own column; results cached lazily on
a Space with the real weights only), Download all, and the theme's contrast. The browser test clicks the table."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import gradio as gr
import PIL.Image
import pytest

import app as app_module
from fastcomposer.config import SETTINGS
from fastcomposer.generation.metadata import read_record
from fastcomposer.inputs.faces import FaceCropper
from fastcomposer.ui.examples import EXAMPLE_SEED
from fastcomposer.ui.results import zip_results
from fastcomposer.ui.server import caches_examples
from fastcomposer.ui.texts import EXAMPLES, page_theme

ROOT = Path(__file__).resolve().parents[1]


def _demo(pipe, **kwargs):
    return app_module.create_demo(lambda: pipe, cropper=FaceCropper(allow_download=False), **kwargs)


def test_the_table_has_one_column_per_subject_and_fills_the_galleries(tiny_pipe):
    examples = _demo(tiny_pipe).examples_table
    dataset = examples.dataset
    assert dataset.headers == ["Prompt", "Subject 1", "Subject 2"]
    assert examples.cache_examples is False and examples.fn is None  # a click fills the inputs, nothing runs
    for row, (prompt, first, second) in zip(dataset.samples, EXAMPLES, strict=True):
        assert row[0] == prompt
        assert Path(row[1]["path"]).name == first  # each subject's photo under its own header
        assert (Path(row[2]["path"]).name if row[2] else None) == second
    # The galleries are hidden columns of the same examples: a click puts each photo into its own slot and
    # empties a slot the example leaves empty (a one-subject example after a two-subject one)
    for index, (_, first, second) in enumerate(EXAMPLES):
        values = examples._get_example_value(dataset.preprocess(index))  # what a click on row `index` loads
        galleries = examples._get_processed_example(values)[3:]
        assert [Path(g[0]["image"]["path"]).name if g else None for g in galleries] == [first, second]


def test_cached_examples_only_on_a_space_with_the_real_weights(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert caches_examples(None) is False  # a local run: nobody else would use the stored results
    monkeypatch.setenv("SPACE_ID", "someone/fastcomposer")
    assert caches_examples(None) is True
    assert caches_examples("Running on tiny random weights ...") is False  # a preview's noise is not kept


def test_a_cached_example_runs_once_then_comes_from_the_cache(tiny_pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_EXAMPLES_CACHE", str(tmp_path))
    loads = []

    def get_pipeline():
        loads.append(1)
        return tiny_pipe

    demo = app_module.create_demo(get_pipeline, cropper=FaceCropper(allow_download=False), preset="fast",
                                  cache_examples=True)
    examples = demo.examples_table
    assert examples.cache_examples == "lazy"
    event = demo.fns[examples.cache_event["id"]]  # its run queues with the page's runs: one pipeline, one run
    assert (event.concurrency_id, event.concurrency_limit) == (SETTINGS.server.concurrency_id, 1)
    assert not (Path(examples.cached_folder) / "log.csv").exists()  # nothing made at start
    gallery, seed, status = examples.load_from_cache(0)
    assert len(loads) == 1 and int(float(seed)) == EXAMPLE_SEED and "seed 42" in status
    first = gallery.root[0].image.path
    with PIL.Image.open(first) as image:
        record = read_record(image)
        assert record is not None and record.seed == EXAMPLE_SEED and record.preset == "fast"
    again = examples.load_from_cache(0)
    assert len(loads) == 1, "the second click ran the model again"
    assert again[0].root[0].image.path == first


def _shown(tiny_pipe) -> list[tuple]:
    from fastcomposer.generation.request import GenerationRequest
    from fastcomposer.generation.run import generate

    photo = PIL.Image.open(ROOT / "assets" / "astronaut.png").convert("RGB")
    request = GenerationRequest("a woman img", [photo], num_inference_steps=2, seed=7,
                                num_images=2, scheduler="dpm", face_crop=False, width=256, height=256)
    result = generate(tiny_pipe, request)
    extra = PIL.Image.new("RGB", (32, 32), "red")
    return [(result.images[0], "image one"), (extra, "map of image 1"), (result.images[1], None)]


def test_download_all_zips_every_image_with_its_settings(tiny_pipe, tmp_path):
    shown = _shown(tiny_pipe)
    update = zip_results(shown, folder=tmp_path)
    assert update["visible"] is True
    with zipfile.ZipFile(update["value"]) as archive:
        names = archive.namelist()
        assert names == ["01-seed7-image1.png", "02-map-of-image-1.png", "03-seed7-image2.png"]
        archive.extractall(tmp_path / "out")
    for name, (image, _) in zip(names, shown, strict=True):
        with PIL.Image.open(tmp_path / "out" / name) as saved:
            assert saved.size == image.size and saved.convert("RGB").tobytes() == image.convert("RGB").tobytes()
        stored, original = read_record(tmp_path / "out" / name), read_record(image)
        assert stored == original  # the images' settings restore on the page; the map has none
    assert read_record(tmp_path / "out" / names[0]).seed == 7


def test_download_all_hides_without_images_and_forgets_old_zips(tmp_path):
    assert zip_results([], folder=tmp_path) == gr.update(visible=False, value=None)
    old = tmp_path / "fastcomposer-old.zip"
    old.write_bytes(b"PK")
    os.utime(old, (0, 0))  # written in 1970: far older than an hour
    zip_results([(PIL.Image.new("RGB", (8, 8)), "x")], folder=tmp_path)
    assert not old.exists() and len(list(tmp_path.glob("*.zip"))) == 1


def _contrast(a: str, b: str) -> float:
    """WCAG's contrast ratio of two #rrggbb colours, written out."""
    def luminance(colour: str) -> float:
        channels = [int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
        linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


@pytest.mark.parametrize("name", ["body_text_color_subdued", "button_primary_background_fill",
                                  "button_cancel_background_fill"])
def test_the_theme_keeps_text_readable(name):
    theme = page_theme()
    value = getattr(theme, name)
    colour = getattr(theme, value[1:]) if value.startswith("*") else value
    against = "#ffffff"  # the page's background, and the buttons' white text
    assert _contrast(colour, against) >= 4.5, (name, colour)
    default = gr.themes.Default()
    base = getattr(default, getattr(default, name)[1:]) if getattr(default, name).startswith("*") else \
        getattr(default, name)
    assert _contrast(base, against) < 4.5  # what the scan found on Gradio's default
