"""The app as it runs on ZeroGPU: generation in a forked worker, arguments and results pickled.

`tests/fake_spaces/spaces` stands in for Hugging Face's `spaces` package (see its docstring). With it on
`sys.path`, `create_demo` wraps generation in its `GPU`, exactly as on a Space; the app is then driven through
gradio_client. A change that hands the worker a closure, an Event or the pipeline, or that relies on state
the worker cannot send back, fails here.
"""

from __future__ import annotations

import math
import multiprocessing
import pickle
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError

import app as app_module
from fastcomposer.generation.metadata import read_record
from fastcomposer.inputs.faces import FaceCropper
from fastcomposer.ui import gpu

from .app_helpers import ASTRONAUT, HOPPER, Args, image_path, photos, request
from .test_hardening import FakePipe

FAKE_SPACES = str(Path(__file__).parent / "fake_spaces")


@pytest.fixture(scope="module")
def spaces():
    """The stand-in, importable as `spaces` for this module only."""
    sys.path.insert(0, FAKE_SPACES)
    import spaces as fake

    assert Path(fake.__file__).is_relative_to(FAKE_SPACES)
    yield fake
    sys.path.remove(FAKE_SPACES)
    sys.modules.pop("spaces", None)


def start(pipe):
    demo = app_module.create_demo(lambda: pipe, cropper=FaceCropper(allow_download=False))
    app_module.launch(demo, Args(), prevent_thread_lock=True, quiet=True)
    return demo, Client(demo.local_url, verbose=False)


@pytest.fixture(scope="module")
def zerogpu_app(spaces, tiny_pipe):
    demo, client = start(tiny_pipe)
    yield demo, client
    demo.close()


@pytest.fixture
def slow_unet(tiny_pipe, monkeypatch):
    """Each UNet call sleeps first (the forked worker inherits the patch), so a run lasts long enough to watch."""
    forward = tiny_pipe.unet.forward

    def slow(*args, **kwargs):
        time.sleep(slow.seconds)
        return forward(*args, **kwargs)

    slow.seconds = 0.05
    monkeypatch.setattr(tiny_pipe.unet, "forward", slow)
    return slow


def watch(job, until=None) -> list:
    """Poll a submitted job; the progress units it reported, in order."""
    seen = []
    while not job.done() and not (until and until(seen)):
        status = job.status()
        if status.progress_data:
            seen.append((status.progress_data[0].index, status.progress_data[0].length, status.progress_data[0].desc))
        time.sleep(0.02)
    return seen


def test_the_stand_in_refuses_what_zerogpu_cannot_take(spaces, tiny_pipe):
    """The old app handed the worker the pipeline, a closure and an Event: each is refused."""
    run = spaces.GPU(duration=60)(lambda pipe, request, on_step, stop: None)
    with pytest.raises(spaces.RefusedArgument, match="UNet2DConditionModel|FastComposerPipeline"):
        run(tiny_pipe, None, None, None)
    with pytest.raises((pickle.PicklingError, TypeError, AttributeError)):  # the closure and the Event
        run(None, None, lambda done, total: None, threading.Event())
    with pytest.raises(ValueError, match="duration"):
        spaces.GPU(duration=lambda *a: 10_000)(lambda x: x)(1)
    assert spaces.GPU(duration=lambda x: 5)(lambda x: x * 2)(21) == 42  # a plain call, through a real worker


def test_one_and_two_subjects_come_back_with_progress_and_previews(zerogpu_app, spaces, slow_unet):
    _, client = zerogpu_app
    calls_before = len(spaces.calls)
    job = client.submit(**request(steps=8, seed=5), api_name="/generate")
    seen = watch(job)
    gallery, seed, status = job.result(timeout=120)
    assert len(gallery) == 1 and seed == 5 and "seed 5" in status
    record = read_record(image_path(gallery[0]))
    assert record.seed == 5 and record.num_inference_steps == 8  # the PNG settings survived the pickling
    steps = [(done, total) for done, total, desc in seen if total]
    assert steps and all(total == 9 for _, total in steps) and max(done for done, _ in steps) >= 4  # PNDM: 8 + 1
    assert any(desc and desc.startswith("step ") and "left" in desc for _, _, desc in seen)
    previews = [out for out in job.outputs()[:-1] if out[0] and out[0][0].get("caption", "").startswith("preview")]
    assert previews  # live previews came back from the worker too

    gallery, _, _ = client.predict(**request(prompt="a woman img and a woman img having tea", num_images=2,
                                             photo_2=photos(HOPPER), steps=2), api_name="/generate")
    assert len(gallery) == 2
    calls = spaces.calls[calls_before:]
    assert [c["function"] for c in calls] == ["run_generation", "run_generation"]
    assert all(gpu.ZEROGPU_MIN_DURATION_S <= c["duration"] <= gpu.ZEROGPU_MAX_DURATION_S for c in calls)
    assert not multiprocessing.active_children()  # every worker has exited


