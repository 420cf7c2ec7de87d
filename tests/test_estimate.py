"""The time estimator (estimate.py) against its formula written out, and the event streams (streaming.py)."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import PIL.Image
import pytest

from fastcomposer.generation.estimate import Estimator, Hardware, Workload, format_seconds
from fastcomposer.generation.run import GenerationError, GenerationRequest
from fastcomposer.generation.streaming import PreviewEvent, ResultEvent, StepEvent, stream_generation
from fastcomposer.pipeline.caching import is_full_pass
from fastcomposer.pipeline.presets import PRESETS
from fastcomposer.ui import gpu


@pytest.mark.parametrize(("steps", "interval", "alpha"), [(20, 3, 0.75), (50, 1, 0.75), (25, 4, 0.5), (8, 2, 1.0),
                                                          (10, 3, 0.0)])
def test_full_passes_follow_the_feature_caches_rule(steps, interval, alpha):
    switch = (1 - alpha) * steps  # the pipeline's last text-only index
    for scheduler, iterations in (("pndm", steps + 1), ("dpm", steps)):
        first_subject = next((i for i in range(iterations) if i > switch), None)
        expected = sum(is_full_pass(i, interval, first_subject) for i in range(iterations))
        work = Workload.of(scheduler, steps, interval, alpha=alpha)
        assert (work.iterations, work.full_passes) == (iterations, expected)


def test_cpu_estimate_is_the_measured_constants_added_up():
    fast = PRESETS["fast"]
    work = Workload.of(fast.scheduler, fast.num_inference_steps, fast.cache_interval)
    assert (work.iterations, work.full_passes) == (20, 7)  # full at 0, 3, then 6, 9, ... from the switch at 6
    # bf16, 2 threads: 6.3 s per full batch-2 step, a tenth of it per cached step, CLIP 0.55 s, decode 8 s, 0.3 s
    bf16 = 6.3 * (7 + 0.1 * 13) + 0.55 + 8.0 + 0.3
    assert Estimator(Hardware("cpu", "bf16", 2)).seconds(work) == pytest.approx(bf16)
    assert Estimator(Hardware("cpu", "bf16", 4)).seconds(work) == pytest.approx(bf16 / 2)  # scaled by threads
    fp32 = 9.4 * (7 + 0.1 * 13) + 1.1 + 17.0 + 0.3
    assert Estimator(Hardware("cpu", "fp32", 2)).seconds(work) == pytest.approx(fp32)
    # 256 px: the step follows the 256 px measurement (1.3 s), the decode scales with pixels
    small = Workload.of("dpm", 20, 1, width=256, height=256)
    assert Estimator(Hardware("cpu", "bf16", 2)).seconds(small) == pytest.approx(20 * 1.3 + 0.55 + 8 / 4 + 0.3,
                                                                                 rel=0.01)


def test_gpu_estimate_matches_the_h100_runs_it_came_from():
    h100 = Estimator(Hardware("cuda", "fp16"))
    assert h100.seconds(Workload.of("pndm", 50)) == pytest.approx(2.00, abs=0.05)  # README: 2.00 s
    assert h100.seconds(Workload.of("dpm", 25)) == pytest.approx(1.01, abs=0.05)  # README: 1.01 s
    assert h100.seconds(Workload.of("pndm", 50, num_images=4)) == pytest.approx(2.17, abs=0.1)  # README: 2.17 s
    zero = Estimator(Hardware("zerogpu", "fp16"))
    assert zero.seconds(Workload.of("pndm", 50)) > h100.seconds(Workload.of("pndm", 50))


def test_measured_runs_replace_the_constants_and_then_average():
    est = Estimator(Hardware("cpu", "bf16", 2))
    work = Workload.of("dpm", 20, 3)
    modelled = est.iteration_seconds(work)
    est.observe(work, 2 * modelled)
    assert est.iteration_seconds(work) == pytest.approx(2 * modelled)  # the first run replaces the prior
    est.observe(work, 4 * modelled)
    assert est.iteration_seconds(work) == pytest.approx(3 * modelled)  # then a running average (1/2 weight)
    for _ in range(20):
        est.observe(work, 1 * modelled)
    assert est.iteration_seconds(work) == pytest.approx(modelled, rel=0.02)  # it follows a machine that speeds up
    other = Workload.of("pndm", 50, 1, width=768, height=768)
    assert est.seconds(other) == pytest.approx(Estimator(Hardware("cpu", "bf16", 2)).seconds(other), rel=0.02)
    est.observe(work, float("nan"))
    est.observe(work, 0.0)
    assert est.iteration_seconds(work) == pytest.approx(modelled, rel=0.02)


@pytest.mark.parametrize(("seconds", "text"), [(0.2, "1 s"), (3.4, "3 s"), (61, "60 s"), (78, "80 s"),
                                               (143, "140 s"), (300, "5 min")])
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


def test_zerogpu_duration_covers_the_estimate_within_the_limit():
    request = GenerationRequest(prompt="a woman img", images=[], num_inference_steps=50, scheduler="pndm")
    key = gpu.register(gpu.Engine(lambda: None, None, Estimator(Hardware("zerogpu", "fp16"))))
    estimate = gpu.ENGINES[key].estimator.seconds(gpu.workload(request, [[None]]))
    short = gpu.gpu_duration(key, request, [[None]], [])
    assert isinstance(short, int) and gpu.ZEROGPU_MIN_DURATION_S <= short <= gpu.ZEROGPU_MAX_DURATION_S
    assert short >= gpu.ZEROGPU_MARGIN * estimate  # covers the estimate with room to spare
    slow = gpu.register(gpu.Engine(lambda: None, None, Estimator(Hardware("cpu", "fp32", 1))))  # minutes per image
    assert gpu.gpu_duration(slow, request, [[None]], []) == gpu.ZEROGPU_MAX_DURATION_S
    request.num_images = 4
    assert gpu.gpu_duration(key, request, [[None]], []) >= short


def test_the_stream_reports_every_step_then_the_result(tiny_pipe):
    photo = PIL.Image.new("RGB", (64, 64), (120, 100, 90))
    request = GenerationRequest(prompt="a woman img", images=[photo], face_crop=False, num_inference_steps=4,
                                height=256, width=256, seed=3, scheduler="dpm")
    events = list(stream_generation(tiny_pipe, request))
    steps = [e for e in events if isinstance(e, StepEvent)]
    assert [(e.done, e.total) for e in steps] == [(k, 4) for k in range(1, 5)]
    assert all(a.elapsed <= b.elapsed for a, b in zip(steps, steps[1:]))
    assert [e.done for e in events if isinstance(e, PreviewEvent)] == [2]  # every 2nd, not after the last
    assert isinstance(events[-1], ResultEvent) and len(events[-1].result.images) == 1
    with pytest.raises(GenerationError, match="num_inference_steps` must be"):
        list(stream_generation(tiny_pipe, GenerationRequest(prompt="a woman img", images=[photo],
                                                            num_inference_steps=0)))


def test_closing_the_stream_stops_the_run(tiny_pipe, monkeypatch):
    calls = []
    forward = tiny_pipe.unet.forward

    def counted(*args, **kwargs):
        calls.append(time.monotonic())
        time.sleep(0.05)
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiny_pipe.unet, "forward", counted)
    request = GenerationRequest(prompt="a woman img", images=[PIL.Image.new("RGB", (64, 64))], face_crop=False,
                                num_inference_steps=40, height=256, width=256, scheduler="dpm")
    stream = stream_generation(tiny_pipe, request)
    for event in stream:
        if isinstance(event, StepEvent) and event.done == 3:
            break
    stream.close()  # returns once the run has ended
    assert 3 <= len(calls) <= 5
    time.sleep(0.3)
    assert len(calls) <= 5  # nothing runs on in the background


def test_a_sweep_streams_each_run_as_the_single_run_at_that_alpha(tiny_pipe, monkeypatch):
    from fastcomposer.generation.run import generate
    from fastcomposer.generation.streaming import RunEvent, stream_sweep

    photo = PIL.Image.new("RGB", (64, 64), (120, 100, 90))
    request = GenerationRequest(prompt="a woman img", images=[photo], face_crop=False, num_inference_steps=2,
                                height=256, width=256, seed=-1, scheduler="dpm")
    events = list(stream_sweep(tiny_pipe, request, [0.3, 0.9]))
    starts = [e for e in events if isinstance(e, RunEvent)]
    results = [e.result for e in events if isinstance(e, ResultEvent)]
    assert [(e.index, e.total, e.alpha) for e in starts] == [(0, 2, 0.3), (1, 2, 0.9)]
    assert events.index(starts[1]) > events.index(next(e for e in events if isinstance(e, ResultEvent)))
    assert results[0].seed == results[1].seed  # one seed, drawn once
    for result, alpha in zip(results, (0.3, 0.9)):
        single = generate(tiny_pipe, replace(request, alpha=alpha, seed=result.seed))
        assert result.records[0].alpha == alpha
        np.testing.assert_array_equal(np.asarray(result.images[0]), np.asarray(single.images[0]))

    calls = []
    forward = tiny_pipe.unet.forward
    monkeypatch.setattr(tiny_pipe.unet, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    stream = stream_sweep(tiny_pipe, replace(request, num_inference_steps=3), [0.3, 0.6, 0.9])
    for event in stream:
        if isinstance(event, RunEvent) and event.index == 1:
            break
    stream.close()  # between two runs: the next one never starts
    assert len(calls) == 3
