"""The page's newer parts through gradio_client: Stop's answer, previews, Speed, LoRAs; and start-up choices."""

from __future__ import annotations

import time

import httpx
import numpy as np
import PIL.Image
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

import app as app_module
from fastcomposer.generation.estimate import Estimator, Hardware
from fastcomposer.generation.metadata import read_record
from fastcomposer.inputs.faces import FaceCropper
from fastcomposer.pipeline.presets import PRESETS
from fastcomposer.ui import server
from fastcomposer.ui.settings import CUSTOM, SpeedAdvice, speed_of

from .app_helpers import ASTRONAUT, Args, image_path, request
from .test_lora import lora_factors, write_peft


def start(pipe, **options):
    demo = app_module.create_demo(lambda: pipe, cropper=FaceCropper(allow_download=False), **options)
    app_module.launch(demo, Args(), prevent_thread_lock=True, quiet=True)
    return demo, Client(demo.local_url, verbose=False)


@pytest.fixture(scope="module")
def page(tiny_pipe):
    demo, client = start(tiny_pipe)
    yield demo, client
    demo.close()


@pytest.fixture
def slow_unet(tiny_pipe, monkeypatch):
    calls = []
    forward = tiny_pipe.unet.forward

    def slow(*args, **kwargs):
        calls.append(time.monotonic())
        time.sleep(0.1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiny_pipe.unet, "forward", slow)
    return calls


def components(demo) -> list[dict]:
    return demo.get_config_file()["components"]


def props(demo, elem_id: str) -> dict:
    return next(c["props"] for c in components(demo) if c["props"].get("elem_id") == elem_id)


def test_stop_says_where_it_stopped_and_keeps_the_earlier_images(page, slow_unet):
    _, client = page
    earlier, _, _ = client.predict(**request(steps=2, seed=9), api_name="/generate")
    before = len(slow_unet)
    job = client.submit(**request(steps=50), api_name="/generate")
    while len(slow_unet) < before + 8:
        time.sleep(0.02)
    message = client.predict(api_name="/stop")  # returns once the run has ended
    calls_at_stop = len(slow_unet) - before
    assert message.startswith("Stopped at step ") and message.endswith(" of 51; nothing was generated.")
    done = int(message.split()[3])
    assert 7 <= done <= calls_at_stop
    gallery, _, status = job.result(timeout=60)  # its final answer
    assert status == message
    assert gallery[0]["caption"] == f"unfinished · {done}/51"
    assert image_path(gallery[-1]) and read_record(image_path(gallery[-1])).seed == 9  # the earlier image stayed
    previews = [out[0][0]["caption"] for out in job.outputs()[:-1] if out[0] and out[0][0].get("caption")]
    assert previews and all(c.startswith("preview · step ") for c in previews)
    time.sleep(0.3)
    assert len(slow_unet) - before == calls_at_stop  # nothing kept running
    assert read_record(image_path(earlier[0])).seed == 9


def test_a_closed_tab_stops_its_running_generation(page, slow_unet):
    """A browser-like session joins the queue, reads its event stream for a while, then goes away."""
    demo, _ = page
    with open(ASTRONAUT, "rb") as f:
        uploaded = httpx.post(demo.local_url + "gradio_api/upload", files={"files": ("a.png", f, "image/png")}).json()
    photo = {"path": uploaded[0], "orig_name": "a.png", "meta": {"_type": "gradio.FileData"}}
    data = ["a woman img reading", "", 0.75, 5.0, 80, "pndm", 1, 1, 256, 256, False, [{"image": photo}], None, None,
            None, [], [], [], [], 1, "", 0.8, 2.6, False, False, "", "", False, False, 0.4, None]
    fn_index = next(i for i, dep in enumerate(demo.config["dependencies"]) if dep.get("api_name") == "generate")
    joined = httpx.post(demo.local_url + "gradio_api/queue/join",
                        json={"data": data, "fn_index": fn_index, "session_hash": "tab", "event_data": None})
    assert joined.status_code == 200, joined.text
    before = len(slow_unet)
    with httpx.stream("GET", demo.local_url + "gradio_api/queue/data", params={"session_hash": "tab"},
                      timeout=30) as stream:
        for _ in stream.iter_lines():
            if len(slow_unet) - before >= 6:
                break
    closed_at = len(slow_unet)
    time.sleep(1.5)
    assert len(slow_unet) - closed_at <= 4  # stopped at its next preview, far from its 81 iterations


def test_a_stop_with_nothing_running_does_not_stop_the_next_run(page):
    _, client = page
    client.predict(api_name="/stop")
    client.predict(api_name="/stop")
    gallery, seed, status = client.predict(**request(seed=4), api_name="/generate")
    assert len(gallery) == 1 and seed == 4 and status.startswith("1 image(s)")


