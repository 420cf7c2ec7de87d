"""The few-step samplers (LCM, TCD) in FastComposer's loop: iterations, the conditioning switch, randomness."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastcomposer.inputs.prompt import parse_prompt
from fastcomposer.pipeline.schedulers import SCHEDULERS, make_scheduler, max_steps

from .test_pipeline import SMALL, gen, record_unet_conditions


@pytest.fixture
def face(photos):
    return photos["astronaut"]


@pytest.fixture
def sampler(tiny_pipe, request):
    """Switch the shared tiny pipeline to `request.param` for one test, and back to PNDM after it."""
    tiny_pipe.use_scheduler(request.param)
    yield request.param
    tiny_pipe.use_scheduler("pndm")


@pytest.mark.parametrize("sampler", ["lcm", "tcd"], indirect=True)
@pytest.mark.parametrize(("steps", "alpha"), [(4, 0.75), (4, 0.5), (8, 0.75), (8, 1.0), (2, 0.0)])
def test_few_step_delayed_conditioning_switch(tiny_pipe, face, monkeypatch, sampler, steps, alpha):
    calls = record_unet_conditions(tiny_pipe, monkeypatch)
    prompt = "a woman img in space"
    tiny_pipe(prompt, [face], num_inference_steps=steps, alpha=alpha, guidance_scale=1.5, negative_prompt="blurry",
              generator=gen(0), output_type="latent", **SMALL)
    with torch.no_grad():
        parsed = parse_prompt(prompt, tiny_pipe.tokenizer)
        text = tiny_pipe.encode_text(parsed.text_only, torch.device("cpu"))
        negative = tiny_pipe.encode_text("blurry", torch.device("cpu"))
        objects = tiny_pipe.encode_subject_images([face], torch.device("cpu"))
        augmented = tiny_pipe.encode_augmented_prompt(parsed, objects, torch.device("cpu"))

    assert len(calls) == steps  # one UNet call per step: neither sampler repeats a timestep
    seen = []
    for cond in calls:
        uncond, conditional = cond.chunk(2)  # guidance 1.5 > 1: CFG runs
        torch.testing.assert_close(uncond, negative)
        seen.append("text" if torch.allclose(conditional, text) else "subject")
        if seen[-1] == "subject":
            torch.testing.assert_close(conditional, augmented)
    assert seen == ["text" if i <= (1 - alpha) * steps else "subject" for i in range(steps)]


@pytest.mark.parametrize("sampler", ["lcm", "tcd"], indirect=True)
def test_few_step_samplers_start_at_the_last_training_timestep(tiny_pipe, sampler):
    tiny_pipe.scheduler.set_timesteps(4)
    timesteps = tiny_pipe.scheduler.timesteps.tolist()
    # 4 of the 50-step distillation schedule 999, 979, ..., 19, evenly spaced by index
    assert timesteps == [999 - 20 * k for k in (0, 12, 25, 37)]


@pytest.mark.parametrize("sampler", ["lcm", "tcd"], indirect=True)
def test_same_seed_same_image_and_guidance_one_skips_cfg(tiny_pipe, face, monkeypatch, sampler):
    calls = record_unet_conditions(tiny_pipe, monkeypatch)
    run = lambda seed: tiny_pipe("a woman img", [face], num_inference_steps=4, guidance_scale=1.0,  # noqa: E731
                                 generator=gen(seed), output_type="np", **SMALL).images
    a, b, c = run(3), run(3), run(4)
    assert np.array_equal(a, b) and np.abs(a - c).max() > 1e-3
    assert all(cond.shape[0] == 1 for cond in calls)


@pytest.mark.parametrize(
    ("sampler", "eta", "noisy"),
    [("lcm", None, True), ("tcd", None, True), ("tcd", 0.3, True), ("tcd", 0.0, False), ("ddim", None, False)],
    indirect=["sampler"],
)
def test_step_noise_comes_from_the_callers_generator(tiny_pipe, face, sampler, eta, noisy):
    """With the starting latents fixed, only the sampler's own per-step noise can depend on the generator."""
    latents = torch.randn(1, 4, 8, 8, generator=gen(0))
    run = lambda seed, eta: tiny_pipe("a woman img", [face], num_inference_steps=4, guidance_scale=1.5,  # noqa: E731
                                      latents=latents.clone(), eta=eta, generator=gen(seed), output_type="np",
                                      **SMALL).images
    a, b = run(1, eta), run(2, eta)
    assert np.array_equal(a, run(1, eta))
    assert (np.abs(a - b).max() > 1e-4) == noisy


def test_tcd_default_gamma_is_the_samplers_own(tiny_pipe, face):
    """`eta=None` leaves TCD at its default gamma (0.3); an explicit eta reaches its `step`."""
    tiny_pipe.use_scheduler("tcd")
    try:
        latents = torch.randn(1, 4, 8, 8, generator=gen(0))
        run = lambda eta: tiny_pipe("a woman img", [face], num_inference_steps=4, guidance_scale=1.5,  # noqa: E731
                                    latents=latents.clone(), eta=eta, generator=gen(5), output_type="np",
                                    **SMALL).images
        default, gamma_03, gamma_0 = run(None), run(0.3), run(0.0)
    finally:
        tiny_pipe.use_scheduler("pndm")
    assert np.array_equal(default, gamma_03)
    assert np.abs(default - gamma_0).max() > 1e-4


def test_few_step_samplers_share_the_base_noise_schedule():
    import json
    from pathlib import Path

    config = json.loads((Path(__file__).resolve().parents[1] / "fastcomposer/configs/scheduler.json").read_text())
    pndm = make_scheduler("pndm", config)
    for name in ("lcm", "tcd"):
        scheduler = make_scheduler(name, config)
        assert torch.equal(scheduler.alphas_cumprod, pndm.alphas_cumprod)
        assert max_steps(name) == 50
    assert max_steps("pndm") is None and {"lcm", "tcd"} <= set(SCHEDULERS)
