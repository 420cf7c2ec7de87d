"""Speed presets and precision choice: what each preset picks, what overrides it, and the app's default."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastcomposer.pipeline import presets
from fastcomposer.pipeline.schedulers import scheduler_name

SMALL = dict(height=64, width=64, output_type="np")


def gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def test_the_three_presets():
    assert presets.resolve("original") == presets.SamplingPlan("original", "pndm", 50, 1)
    assert presets.resolve("balanced") == presets.SamplingPlan("balanced", "dpm", 25, 1)
    fast = presets.resolve("fast")
    assert fast.scheduler == "dpm" and fast.cache_interval > 1 and fast.num_inference_steps < 25
    assert presets.resolve(None) == presets.resolve("original")  # scripts default to the paper's path


def test_explicit_choices_override_the_preset():
    plan = presets.resolve("fast", scheduler="euler", num_inference_steps=30, cache_interval=1)
    assert plan == presets.SamplingPlan("fast", "euler", 30, 1)
    assert presets.resolve("fast", num_inference_steps=12).cache_interval == presets.PRESETS["fast"].cache_interval


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="original, balanced, fast"):
        presets.get_preset("turbo")


@pytest.mark.parametrize(("device", "expected"), [("cpu", "fast"), ("cuda", "original"), ("mps", "original")])
def test_app_default_depends_on_the_device(monkeypatch, device, expected):
    monkeypatch.delenv(presets.PRESET_ENV, raising=False)
    name, reason = presets.default_app_preset(device)
    assert name == expected and reason


def test_environment_variable_sets_the_app_default(monkeypatch):
    monkeypatch.setenv(presets.PRESET_ENV, "balanced")
    assert presets.default_app_preset("cpu") == ("balanced", f"set by {presets.PRESET_ENV}")
    monkeypatch.setenv(presets.PRESET_ENV, "warp")
    with pytest.raises(ValueError, match="unknown preset"):
        presets.default_app_preset("cpu")


def test_a_call_with_a_preset_uses_its_sampler_and_steps_and_restores_the_pipeline(tiny_pipe, photos, monkeypatch):
    seen = []
    forward = tiny_pipe.unet.forward
    monkeypatch.setattr(tiny_pipe.unet, "forward", lambda *a, **k: seen.append(1) or forward(*a, **k))
    assert scheduler_name(tiny_pipe.scheduler) == "pndm"
    tiny_pipe("a woman img", [photos["astronaut"]], preset="balanced", num_inference_steps=4, generator=gen(0),
              **SMALL)
    assert len(seen) == 4  # DPM: 4 iterations (PNDM would run 5)
    assert scheduler_name(tiny_pipe.scheduler) == "pndm"  # the pipeline's own sampler is back
    seen.clear()
    tiny_pipe("a woman img", [photos["astronaut"]], num_inference_steps=4, generator=gen(0), **SMALL)
    assert len(seen) == 5


def test_a_preset_call_equals_the_same_settings_spelled_out(tiny_pipe, photos):
    via_preset = tiny_pipe("a woman img", [photos["astronaut"]], preset="fast", num_inference_steps=6,
                           generator=gen(1), **SMALL).images
    tiny_pipe.use_scheduler("dpm")
    try:
        spelled = tiny_pipe("a woman img", [photos["astronaut"]], num_inference_steps=6,
                            cache_interval=presets.PRESETS["fast"].cache_interval, generator=gen(1), **SMALL).images
    finally:
        tiny_pipe.use_scheduler("pndm")
    assert np.array_equal(via_preset, spelled)


def test_load_pipeline_preset_sets_the_sampler_and_the_default():
    from fastcomposer.pipeline.loading import load_pipeline

    pipe = load_pipeline("tiny", device="cpu", dtype="fp32", safety_checker=False, preset="fast")
    assert scheduler_name(pipe.scheduler) == "dpm" and pipe.default_preset == "fast"
    other = load_pipeline("tiny", device="cpu", dtype="fp32", safety_checker=False, preset="fast", scheduler="euler")
    assert scheduler_name(other.scheduler) == "euler"  # an explicit sampler wins


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_on_the_cpu_follows_native_bf16(monkeypatch, native, expected):
    from fastcomposer.pipeline import devices

    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    assert devices.pick_dtype("auto", torch.device("cpu")) == expected
    assert devices.pick_dtype("fp32", torch.device("cpu")) == torch.float32  # one flag away, always
    assert devices.pick_dtype("auto", torch.device("cuda")) == torch.float16


def test_native_bf16_probe_reads_the_cpu_flags(monkeypatch, tmp_path):
    from fastcomposer.pipeline import devices

    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    real_open = open

    def fake_cpuinfo(flags: str):
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        return lambda name, *a, **k: real_open(path if name == "/proc/cpuinfo" else name, *a, **k)

    monkeypatch.setattr("builtins.open", fake_cpuinfo("fpu sse avx2 avx512f"))
    assert devices.cpu_has_native_bf16() is False
    monkeypatch.setattr("builtins.open", fake_cpuinfo("fpu avx512f avx512_bf16"))
    assert devices.cpu_has_native_bf16() is True