def test_speed_follows_the_three_settings_and_names_its_reason():
    fast = PRESETS["fast"]
    assert speed_of(fast.scheduler, fast.num_inference_steps, fast.cache_interval) == "fast"
    assert speed_of("pndm", 50, 1) == "original"
    assert speed_of("dpm", 20, 1) == CUSTOM and speed_of("dpm", 21, 3) == CUSTOM
    advice = SpeedAdvice(Estimator(Hardware("cpu", "bf16", 2)), "fast", "this server has no GPU")
    note = advice.note("fast", fast.scheduler, fast.num_inference_steps, fast.cache_interval, 512, 512, 1)
    assert note == "**Fast** · this server has no GPU · about 60 s per image on this hardware"
    assert "PNDM, 50 steps" in advice.note("original", "pndm", 50, 1, 512, 512, 1)
    assert advice.note(CUSTOM, "dpm", 30, 2, 512, 512, 1).startswith("**Custom** · dpm, 30 steps, cache every 2")


def test_the_default_speed_depends_on_the_hardware(tiny_pipe, monkeypatch):
    monkeypatch.delenv("FASTCOMPOSER_PRESET", raising=False)
    cpu = app_module.create_demo(lambda: tiny_pipe, hardware=Hardware("cpu", "bf16", 2))
    gpu = app_module.create_demo(lambda: tiny_pipe, hardware=Hardware("cuda", "fp16"), assets=None)
    assert props(cpu, "speed")["value"] == "fast" and props(gpu, "speed")["value"] == "original"
    assert props(cpu, "steps")["value"] == 20 and props(cpu, "cache-interval")["value"] == 3
    assert props(gpu, "sampler")["value"] == "pndm" and props(gpu, "steps")["value"] == 50
    cpu_note = props(cpu, "speed-note")["value"]
    assert "no GPU" in cpu_note and "about 60 s per image" in cpu_note
    assert "GPU" in props(gpu, "speed-note")["value"]
    assert {"lcm", "tcd"} <= {v for _, v in props(cpu, "sampler")["choices"]}
    assert any(c["type"] == "dataset" for c in components(cpu))  # the repository's examples
    assert not any(c["type"] == "dataset" for c in components(gpu))  # none without an assets folder
    monkeypatch.setenv("FASTCOMPOSER_PRESET", "balanced")
    env = app_module.create_demo(lambda: tiny_pipe, hardware=Hardware("cpu", "bf16", 2))
    assert props(env, "speed")["value"] == "balanced" and "FASTCOMPOSER_PRESET" in props(env, "speed-note")["value"]


def test_a_lora_from_the_folder_is_applied_and_recorded_and_a_bad_one_explained(tmp_path, monkeypatch):
    from fastcomposer.pipeline.loading import load_pipeline

    pipe = load_pipeline("tiny", device="cpu", dtype="fp32", safety_checker=False)  # its own: LoRAs stay on it
    write_peft(tmp_path / "style.safetensors", lora_factors(seed=1))
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    monkeypatch.setenv("FASTCOMPOSER_LORAS", str(tmp_path))
    demo, client = start(pipe)
    try:
        choices = [value for _, value in props(demo, "lora")["choices"]]
        assert choices == ["", "broken.safetensors", "style.safetensors"]
        plain, _, _ = client.predict(**request(seed=2), api_name="/generate")
        styled, _, _ = client.predict(**request(seed=2, lora="style.safetensors", lora_scale=0.5),
                                      api_name="/generate")
        assert read_record(image_path(styled[0])).loras == ["style.safetensors:0.5"]
        assert read_record(image_path(plain[0])).loras == []
        with pytest.raises(AppError, match="broken.safetensors could not be read"):
            client.predict(**request(lora="broken.safetensors"), api_name="/generate")
        with pytest.raises(Exception, match="400"):  # Dropdown choices are enforced: a client never names a path
            client.predict(**request(lora="/etc/passwd"), api_name="/generate")
        again, _, _ = client.predict(**request(seed=2), api_name="/generate")  # off again: the base model's image
        assert read_record(image_path(again[0])).loras == []
        pixels = [np.asarray(PIL.Image.open(image_path(g[0]))) for g in (plain, styled, again)]
        assert not np.array_equal(pixels[0], pixels[1]) and np.array_equal(pixels[0], pixels[2])
    finally:
        demo.close()


