"""The pipeline on the tiny model: delayed conditioning, faithfulness, seeds, subjects, stop, safety."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastcomposer.inputs.prompt import parse_prompt

from .reference import original_generate

SMALL = dict(height=64, width=64)


def gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture
def face(photos):
    return photos["astronaut"]


def record_unet_conditions(pipe, monkeypatch) -> list[torch.Tensor]:
    """Wrap the UNet so every call's encoder_hidden_states is kept."""
    calls: list[torch.Tensor] = []
    forward = pipe.unet.forward

    def spy(sample, timestep, encoder_hidden_states, *args, **kwargs):
        calls.append(encoder_hidden_states.detach().clone())
        return forward(sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", spy)
    return calls


@pytest.mark.parametrize("scheduler", ["pndm", "dpm", "lcm", "tcd"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.75, 1.0])
def test_delayed_conditioning_switch(tiny_pipe, face, monkeypatch, scheduler, alpha):
    steps = 50
    tiny_pipe.use_scheduler(scheduler)
    try:
        calls = record_unet_conditions(tiny_pipe, monkeypatch)
        prompt = "a woman img in space"
        tiny_pipe(prompt, [face], num_inference_steps=steps, alpha=alpha, guidance_scale=5.0,
                  negative_prompt="blurry", generator=gen(0), output_type="latent", **SMALL)
    finally:
        tiny_pipe.use_scheduler("pndm")

    with torch.no_grad():
        parsed = parse_prompt(prompt, tiny_pipe.tokenizer)
        text = tiny_pipe.encode_text(parsed.text_only, torch.device("cpu"))
        negative = tiny_pipe.encode_text("blurry", torch.device("cpu"))
        objects = tiny_pipe.encode_subject_images([face], torch.device("cpu"))
        augmented = tiny_pipe.encode_augmented_prompt(parsed, objects, torch.device("cpu"))
    assert not torch.allclose(text, augmented)

    iterations = 51 if scheduler == "pndm" else 50  # PNDM repeats its first PLMS timestep
    assert len(calls) == iterations
    seen = []
    for cond in calls:
        uncond, conditional = cond.chunk(2)
        torch.testing.assert_close(uncond, negative)  # never any subject information
        if torch.allclose(conditional, text):
            seen.append("text")
        else:
            torch.testing.assert_close(conditional, augmented)
            seen.append("subject")
    # The spec's rule, written out: text-only while i <= (1 - alpha) * N, an unrounded float.
    expected = ["text" if i <= (1 - alpha) * steps else "subject" for i in range(iterations)]
    assert seen == expected
    # The spec's table: PNDM 51 iterations -> 51, 26, 13, 1 text-only iterations for these alphas.
    table = {0.0: 51, 0.5: 26, 0.75: 13, 1.0: 1} if scheduler == "pndm" else {0.0: 50, 0.5: 26, 0.75: 13, 1.0: 1}
    assert seen.count("text") == table[alpha]


@pytest.mark.parametrize("num_subjects", [1, 2])
def test_matches_the_original_implementation(tiny_pipe, photos, num_subjects):
    """Same networks, images, seed, PNDM: our images equal the released algorithm's to float noise."""
    prompt = ["a woman img and a man img at a cafe", "a photo of a woman img"][num_subjects == 1]
    images = [photos["astronaut"], photos["hopper"]][:num_subjects]
    settings = dict(num_inference_steps=8, guidance_scale=5.0, alpha=0.75, num_images_per_prompt=2)
    ours = tiny_pipe(prompt, images, negative_prompt="lowres", generator=gen(42), output_type="np",
                     **settings, **SMALL).images
    ours = (ours * 255).round().astype(np.uint8)
    ref = original_generate(tiny_pipe, prompt, images, "lowres", settings["num_inference_steps"],
                            settings["guidance_scale"], settings["alpha"], 2, 42, 64, 64)
    assert ours.shape == ref.shape == (2, 64, 64, 3)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1  # at most one grey level of float noise
    assert ref.std() > 5  # a real image, not a constant


def test_same_seed_same_image_different_seed_different(tiny_pipe, face):
    run = lambda seed: tiny_pipe("a woman img", [face], num_inference_steps=3, generator=gen(seed),  # noqa: E731
                                 output_type="np", **SMALL).images
    a, b, c = run(7), run(7), run(8)
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 0.01


@pytest.mark.parametrize("n", [1, 2, 4])
def test_one_two_and_four_subjects(tiny_pipe, photos, n):
    words = ["woman", "man", "child", "doctor"][:n]
    prompt = " and ".join(f"a {w} img" for w in words) + " in a park"
    images = [photos["astronaut"], photos["hopper"], photos["camera"], photos["astronaut"]][:n]
    out = tiny_pipe(prompt, images, num_inference_steps=2, generator=gen(0), num_images_per_prompt=2, **SMALL)
    assert len(out.images) == 2 and all(im.size == (64, 64) for im in out.images)
    assert out.nsfw_content_detected is None and not out.interrupted


def test_subject_count_mismatch_is_a_clear_error(tiny_pipe, face):
    with pytest.raises(ValueError, match="2 subject marker.*1 subject image"):
        tiny_pipe("a man img and a woman img", [face], num_inference_steps=1, **SMALL)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(alpha=1.5), "alpha"),
        (dict(guidance_scale=0.5), "guidance_scale"),
        (dict(height=60), "multiples of 8"),
        (dict(num_inference_steps=0), "num_inference_steps"),
    ],
)
def test_check_inputs_names_the_argument(tiny_pipe, face, kwargs, message):
    args = dict(num_inference_steps=1, **SMALL)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        tiny_pipe("a woman img", [face], **args)