def test_bad_requests_get_the_same_messages(zerogpu_app, spaces, tmp_path, monkeypatch):
    """Refusals before the GPU and failures inside the worker read as they do without ZeroGPU (test_hardening)."""
    _, client = zerogpu_app
    with pytest.raises(Exception, match="2 subjects in prompt"):
        client.predict(**request(prompt="a man img and a woman img"), api_name="/generate")
    with pytest.raises(AppError, match="steps must be a whole number"):
        client.predict(**request(steps=2.5), api_name="/generate")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # inherited by the worker: no CUDA cache to free
    demo, oom_client = start(FakePipe(fail=torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")))
    try:
        with pytest.raises(AppError, match="out of memory: try fewer images, fewer steps or a smaller size"):
            oom_client.predict(**request(), api_name="/generate")
        with pytest.raises(AppError, match="out of memory"):  # the worker's copy failed; each call forks afresh
            oom_client.predict(**request(), api_name="/generate")
    finally:
        demo.close()


def test_stop_reaches_the_worker_and_the_page_says_so(zerogpu_app, slow_unet):
    _, client = zerogpu_app
    slow_unet.seconds = 0.15
    first, _, _ = client.predict(**request(steps=2, seed=1), api_name="/generate")
    job = client.submit(**request(steps=60), api_name="/generate")
    watch(job, until=lambda seen: any(done and done >= 3 for done, _, _ in seen))
    started = time.monotonic()
    message = client.predict(api_name="/stop")
    assert time.monotonic() - started < 10  # the worker stopped after a step or two, not after 61 of them
    assert message.startswith("Stopped at step ") and message.endswith("of 61; nothing was generated.")
    gallery, _, status = job.result(timeout=60)  # its final answer
    assert status == message
    assert image_path(gallery[-1]).endswith(".png") and "unfinished" in gallery[0]["caption"]
    assert len(gallery) == 2  # the unfinished preview, then the earlier result, still there
    time.sleep(0.5)
    assert not multiprocessing.active_children()


def test_several_photos_per_subject_and_a_sweep_cross_to_the_worker(zerogpu_app, spaces):
    """The photos of a subject travel as a list of crops; a sweep is one GPU call that reserves for all its runs."""
    _, client = zerogpu_app
    calls_before = len(spaces.calls)
    gallery, _, _ = client.predict(**request(prompt="a woman img and a woman img having tea", seed=2,
                                             photo_1=photos(HOPPER, ASTRONAUT), photo_2=photos(HOPPER)),
                                   api_name="/generate")
    assert read_record(image_path(gallery[0])).photos_per_subject == [2, 1]
    gallery, _, status = client.predict(**request(seed=2, alpha_sweep="0.4, 0.8", attention_maps=True),
                                        api_name="/generate")
    assert [item["caption"] for item in gallery] == ["alpha sweep · seed 2", "where each subject went", "α 0.40",
                                                     "α 0.40 · map of image 1", "α 0.80", "α 0.80 · map of image 1"]
    assert [c["function"] for c in spaces.calls[calls_before:]] == ["run_generation", "run_generation"]
    assert not multiprocessing.active_children()


def test_layout_boxes_and_keep_apart_cross_to_the_worker(zerogpu_app):
    _, client = zerogpu_app
    gallery, _, _ = client.predict(**request(prompt="a woman img and a man img", photo_2=photos(HOPPER), seed=4,
                                             layout_boxes="0,0,0.5,1 | -", keep_apart=True, attention_maps=True),
                                   api_name="/generate")
    record = read_record(image_path(gallery[0]))
    assert record.boxes == [[0.0, 0.0, 0.5, 1.0], None] and record.separate is True
    assert gallery[1]["caption"] == "map of image 1"


def test_a_sweep_reserves_gpu_time_for_every_run():
    from fastcomposer.generation.estimate import Estimator, Hardware
    from fastcomposer.generation.run import GenerationRequest

    estimator = Estimator(Hardware("zerogpu", "fp16"))
    key = gpu.register(gpu.Engine(lambda: None, None, estimator))
    request_ = GenerationRequest(prompt="a woman img", images=[None], num_inference_steps=30)
    one_run = estimator.seconds(gpu.workload(request_, [[None]]))
    for alphas in (None, [0.5, 0.7], [0.3, 0.5, 0.7, 0.9]):
        runs = len(alphas) if alphas else 1
        wanted = math.ceil(gpu.ZEROGPU_OVERHEAD_S + gpu.ZEROGPU_MARGIN * (one_run * runs))
        expected = min(gpu.ZEROGPU_MAX_DURATION_S, max(gpu.ZEROGPU_MIN_DURATION_S, wanted))
        assert gpu.gpu_duration(key, request_, [[None]], [], alphas) == expected