def test_compile_and_warm_up_only_where_they_pay_off(monkeypatch):
    import fastcomposer.pipeline.loading as loader

    parse = app_module.build_parser().parse_args
    monkeypatch.delenv("FASTCOMPOSER_COMPILE", raising=False)
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    monkeypatch.setattr(loader, "pick_device", lambda device: type("D", (), {"type": "cuda"})())
    assert server.should_compile(parse(["--public"])) is True
    assert server.should_compile(parse([])) is False  # a local run: no minute of compiling
    assert server.should_compile(parse(["--public", "--no-compile"])) is False
    assert server.should_compile(parse(["--compile"])) is True
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert server.should_compile(parse(["--public"])) is False  # each ZeroGPU worker would compile again
    monkeypatch.delenv("SPACES_ZERO_GPU")
    monkeypatch.setattr(loader, "pick_device", lambda device: type("D", (), {"type": "cpu"})())
    assert server.should_compile(parse(["--public"])) is False

    loaded, warmed = [], []
    monkeypatch.setattr(loader, "load_pipeline", lambda weights, **kw: loaded.append(kw) or "pipe")
    monkeypatch.setattr(server, "warm_up", lambda pipe: warmed.append(pipe))
    server.load_or_preview(parse(["--weights", "x.bin", "--compile"]))
    assert loaded[-1]["compile"] is True and warmed == ["pipe"]
    server.load_or_preview(parse(["--weights", "x.bin", "--no-compile"]))
    assert loaded[-1]["compile"] is False and warmed == ["pipe"]


def test_warm_up_runs_one_short_generation_at_the_default_size(tiny_pipe, monkeypatch):
    sizes = []
    forward = tiny_pipe.unet.forward
    monkeypatch.setattr(tiny_pipe.unet, "forward",
                        lambda x, *a, **k: sizes.append(x.shape[-2:]) or forward(x, *a, **k))
    server.warm_up(tiny_pipe)
    assert len(sizes) == server.WARMUP_STEPS and all(tuple(s) == (64, 64) for s in sizes)  # 512 px / 8


