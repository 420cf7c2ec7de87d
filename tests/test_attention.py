"""Per-subject cross-attention maps on the tiny model: layers, shapes, values, and no effect on the image."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from fastcomposer.pipeline.attention import attention_layers
from fastcomposer.pipeline.overlays import overlay

SMALL = dict(height=64, width=64, num_inference_steps=4)


def gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def test_default_layers_are_the_cross_attention_layers_at_half_and_quarter_resolution():
    from fastcomposer.models.architecture import build_modules, bundled_architecture

    sd15 = build_modules(bundled_architecture(), empty=True)["unet"]
    names = attention_layers(sd15)
    # SD1.5: down_blocks.1/2 (2 layers each) and up_blocks.1/2 (3 each): the 32x32 and 16x16 layers at 512 px.
    assert len(names) == 10 and all(".attn2." in n for n in names)
    assert {n.split(".attentions")[0] for n in names} == {"down_blocks.1", "down_blocks.2", "up_blocks.1",
                                                           "up_blocks.2"}
    assert "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor" in names  # the paper's Fig. 4 layer


def test_capture_changes_no_pixel_and_restores_the_processors(tiny_pipe, photos):
    before = {name: type(p) for name, p in tiny_pipe.unet.attn_processors.items()}
    args = dict(output_type="np", **SMALL)
    plain = tiny_pipe("a woman img and a man img", [photos["astronaut"], photos["hopper"]], generator=gen(3),
                      **args)
    captured = tiny_pipe("a woman img and a man img", [photos["astronaut"], photos["hopper"]], generator=gen(3),
                         return_attention=True, **args)
    assert np.array_equal(plain.images, captured.images)
    assert plain.attention is None and captured.attention is not None
    assert {name: type(p) for name, p in tiny_pipe.unet.attn_processors.items()} == before
    assert set(before.values()) == {AttnProcessor2_0}


def test_maps_per_subject_shapes_and_values(tiny_pipe, photos):
    out = tiny_pipe("a woman img and a man img at a cafe", [photos["astronaut"], photos["hopper"]],
                    num_images_per_prompt=2, generator=gen(4), return_attention=True, output_type="np",
                    **{**SMALL, "height": 128, "width": 96})
    att = out.attention
    latent = (128 // 8, 96 // 8)
    assert att.maps.shape == (2, 2, latent[0] // 2, latent[1] // 2)  # images, subjects, the 1/2-res grid
    assert att.token_maps.shape[:2] == (2, 77)
    assert (att.maps >= 0).all() and att.maps.sum() > 0
    # Only subject-conditioned iterations count: (1 - 0.75) * 4 = 1, so iterations 2..4 (PNDM runs 5).
    assert att.steps == 3
    # Softmax over the 77 tokens: summed over every token, each position's attention is 1.
    torch.testing.assert_close(att.token_maps.sum(dim=1), torch.ones(2, *att.maps.shape[-2:]), rtol=1e-4, atol=1e-4)
    # Each subject's map is its token's column, and differs from an ordinary word's.
    for k, pos in enumerate(att.positions):
        assert torch.equal(att.maps[:, k], att.token_maps[:, pos])
    ordinary = att.positions[-1] + 3  # "cafe", not a subject
    assert ordinary not in att.positions
    assert not torch.allclose(att.maps[:, 0], att.token_maps[:, ordinary])
    assert not torch.allclose(att.maps[:, 0], att.maps[:, 1])


def test_captured_probabilities_equal_an_independent_softmax(tiny_pipe, photos):
    """One layer's capture against plain torch ops: softmax(q k^T / sqrt(d)) on the conditional half, mean over
    heads; and the processor's output equals diffusers' own SDPA processor's, bit for bit."""
    from fastcomposer.pipeline.attention import AttentionStore, CaptureAttnProcessor

    name = attention_layers(tiny_pipe.unet)[0].removesuffix(".processor")  # down_blocks.1: 1/2 resolution
    layer = tiny_pipe.unet.get_submodule(name)
    inputs = []
    hook = layer.register_forward_hook(lambda m, args, kwargs, out: inputs.append((args, kwargs)), with_kwargs=True)
    try:
        tiny_pipe("a woman img", [photos["astronaut"]], generator=gen(5), output_type="latent",
                  **{**SMALL, "num_inference_steps": 1})
    finally:
        hook.remove()
    (hidden,), kwargs = inputs[-1]
    context = kwargs["encoder_hidden_states"]
    heads, head_dim = layer.heads, layer.inner_dim // layer.heads
    with torch.no_grad():
        q = layer.to_q(hidden[1:]).reshape(1, -1, heads, head_dim).transpose(1, 2)
        k = layer.to_k(context[1:]).reshape(1, -1, heads, head_dim).transpose(1, 2)
        expected = torch.softmax(q @ k.transpose(-1, -2) / head_dim**0.5, dim=-1).mean(dim=1)[0]  # (N, 77)
        store = AttentionStore(1, (8, 8), grid_factor=2, cond_offset=1)
        store.active = True
        captured_out = CaptureAttnProcessor(store)(layer, hidden, encoder_hidden_states=context)
        plain_out = AttnProcessor2_0()(layer, hidden, encoder_hidden_states=context)
    assert torch.equal(captured_out, plain_out)
    side = int(expected.shape[0] ** 0.5)
    torch.testing.assert_close(store.token_maps()[0], expected.T.reshape(77, side, side), rtol=1e-4, atol=1e-5)


def test_overlay_has_a_legend_and_tints_where_the_map_is(tiny_pipe):
    image = PIL.Image.new("RGB", (64, 64), (128, 128, 128))
    maps = torch.zeros(2, 8, 8)
    maps[0, :4, :4] = 1.0  # subject 1: top-left
    maps[1, 4:, 4:] = 1.0  # subject 2: bottom-right
    drawn = overlay(image, maps, ["woman", "man"])
    assert drawn.width == 64 and drawn.height > 64  # the legend strip below
    pixels = np.asarray(drawn).astype(int)
    assert np.abs(pixels[8, 8] - 128).sum() > 60  # tinted
    assert np.abs(pixels[56, 56] - 128).sum() > 60
    assert np.abs(pixels[8, 56] - 128).sum() < 10  # untouched where no subject attends
    assert not np.array_equal(pixels[8, 8], pixels[56, 56])  # one colour per subject
