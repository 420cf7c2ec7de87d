"""Live previews: the clean-latent estimate, the latent-to-RGB approximation, and previews during a run."""

from __future__ import annotations

import numpy as np
import torch

from fastcomposer.pipeline.previews import LATENT_RGB_FACTORS, latents_to_rgb, predict_clean_latents
from fastcomposer.pipeline.schedulers import make_scheduler


def test_clean_latent_estimate_equals_ddims_own(tiny_pipe):
    """DDIM computes x0 itself (`pred_original_sample`); our sampler-independent formula must agree."""
    scheduler = make_scheduler("ddim", tiny_pipe._base_scheduler_config)
    scheduler.set_timesteps(10)
    torch.manual_seed(0)
    x, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    for t in scheduler.timesteps[:3]:
        ddim = scheduler.step(eps, t, x).pred_original_sample
        torch.testing.assert_close(predict_clean_latents(scheduler, x, eps, t), ddim, rtol=1e-4, atol=1e-4)


def test_latents_to_rgb_is_the_linear_map():
    latents = torch.zeros(2, 4, 3, 5)
    latents[1, 0] = 1.0  # channel 0 only: RGB = the first row of the matrix, in [-1, 1]
    images = latents_to_rgb(latents, upscale=1)
    assert [im.size for im in images] == [(5, 3), (5, 3)]
    assert np.all(np.asarray(images[0]) == 128)  # zero latents -> mid grey (127.5 rounds to 128)
    expected = [round((v + 1) * 127.5) for v in LATENT_RGB_FACTORS[0]]
    assert np.asarray(images[1])[1, 2].tolist() == expected
    assert latents_to_rgb(latents)[0].size == (20, 12)  # upscaled 4x by default


def test_previews_arrive_during_a_run_and_the_final_image_is_the_vaes(tiny_pipe, photos):
    from fastcomposer.generation.run import PREVIEW_EVERY, GenerationRequest, generate

    seen = []
    request = GenerationRequest(prompt="a woman img", images=[photos["astronaut"]], num_inference_steps=6,
                                height=256, width=256, seed=3, face_crop=False)
    with_previews = generate(tiny_pipe, request, on_preview=lambda d, n, ims: seen.append((d, n, ims)))
    without = generate(tiny_pipe, request)
    total = 7  # PNDM: 6 steps are 7 iterations
    assert [d for d, _, _ in seen] == list(range(PREVIEW_EVERY, total, PREVIEW_EVERY))
    assert all(n == total and len(ims) == 1 and ims[0].size == (128, 128) for _, n, ims in seen)
    assert np.array_equal(np.array(with_previews.images[0]), np.array(without.images[0]))
    assert with_previews.steps_done == with_previews.total_steps == total
