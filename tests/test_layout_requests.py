"""Layout boxes and "keep apart" through every entry point: Python, the command line, the page (gradio_client),
restore from a PNG, sweeps; and bad boxes worded for each audience, with the next request still working."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

import app as app_module
from fastcomposer.commands.main import main
from fastcomposer.generation import GenerationError, GenerationRequest, generate
from fastcomposer.generation.metadata import read_record
from fastcomposer.generation.sweep import alpha_sweep
from fastcomposer.inputs.faces import FaceCropper
from fastcomposer.pipeline.boxes import format_boxes, parse_boxes_text

from .app_helpers import ASTRONAUT, HOPPER, Args, image_path, photos, request

PAIR = "a woman img and a man img"
HALVES = [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
TINY = ["--weights", "tiny", "--device", "cpu", "--no-safety-checker", "--steps", "2", "--height", "64",
        "--width", "64", "--no-face-crop"]


def pair_request(**overrides) -> GenerationRequest:
    base = dict(prompt=PAIR, images=[PIL.Image.open(ASTRONAUT).convert("RGB"), PIL.Image.open(HOPPER).convert("RGB")],
                num_inference_steps=2, height=256, width=256, seed=3, face_crop=False)
    return GenerationRequest(**{**base, **overrides})


BAD = [
    ([(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.2, 1.0)], "layout box 2 (0.5, 0, 1.2, 1) is outside the image",
     "--box number 2 (0.5, 0, 1.2, 1) is outside", "box 2 of `boxes` (0.5, 0, 1.2, 1) is outside"),
    ([(0.5, 0.0, 0.4, 1.0), None], "layout box 1 (0.5, 0, 0.4, 1) is empty or inverted",
     "--box number 1", "box 1 of `boxes`"),
    ([(0.0, 0.0, 0.01, 1.0), None], "layout box 1 is 3x256 px, smaller than one latent cell (8 px)",
     "--box number 1 is 3x256 px", "box 1 of `boxes` is 3x256 px"),
    ([(0, 0, 1, 1)] * 3, "3 layout boxes for 2 subject(s)", "3 --box values for 2 subject(s); give one --box per",
     "`boxes` has 3 entries for 2 subject(s)"),
]


@pytest.mark.parametrize(("boxes", "page", "cli", "api"), BAD)
def test_bad_boxes_are_worded_for_each_audience(tiny_pipe, boxes, page, cli, api):
    with pytest.raises(GenerationError) as caught:
        generate(tiny_pipe, pair_request(boxes=boxes))
    error = caught.value
    assert error.message_for("page").startswith(page)
    assert error.message_for("cli").startswith(cli)
    assert str(error).startswith(api)
    assert generate(tiny_pipe, pair_request(boxes=HALVES)).images  # the next request works


def test_overlapping_boxes_and_a_shorter_list_are_allowed(tiny_pipe):
    result = generate(tiny_pipe, pair_request(boxes=[(0.0, 0.0, 0.7, 1.0), (0.3, 0.0, 1.0, 1.0)]))
    assert result.records[0].boxes == [[0.0, 0.0, 0.7, 1.0], [0.3, 0.0, 1.0, 1.0]]
    result = generate(tiny_pipe, pair_request(boxes=[(0.0, 0.0, 0.5, 1.0)]))  # the man is free
    assert result.records[0].boxes == [[0.0, 0.0, 0.5, 1.0], None]


def test_the_pipeline_says_the_same_in_python_terms(tiny_pipe, photos):
    with pytest.raises(ValueError, match=r"box 2 \(0.5, 0, 1.2, 1\) is outside the image"):
        tiny_pipe(PAIR, [photos["astronaut"], photos["hopper"]], boxes=BAD[0][0], num_inference_steps=1,
                  height=64, width=64)


def test_the_request_records_the_layout_and_the_overlay_draws_it(tiny_pipe):
    result = generate(tiny_pipe, pair_request(boxes=[HALVES[0], None], separate=True, attention_maps=True))
    record = result.records[0]
    assert record.boxes == [[0.0, 0.0, 0.5, 1.0], None] and record.separate is True
    assert "Boxes: 0,0,0.5,1 | -, Keep apart: on" in record.summary()
    assert read_record(result.images[0]).boxes == record.boxes  # in the image's own metadata
    overlay = np.asarray(result.attention[0])
    assert (overlay[:256, 1] == (230, 159, 0)).all()  # subject 1's box edge, in its colour, down the left side


def test_boxes_in_a_sweep_apply_to_every_alpha_and_bad_ones_stop_it_first(tiny_pipe):
    results = alpha_sweep(tiny_pipe, pair_request(boxes=HALVES), [0.5, 0.8])
    assert [r.records[0].boxes for r in results] == [[list(b) for b in HALVES]] * 2
    with pytest.raises(GenerationError, match="outside the image"):
        alpha_sweep(tiny_pipe, pair_request(boxes=BAD[0][0]), [0.5, 0.8])


def test_box_text_round_trips():
    assert format_boxes([(0, 0, 0.5, 1), None]) == "0,0,0.5,1 | -"
    assert parse_boxes_text("0,0,0.5,1 | - ") == [(0.0, 0.0, 0.5, 1.0), None]
    assert parse_boxes_text("") is None and format_boxes(None) == ""
    with pytest.raises(ValueError, match="box 2"):
        parse_boxes_text("0,0,1,1 | 0,0,1")


def test_cli_box_and_separate(tmp_path, capsys):
    code = main(["generate", "--prompt", PAIR, "--image", ASTRONAUT, "--image", HOPPER, "--box", "0,0,0.5,1",
                 "--box", "-", "--separate", "--attention-maps", "--output", str(tmp_path / "x.png"), *TINY])
    out = capsys.readouterr()
    assert code == 0, out.err
    record = read_record(tmp_path / "x.png")
    assert record.boxes == [[0.0, 0.0, 0.5, 1.0], None] and record.separate is True
    assert (tmp_path / "x_attn.png").is_file()
    for flags, message in [(["--box", "0,0,a,1"], "--box '0,0,a,1' (number 1) must be four numbers"),
                           (["--box", "0,0,0.5,1"] * 3, "3 --box values for 2 subject(s)")]:
        code = main(["generate", "--prompt", PAIR, "--image", ASTRONAUT, "--image", HOPPER, *flags, "--output",
                     str(tmp_path / "y.png"), *TINY])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_batch_line_with_bad_boxes_fails_alone(tmp_path, capsys):
    import json
    import shutil

    shutil.copy(ASTRONAUT, tmp_path / "a.png")
    lines = [{"id": "ok", "prompt": "a woman img", "images": ["a.png"], "boxes": [[0, 0, 1, 1]], "seed": 1},
             {"id": "text", "prompt": "a woman img", "images": ["a.png"], "boxes": ["left"]},
             {"id": "out", "prompt": "a woman img", "images": ["a.png"], "boxes": [[0, 0, 2, 1]]}]
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    code = main(["batch", str(tmp_path / "jobs.jsonl"), "--output", str(tmp_path / "out"), *TINY])
    err = capsys.readouterr().err
    assert code == 2
    assert 'line 2 (id text): "boxes" entry 1 must be [x0, y0, x1, y1]' in err
    assert "line 3 (id out): box 1 of `boxes` (0, 0, 2, 1) is outside the image" in err
    assert read_record(tmp_path / "out" / "ok.png").boxes == [[0.0, 0.0, 1.0, 1.0]]


@pytest.fixture(scope="module")
def client(tiny_pipe):
    demo = app_module.create_demo(lambda: tiny_pipe, cropper=FaceCropper(allow_download=False))
    app_module.launch(demo, Args(), prevent_thread_lock=True, quiet=True)
    yield Client(demo.local_url, verbose=False)
    demo.close()


def test_the_page_generates_with_boxes_and_restores_them(client):
    two = dict(prompt=PAIR, photo_2=photos(HOPPER), face_crop=False, seed=8)
    gallery, _, _ = client.predict(**request(**two, layout_boxes="0,0,0.5,1 | 0.5,0,1,1", keep_apart=True),
                                   api_name="/generate")
    record = read_record(image_path(gallery[0]))
    assert record.boxes == [[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]] and record.separate is True
    restored = client.predict(handle_file(image_path(gallery[0])), api_name="/restore_settings")
    assert restored[16:18] == ("0,0,0.5,1 | 0.5,0,1,1", True)
    plain, _, _ = client.predict(**request(**two), api_name="/generate")  # the old call, without the new inputs
    assert read_record(image_path(plain[0])).boxes is None
    assert not np.array_equal(np.asarray(PIL.Image.open(image_path(plain[0]))),
                              np.asarray(PIL.Image.open(image_path(gallery[0]))))


def test_the_page_refuses_bad_boxes_in_its_own_words_and_carries_on(client):
    two = dict(prompt=PAIR, photo_2=photos(HOPPER), face_crop=False)
    with pytest.raises(AppError, match=r"layout box 2 \(0.5, 0, 1.5, 1\) is outside the image"):
        client.predict(**request(**two, layout_boxes="0,0,0.5,1 | 0.5,0,1.5,1"), api_name="/generate")
    with pytest.raises(Exception, match="box 1"):  # unreadable text: refused before the queue
        client.predict(**request(**two, layout_boxes="left half"), api_name="/generate")
    gallery, _, _ = client.predict(**request(**two, layout_boxes="0,0,0.5,1 | -"), api_name="/generate")
    assert read_record(image_path(gallery[0])).boxes == [[0.0, 0.0, 0.5, 1.0], None]


def test_layout_presets_fit_the_subject_count():
    from fastcomposer.pipeline.boxes import box_problem
    from fastcomposer.ui.layout import (
        CUSTOM,
        FREE,
        FRONT_BEHIND,
        SIDE_BY_SIDE,
        preset_boxes,
        preset_choices,
        preset_of,
    )

    assert [v for _, v in preset_choices(1)] == [FREE, CUSTOM]
    assert [label for label, _ in preset_choices(3)][1] == "Left · centre · right"
    assert FRONT_BEHIND in [v for _, v in preset_choices(4)]
    assert preset_boxes(SIDE_BY_SIDE, 2) == [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
    assert preset_of("0,0,0.5,1 | 0.5,0,1,1", 2) == SIDE_BY_SIDE
    assert preset_of("0,0,0.6,1 | 0.5,0,1,1", 2) == CUSTOM and preset_of("", 2) == FREE
    for count in range(1, 5):  # every preset is a valid layout at the smallest size
        for _, name in preset_choices(count):
            assert box_problem(preset_boxes(name, count), count, 256, 256) is None


def test_the_page_refines_faces_and_restores_the_setting(client):
    gallery, _, _ = client.predict(**request(seed=6, refine_faces=True, face_strength=0.55), api_name="/generate")
    record = read_record(image_path(gallery[0]))
    assert record.detail_faces is True and record.detail_strength == 0.55
    assert gallery[0]["caption"].startswith("refine faces") or "refined" in gallery[0]["caption"]
    restored = client.predict(handle_file(image_path(gallery[0])), api_name="/restore_settings")
    assert restored[-2:] == (True, 0.55)