def test_guidance_one_runs_without_the_unconditional_branch(tiny_pipe, face, monkeypatch):
    calls = record_unet_conditions(tiny_pipe, monkeypatch)
    tiny_pipe("a woman img", [face], num_inference_steps=2, guidance_scale=1.0, generator=gen(0),
              output_type="latent", **SMALL)
    assert all(c.shape[0] == 1 for c in calls)


def test_stop_from_a_step_callback_ends_the_loop(tiny_pipe, face, monkeypatch):
    calls = record_unet_conditions(tiny_pipe, monkeypatch)
    seen = []

    def on_step(pipe, i, t, tensors):
        seen.append((i, tuple(tensors["latents"].shape)))
        if i == 2:
            pipe.request_stop()
        return tensors

    out = tiny_pipe("a woman img", [face], num_inference_steps=20, generator=gen(0),
                    callback_on_step_end=on_step, **SMALL)
    assert out.interrupted and out.images == []
    assert len(calls) == 3 and [i for i, _ in seen] == [0, 1, 2]
    assert seen[0][1] == (1, 4, 8, 8)
    # the next call runs normally
    assert not tiny_pipe("a woman img", [face], num_inference_steps=2, generator=gen(0), **SMALL).interrupted


def test_mmagic_infer_alias(tiny_pipe, face):
    out = tiny_pipe.infer("a woman img", num_inference_steps=2, guidance_scale=7.5, num_images_per_prompt=2,
                          generator=gen(1), alpha_=0.7, reference_subject_images=[face], **SMALL)
    direct = tiny_pipe("a woman img", [face], num_inference_steps=2, guidance_scale=7.5, num_images_per_prompt=2,
                       generator=gen(1), alpha=0.7, **SMALL)
    assert set(out) >= {"samples"} and len(out["samples"]) == 2
    assert all(np.array_equal(np.array(a), np.array(b)) for a, b in zip(out["samples"], direct.images))


def test_flagged_images_are_replaced_and_reported(tiny_pipe, face):
    from fastcomposer.models.testing import tiny_safety_checker

    args = dict(num_inference_steps=2, generator=gen(3), num_images_per_prompt=2, **SMALL)
    clean = tiny_pipe("a woman img", [face], **args).images
    checker, extractor = tiny_safety_checker(flag_everything=True)
    tiny_pipe.register_modules(safety_checker=checker, feature_extractor=extractor)
    try:
        out = tiny_pipe("a woman img", [face], **{**args, "generator": gen(3)})
    finally:
        tiny_pipe.register_modules(safety_checker=None)
    assert out.nsfw_content_detected == [True, True]
    for hidden, original in zip(out.images, clean):
        pixels = np.array(hidden)
        assert (pixels == 128).all()  # a flat placeholder
        assert not np.array_equal(pixels, np.array(original))


def test_unflagged_images_pass_through_the_checker(tiny_pipe, face):
    from fastcomposer.models.testing import tiny_safety_checker

    args = dict(num_inference_steps=2, num_images_per_prompt=1, **SMALL)
    clean = tiny_pipe("a woman img", [face], generator=gen(4), **args).images[0]
    checker, extractor = tiny_safety_checker(flag_everything=False)
    tiny_pipe.register_modules(safety_checker=checker, feature_extractor=extractor)
    try:
        out = tiny_pipe("a woman img", [face], generator=gen(4), **args)
    finally:
        tiny_pipe.register_modules(safety_checker=None)
    assert out.nsfw_content_detected == [False]
    assert np.array_equal(np.array(out.images[0]), np.array(clean))


