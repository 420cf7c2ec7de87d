"""DeepCache feature caching on the tiny model: where full passes run, what a cached pass reuses, cleanup."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastcomposer.inputs.prompt import parse_prompt
from fastcomposer.pipeline.caching import HOOK_NAME, FeatureCache, cached_modules

SMALL = dict(height=64, width=64)


def gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def spy_iterations(pipe, monkeypatch) -> tuple[list[torch.Tensor], list[int]]:
    """Per UNet call, the conditioning it got; and the indices of the calls in which the mid block really ran."""
    conds: list[torch.Tensor] = []
    deep_ran: list[int] = []
    forward = pipe.unet.forward
    mid_resnet = pipe.unet.mid_block.resnets[0]
    resnet_forward = mid_resnet.forward

    def unet_spy(sample, timestep, encoder_hidden_states, *args, **kwargs):
        conds.append(encoder_hidden_states.detach().clone())
        return forward(sample, timestep, encoder_hidden_states, *args, **kwargs)

    def mid_spy(*args, **kwargs):
        deep_ran.append(len(conds) - 1)
        return resnet_forward(*args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", unet_spy)
    monkeypatch.setattr(mid_resnet, "forward", mid_spy)
    return conds, deep_ran


@pytest.mark.parametrize("scheduler", ["pndm", "dpm"])
@pytest.mark.parametrize(("alpha", "interval"), [(0.75, 3), (0.5, 3), (0.6, 4), (1.0, 2), (0.0, 3)])
def test_full_pass_at_first_step_and_at_the_conditioning_switch(tiny_pipe, photos, monkeypatch, scheduler, alpha,
                                                                 interval):
    steps = 20
    tiny_pipe.use_scheduler(scheduler)
    try:
        conds, deep_ran = spy_iterations(tiny_pipe, monkeypatch)
        tiny_pipe("a woman img in space", [photos["astronaut"]], num_inference_steps=steps, alpha=alpha,
                  cache_interval=interval, generator=gen(0), output_type="latent", **SMALL)
    finally:
        tiny_pipe.use_scheduler("pndm")

    with torch.no_grad():
        parsed = parse_prompt("a woman img in space", tiny_pipe.tokenizer)
        text = tiny_pipe.encode_text(parsed.text_only, torch.device("cpu"))
    # Which conditioning each iteration saw: text-only while i <= (1 - alpha) * N (the spec's rule).
    kinds = ["text" if torch.allclose(c.chunk(2)[1], text) else "subject" for c in conds]
    assert kinds == ["text" if i <= (1 - alpha) * steps else "subject" for i in range(len(conds))]
    full = set(deep_ran)
    assert 0 in full  # the first step is always a full pass
    if "subject" in kinds:
        assert kinds.index("subject") in full  # so is the first subject-conditioned step
    for i in range(len(conds)):
        if i in full:
            continue
        last_full = max(j for j in full if j < i)
        # A cached pass reuses features computed with the same conditioning as its own...
        assert kinds[last_full] == kinds[i], (i, last_full)
        # ...and at most interval - 1 cached passes follow one full pass.
        assert i - last_full < interval
    # The cache really skips: fewer deep passes than iterations, and not fewer than needed.
    assert len(full) < len(conds)
    anchors = 1 + ("subject" in kinds and "text" in kinds)
    assert len(full) >= max(anchors, -(-len(conds) // interval))


def test_a_cached_pass_with_the_same_inputs_equals_a_full_pass(tiny_pipe):
    """The skip branch recomputes only the shallow layers: fed the inputs of the last full pass, it must
    reproduce that pass exactly (the deep features it reuses are exactly the ones those inputs give)."""
    unet = tiny_pipe.unet
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    cond = torch.randn(2, 77, unet.config.cross_attention_dim)
    t = torch.tensor(500)
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]
        with FeatureCache.attach(unet, interval=3) as cache:
            cache.full = True
            first = unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]
            cache.full = False
            again = unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]
            moved = unet(x + 0.5, t, encoder_hidden_states=cond, return_dict=False)[0]
        uncached_moved = unet(x + 0.5, t, encoder_hidden_states=cond, return_dict=False)[0]
    assert torch.equal(first, plain)
    assert torch.equal(again, first)
    # With new latents the shallow branch is recomputed (the output moves) but the deep features are the
    # old ones, so it differs from a full pass on the new latents.
    assert not torch.equal(moved, first)
    assert not torch.equal(moved, uncached_moved)


def test_hooks_are_removed_after_a_call(tiny_pipe, photos):
    args = dict(num_inference_steps=4, generator=gen(1), output_type="np", **SMALL)
    before = tiny_pipe("a woman img", [photos["astronaut"]], **args).images
    cached = tiny_pipe("a woman img", [photos["astronaut"]], cache_interval=2, **{**args, "generator": gen(1)}).images
    after = tiny_pipe("a woman img", [photos["astronaut"]], **{**args, "generator": gen(1)}).images
    assert np.array_equal(before, after)
    assert not np.array_equal(before, cached)  # with caching the result is (slightly) different
    for module in cached_modules(tiny_pipe.unet).values():
        registry = getattr(module, "_diffusers_hook", None)
        assert registry is None or registry.get_hook(HOOK_NAME) is None


def test_interval_one_is_no_caching(tiny_pipe, photos):
    args = dict(num_inference_steps=3, output_type="np", **SMALL)
    plain = tiny_pipe("a woman img", [photos["astronaut"]], generator=gen(2), **args).images
    one = tiny_pipe("a woman img", [photos["astronaut"]], generator=gen(2), cache_interval=1, **args).images
    assert np.array_equal(plain, one)


def test_bad_interval_is_a_clear_error(tiny_pipe, photos):
    with pytest.raises(ValueError, match="cache_interval"):
        tiny_pipe("a woman img", [photos["astronaut"]], num_inference_steps=2, cache_interval=0, **SMALL)
