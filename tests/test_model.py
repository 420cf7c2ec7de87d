"""The post-fuse MLP and the subject image features, against the spec's formulas written out here."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from accelerate import init_empty_weights

from fastcomposer.models.postfuse import CLIP_MEAN, CLIP_STD, PostfuseModule, SubjectImageProcessor, encode_subjects


def spec_fuse(m: PostfuseModule, t: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """LN(mlp2(mlp1([t, o]) + t)) with mlp = LN -> Linear -> exact GELU -> Linear (+ x for mlp2)."""
    sd = {k: v for k, v in m.state_dict().items()}

    def mlp(x, prefix, residual):
        h = F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.layernorm.weight"], sd[f"{prefix}.layernorm.bias"])
        h = h @ sd[f"{prefix}.fc1.weight"].T + sd[f"{prefix}.fc1.bias"]
        h = 0.5 * h * (1 + torch.erf(h / 2**0.5))
        h = h @ sd[f"{prefix}.fc2.weight"].T + sd[f"{prefix}.fc2.bias"]
        return h + x if residual else h

    h = mlp(torch.cat([t, o], -1), "mlp1", False) + t
    h = mlp(h, "mlp2", True)
    return F.layer_norm(h, h.shape[-1:], sd["layer_norm.weight"], sd["layer_norm.bias"])


@pytest.fixture
def fuse():
    torch.manual_seed(0)
    m = PostfuseModule(embed_dim=16).eval()
    with torch.no_grad():  # non-trivial norms so a missed LayerNorm would show
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


def test_fuse_fn_matches_the_spec_formula(fuse):
    t, o = torch.randn(5, 16), torch.randn(5, 16)
    torch.testing.assert_close(fuse.fuse_fn(t, o), spec_fuse(fuse, t, o), rtol=1e-5, atol=1e-5)


def test_only_marked_positions_change_and_kth_marker_gets_kth_image(fuse):
    text = torch.randn(1, 10, 16)
    objects = torch.randn(1, 2, 1, 16)
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, [3, 7]] = True
    out = fuse(text, objects, mask, torch.tensor([2]))
    unchanged = ~mask[0]
    assert torch.equal(out[0, unchanged], text[0, unchanged])
    torch.testing.assert_close(out[0, 3], spec_fuse(fuse, text[0, 3], objects[0, 0, 0]))
    torch.testing.assert_close(out[0, 7], spec_fuse(fuse, text[0, 7], objects[0, 1, 0]))
    assert not torch.equal(out[0, 3], text[0, 3])


def test_extra_images_beyond_num_objects_are_ignored(fuse):
    text = torch.randn(1, 6, 16)
    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[0, 2] = True
    a = torch.randn(1, 3, 1, 16)
    b = a.clone()
    b[0, 1:] = 0
    torch.testing.assert_close(fuse(text, a, mask, torch.tensor([1])), fuse(text, b, mask, torch.tensor([1])))


def test_parameter_names_and_count_match_the_released_checkpoint():
    with init_empty_weights():
        m = PostfuseModule(embed_dim=768)
    names = set(m.state_dict())
    expected = {f"{mlp}.{layer}.{kind}" for mlp in ("mlp1", "mlp2") for layer in ("layernorm", "fc1", "fc2")
                for kind in ("weight", "bias")} | {"layer_norm.weight", "layer_norm.bias"}
    assert names == expected
    assert sum(p.numel() for p in m.parameters()) == 1_774_080 + 1_182_720 + 1_536


def test_subject_processor_pads_black_then_resizes():
    # A 40x20 white image: pad 10 black columns each side -> 40x40, then resize to 256.
    image = PIL.Image.new("RGB", (20, 40), (255, 255, 255))
    pixels = SubjectImageProcessor(256)([image])
    assert pixels.shape == (1, 1, 3, 256, 256) and pixels.dtype == torch.float32
    assert pixels[0, 0, :, 128, :20].max() == 0  # left bar is black
    assert pixels[0, 0, :, 128, -20:].max() == 0  # right bar is black
    assert pixels[0, 0, :, 128, 100:156].min() == 1.0  # centre is white


def test_subject_processor_matches_an_independent_float_resize():
    rng = np.random.RandomState(0)
    image = PIL.Image.fromarray((rng.rand(50, 30, 3) * 255).astype(np.uint8))
    ours = SubjectImageProcessor(64)([image])[0, 0]
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()
    x = F.pad(x, (10, 10, 0, 0))  # (50 - 30) // 2 on each side
    ref = F.interpolate(x[None], (64, 64), mode="bilinear", antialias=True, align_corners=False)[0]
    ref = ref.round().clamp(0, 255) / 255
    assert (ours - ref).abs().max() <= 1 / 255 + 1e-6  # uint8 rounding


def test_subject_features_are_pooled_projection_without_normalisation():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    enc = CLIPVisionModelWithProjection(
        CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         image_size=28, patch_size=14, projection_dim=16)
    ).eval()
    pixels = torch.rand(1, 2, 3, 40, 40)
    with torch.no_grad():
        ours = encode_subjects(enc, pixels)
        x = F.interpolate(pixels[0], (28, 28), mode="bilinear", antialias=True)
        x = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
        pooled = enc.vision_model(pixel_values=x).pooler_output  # post-LayerNorm CLS token
        ref = pooled @ enc.visual_projection.weight.T
    assert ours.shape == (1, 2, 1, 16)
    torch.testing.assert_close(ours[0, :, 0], ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours.norm(dim=-1), torch.ones(1))  # not L2-normalised
