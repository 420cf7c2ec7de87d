"""The bundled configs: a wrong value here would load the real checkpoint silently and ruin images."""

from __future__ import annotations

import json

import pytest

from fastcomposer.models.architecture import build_modules, bundled_architecture, tiny_architecture, with_overrides
from fastcomposer.pipeline.schedulers import make_scheduler


@pytest.fixture(scope="module")
def sd15():
    arch = bundled_architecture()
    return arch, build_modules(arch, empty=True)


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_are_the_published_ones(sd15):
    _, m = sd15
    assert count(m["unet"]) == 859_520_964
    assert count(m["vae"]) == 83_653_863
    assert count(m["text_encoder"]) == 123_060_480
    assert count(m["image_encoder"]) == 303_966_208
    assert count(m["postfuse_module"]) == 2_958_336
    assert all(p.device.type == "meta" for p in m["unet"].parameters())  # nothing allocated


def test_shape_neutral_settings(sd15):
    """Values that change no tensor shape, so only a test like this one notices them."""
    _, m = sd15
    unet, vae = m["unet"].config, m["vae"].config
    assert unet.attention_head_dim == 8  # SD1.5: 8 heads in every block
    assert unet.flip_sin_to_cos is True and unet.freq_shift == 0
    assert unet.norm_eps == 1e-5 and unet.act_fn == "silu" and unet.cross_attention_dim == 768
    assert vae.scaling_factor == 0.18215
    text, vision = m["text_encoder"].config, m["image_encoder"].config
    assert text.num_attention_heads == 12 and text.hidden_act == "quick_gelu" and text.layer_norm_eps == 1e-5
    assert text.max_position_embeddings == 77 and text.vocab_size == 49408
    assert vision.num_attention_heads == 16 and vision.hidden_act == "quick_gelu" and vision.layer_norm_eps == 1e-5
    assert vision.image_size == 224 and vision.patch_size == 14 and vision.projection_dim == 768
    assert m["image_encoder"].visual_projection.bias is None


def test_pndm_scheduler_is_sd15s():
    sched = make_scheduler("pndm", bundled_architecture().scheduler)
    c = sched.config
    assert (c.beta_start, c.beta_end, c.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert c.steps_offset == 1 and c.skip_prk_steps is True and c.set_alpha_to_one is False
    assert c.prediction_type == "epsilon" and c.num_train_timesteps == 1000
    sched.set_timesteps(50)
    assert len(sched.timesteps) == 51  # the first PLMS timestep is repeated


@pytest.mark.parametrize("name", ["pndm", "dpm", "ddim", "euler"])
def test_every_sampler_keeps_the_noise_schedule(name):
    c = make_scheduler(name, bundled_architecture().scheduler).config
    assert (c.beta_start, c.beta_end, c.beta_schedule, c.steps_offset) == (0.00085, 0.012, "scaled_linear", 1)


def test_overrides_from_hub_style_folders(tmp_path):
    from fastcomposer.models.testing import write_model_folders

    tiny = tiny_architecture()
    write_model_folders(tiny, tmp_path / "base", tmp_path / "clip")
    assert "vision_config" in json.loads((tmp_path / "clip" / "config.json").read_text())  # a full CLIPConfig
    arch = with_overrides(bundled_architecture(), tmp_path / "base", tmp_path / "clip")
    m = build_modules(arch, empty=True)
    assert m["unet"].config.block_out_channels == tuple(tiny.unet["block_out_channels"]) or list(
        m["unet"].config.block_out_channels) == list(tiny.unet["block_out_channels"])
    assert m["image_encoder"].config.hidden_size == tiny.image_encoder["hidden_size"]
    assert m["postfuse_module"].config.embed_dim == tiny.embed_dim


def test_mismatched_widths_are_refused(tmp_path):
    from dataclasses import replace

    bad = replace(tiny_architecture(), image_encoder=dict(tiny_architecture().image_encoder, projection_dim=64))
    with pytest.raises(ValueError, match="post-fuse"):
        bad.validate()