@pytest.mark.gpu
def test_cpu_generator_gives_the_same_image_on_cuda(face):
    from fastcomposer.pipeline.loading import load_pipeline

    images = []
    for device in ("cpu", "cuda"):
        pipe = load_pipeline("tiny", device=device, dtype="fp32", safety_checker=False)
        images.append(pipe("a woman img", [face], num_inference_steps=4, generator=gen(5), output_type="np",
                           **SMALL).images)
    assert np.abs(images[0] - images[1]).max() < 1e-2


@pytest.mark.gpu
def test_auto_dtype_on_cuda_is_fp16_and_finite(face):
    from fastcomposer.pipeline.loading import load_pipeline

    pipe = load_pipeline("tiny", device="auto", dtype="auto", safety_checker=False)
    assert pipe.device.type == "cuda" and pipe.unet.dtype == torch.float16
    out = pipe("a woman img", [face], num_inference_steps=4, generator=gen(0), output_type="np", **SMALL)
    assert np.isfinite(out.images).all() and out.images.shape == (1, 64, 64, 3)


def test_subject_embeddings_are_cached_for_the_same_photos(tiny_pipe, photos, monkeypatch):
    calls = []
    forward = tiny_pipe.image_encoder.forward

    def counting(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiny_pipe.image_encoder, "forward", counting)
    tiny_pipe._subject_cache.clear()
    a = tiny_pipe.encode_subject_images([photos["astronaut"]], torch.device("cpu"))
    b = tiny_pipe.encode_subject_images([photos["astronaut"].copy()], torch.device("cpu"))  # same pixels
    c = tiny_pipe.encode_subject_images([photos["hopper"]], torch.device("cpu"))
    assert len(calls) == 2 and torch.equal(a, b) and not torch.equal(a, c)


def sd15_pndm_timesteps(steps: int) -> list[int]:
    import json
    from pathlib import Path

    from diffusers import PNDMScheduler

    config = json.loads((Path(__file__).resolve().parents[1] / "fastcomposer/configs/scheduler.json").read_text())
    scheduler = PNDMScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps.tolist()


def test_pndm_timesteps_survive_loading_with_another_sampler(tmp_path):
    """Built with DPM first (whose default spacing differs), PNDM must still use SD1.5's timesteps."""
    from fastcomposer.pipeline.loading import load_pipeline

    pipe = load_pipeline("tiny", device="cpu", dtype="fp32", safety_checker=False, scheduler="dpm")
    for name in ("euler", "pndm"):
        pipe.use_scheduler(name)
    pipe.scheduler.set_timesteps(50)
    assert pipe.scheduler.timesteps.tolist() == sd15_pndm_timesteps(50)
    assert pipe.scheduler.timesteps.tolist()[:3] == [981, 961, 961]
    # A folder saved while another sampler was active must not change PNDM either.
    pipe.use_scheduler("euler")
    pipe.save_pretrained(tmp_path / "saved")
    again = load_pipeline(tmp_path / "saved", device="cpu", dtype="fp32", safety_checker=False)
    again.scheduler.set_timesteps(50)
    assert again.scheduler.timesteps.tolist() == sd15_pndm_timesteps(50)


def test_bf16_on_the_cpu_generates(photos):
    from fastcomposer.pipeline.loading import load_pipeline

    pipe = load_pipeline("tiny", device="cpu", dtype="bf16", safety_checker=False)
    out = pipe("a woman img", [photos["astronaut"]], num_inference_steps=2, generator=gen(0), output_type="np",
               **SMALL)
    assert np.isfinite(out.images).all() and out.images.shape == (1, 64, 64, 3)


def test_a_converted_folder_loads_with_plain_from_pretrained(tmp_path, photos):
    """`convert`'s default output works with diffusers' own from_pretrained, no dtype given."""
    import subprocess
    import sys
    from pathlib import Path

    from fastcomposer import FastComposerPipeline
    from fastcomposer.models.architecture import build_modules, tiny_architecture
    from fastcomposer.models.testing import released_state_dict, write_model_folders

    arch = tiny_architecture()
    torch.save(released_state_dict(build_modules(arch, empty=False)), tmp_path / "model.bin")
    write_model_folders(arch, tmp_path / "base", tmp_path / "clip")
    result = subprocess.run(
        [sys.executable, "-m", "fastcomposer", "convert", str(tmp_path / "model.bin"), str(tmp_path / "out"),
         "--base-model", str(tmp_path / "base"), "--image-encoder", str(tmp_path / "clip")],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    pipe = FastComposerPipeline.from_pretrained(tmp_path / "out")
    assert {p.dtype for p in pipe.image_encoder.parameters()} == {torch.float32}
    out = pipe("a woman img", [photos["astronaut"]], num_inference_steps=2, generator=gen(0), **SMALL)
    assert len(out.images) == 1