def test_serve_is_the_app_for_an_installed_package(capsys):
    from fastcomposer.commands.main import main

    with pytest.raises(SystemExit) as done:
        main(["serve", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m fastcomposer serve") and "--preset" in out and "--no-compile" in out


# -- photos, crops and what the model did: the parts the page is built from -----------------------------------


def test_the_crop_preview_shows_the_crop_on_the_whole_photo():
    from fastcomposer.ui.crops import OUTSIDE_BRIGHTNESS, PREVIEW_SIDE, draw_crop

    photo = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (600, 800, 3), dtype=np.uint8))
    preview = draw_crop(photo, (200, 100, 500, 400), (300, 180, 400, 300), (230, 159, 0))
    assert preview.size == (PREVIEW_SIDE, round(600 * PREVIEW_SIDE / 800))  # the whole photo, as a thumbnail
    small = np.asarray(photo.resize(preview.size, PIL.Image.Resampling.LANCZOS)).astype(int)
    out = np.asarray(preview).astype(int)
    scale = PREVIEW_SIDE / 800
    x0, y0, x1, y1 = (round(v * scale) for v in (200, 100, 500, 400))
    np.testing.assert_array_equal(out[y0 + 5: y0 + 20, x0 + 5: x0 + 20], small[y0 + 5: y0 + 20, x0 + 5: x0 + 20])
    outside = out[5:30, 5:30]
    assert np.abs(outside - small[5:30, 5:30] * OUTSIDE_BRIGHTNESS).max() <= 1  # dimmed around the crop
    assert tuple(out[y0 + 1, (x0 + x1) // 2]) == (230, 159, 0)  # the square, in the subject's colour
    assert tuple(out[round(180 * scale), round(350 * scale)]) == (255, 255, 255)  # the face box's top edge
    assert draw_crop(photo, None, None, (0, 0, 0)).size == preview.size  # whole photo: nothing drawn


def test_each_photo_of_a_slot_gets_a_preview_and_problems_name_the_photo(tmp_path, photos):
    from fastcomposer.config import SETTINGS
    from fastcomposer.ui.crops import SubjectLoader

    cropper = FaceCropper(allow_download=False)
    loader = SubjectLoader(SETTINGS.limits, cropper, [(1, 2, 3), (230, 159, 0)])
    wall = tmp_path / "wall.png"
    PIL.Image.new("RGB", (300, 300), (200, 190, 180)).save(wall)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"no image")
    gallery, status = loader.preview(1, [ASTRONAUT, str(wall), str(broken)], True, [], 2.0)
    assert [caption for _, caption in gallery] == ["1 · face ✓", "2 · ✗ no face"]  # the broken one has no picture
    # numbered within the subject, as the slot is the subject's own
    assert "no face found in photo 2: tick 2 under 'Use whole photo'" in status
    assert "photo 3 is not a supported image" in status and str(tmp_path) not in status
    crop = cropper.crop(photos["astronaut"], margin=2.0)  # the square drawn is the crop the model gets
    assert loader.for_generation(1, [ASTRONAUT], True, [], 2.0)[0].tobytes() == crop.image.tobytes()
    gallery, status = loader.preview(1, [ASTRONAUT, str(wall)], True, [2], 2.0)
    assert status == "2 photos ✓ (averaged into one subject)" and gallery[1][1] == "2 · whole photo"
    wide = loader.for_generation(1, [ASTRONAUT], True, [], 3.2)[0]
    assert wide.width > crop.image.width  # the margin reaches the crop


def test_slot_headers_name_the_subject_words_in_marker_order():
    from fastcomposer.ui.photos import headers_for

    assert headers_for("a woman img and her_dog img on a beach") == [
        "**Subject 1** · woman", "**Subject 2** · her\\_dog", "**Subject 3**", "**Subject 4**"]
    assert headers_for("img at the beach")[0] == "**Subject 1**"  # no word before the marker


def test_sweep_field_and_budget():
    from fastcomposer.config import SETTINGS
    from fastcomposer.ui.insight import parse_sweep, sweep_problem

    assert parse_sweep("") is None and parse_sweep("off") is None
    assert parse_sweep("0.5, 0.6 0.7") == [0.5, 0.6, 0.7]
    for text, message in (("0.7", "2 or more"), ("0.5, 1.5", "between 0 and 1"), ("0.5, 0.5", "differ"),
                          ("a, b", "not a list of numbers"), (", ".join(["0.1"] * 9), "at most 8")):
        with pytest.raises(ValueError, match=message):
            parse_sweep(text)
    limits = SETTINGS.limits
    # every run counts: alphas x images x steps x pixels / 512^2 against the budget
    assert sweep_problem([0.5, 0.7], 2, 50, 512, 512, limits) is None  # 200
    assert "make 300 image-steps" in sweep_problem([0.5, 0.6, 0.7], 2, 50, 512, 512, limits)
    assert sweep_problem([0.5, 0.7], 4, 50, 256, 256, limits) is None  # 100
    assert sweep_problem([0.5, 0.7], "?", 50, 256, 256, limits) is None  # left to the request's own checks


def test_identity_is_on_by_default_only_where_its_weights_are(monkeypatch, tmp_path):
    from fastcomposer.identity.checker import ARCFACE
    from fastcomposer.ui.insight import IDENTITY_OFF, IDENTITY_ON, identity_default

    monkeypatch.setenv("FASTCOMPOSER_CACHE", str(tmp_path))
    assert identity_default() == (False, IDENTITY_OFF)
    ARCFACE.path().parent.mkdir(parents=True)
    ARCFACE.path().write_bytes(b"weights")
    assert identity_default() == (True, IDENTITY_ON)


def test_slot_colours_are_the_attention_colours():
    from fastcomposer.pipeline.attention import SUBJECT_COLOURS
    from fastcomposer.ui.texts import page_css

    css = page_css(SUBJECT_COLOURS)
    for k, (r, g, b) in enumerate(SUBJECT_COLOURS):
        assert f"#slot-{k + 1} {{ border-left-color: rgb({r}, {g}, {b}); }}" in css


def test_a_stopped_sweep_keeps_its_finished_alphas_and_progress_covers_all_runs(page, slow_unet):
    _, client = page
    job = client.submit(**request(steps=6, seed=13, alpha_sweep="0.5, 0.6, 0.7"), api_name="/generate")
    seen = []
    while not job.done():
        status = job.status()
        if status.progress_data:
            unit = status.progress_data[0]
            seen.append((unit.index, unit.length, unit.desc))
            if unit.desc and unit.desc.startswith("α 0.60 2/3 · step 3/"):
                break
        time.sleep(0.02)
    message = client.predict(api_name="/stop")
    assert message.startswith("Stopped at step ") and message.endswith(" of alpha 0.60; the finished alphas (0.50) "
                                                                       "are kept.")
    gallery, seed, status = job.result(timeout=60)
    assert status == message and seed == 13
    captions = [item["caption"] for item in gallery]
    # the unfinished preview, the finished alpha (its grid, then its image), then this session's earlier images
    assert captions[0].startswith("unfinished · ") and captions[1:3] == ["alpha sweep · seed 13", "α 0.50"]
    assert read_record(image_path(gallery[2])).alpha == 0.5
    lengths = {length for _, length, _ in seen if length}
    assert lengths == {3 * 7}  # one bar over the three runs (PNDM: 6 steps + 1 each)
    assert max(index for index, length, _ in seen if length) > 7  # it went on past the first run
