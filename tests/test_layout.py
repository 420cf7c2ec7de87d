"""Layout boxes and automatic separation: which attention logits are masked or biased, layer by layer and step by
step, against the rules written out here; what the processor computes with them; and that off is off.

The rules (pipeline/layout.py): S(p) is the set of subjects whose region holds cell p. Cross-attention, positive
half only: p may not attend to subject j's token when S(p) is non-empty and j is not in it; inside j's own box the
token gets `bias * (t / T) ** power`. Self-attention at the configured factors, both halves: p and q may not attend
to each other when S(p) and S(q) are both non-empty and disjoint.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastcomposer.pipeline import denoising
from fastcomposer.pipeline.attention import AttentionStore, layer_factors
from fastcomposer.pipeline.layout import (
    LAYOUT,
    attention_grids,
    regions_from_maps,
    text_only_positions,
)
from fastcomposer.pipeline.layout_attention import LayoutAttnProcessor, LayoutState

PROMPT = "a man img, a woman img and a dog img in a park"
# Overlapping boxes (cells in both belong to both subjects) and a free third subject. Every box holds cell centres
# on every grid of a 128 px image (16x16 latents, 8x8 at factor 2), so no box falls back to its centre cell.
BOXES = [(0.0, 0.0, 0.5, 1.0), (0.375, 0.25, 1.0, 0.75), None]
SIZE = 128


def membership(boxes, grid) -> list[set[int]]:
    """S(p) for every cell p of `grid`, row by row: the subjects whose box holds the cell's centre."""
    gh, gw = grid
    cells = []
    for r in range(gh):
        for c in range(gw):
            cy, cx = (r + 0.5) / gh, (c + 0.5) / gw
            cells.append({j for j, b in enumerate(boxes) if b is not None and b[0] <= cx < b[2] and b[1] <= cy < b[3]})
    return cells


def expected_cross(sets, positions, boxed, t, rows_negative, rows_positive, length=77) -> torch.Tensor:
    """The cross-attention mask by the rule, (B, 1, N, L), written out cell by cell."""
    mask = torch.zeros(rows_negative + rows_positive, 1, len(sets), length)
    weight = LAYOUT.bias * (t / 1000) ** LAYOUT.bias_power
    for b in range(rows_negative, rows_negative + rows_positive):
        for p, s in enumerate(sets):
            for j, position in enumerate(positions):
                if s and j not in s:
                    mask[b, 0, p, position] = -math.inf
                elif j in s and boxed[j]:
                    mask[b, 0, p, position] = weight
    return mask


def expected_self(sets, rows) -> torch.Tensor:
    mask = torch.zeros(rows, 1, len(sets), len(sets))
    for p, sp in enumerate(sets):
        for q, sq in enumerate(sets):
            if sp and sq and not (sp & sq):
                mask[:, 0, p, q] = -math.inf
    return mask


@pytest.fixture
def traced(monkeypatch):
    """Every LayoutState a call builds records each masked attention call into `states[k].trace`."""
    states = []

    class Traced(LayoutState):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.trace = []
            states.append(self)

    monkeypatch.setattr(denoising, "LayoutState", Traced)
    return states


def call(pipe, photos, *, boxes=None, separate=False, steps=4, guidance=5.0, n=2, **kw):
    images = [photos["astronaut"], photos["hopper"], photos["camera"]]
    timesteps = []

    def remember(p, i, t, tensors):
        timesteps.append(float(t))
        return tensors

    out = pipe(PROMPT, images, num_inference_steps=steps, height=SIZE, width=SIZE, guidance_scale=guidance,
               num_images_per_prompt=n, boxes=boxes, separate=separate, output_type="np",
               generator=torch.Generator().manual_seed(3), callback_on_step_end=remember, **kw)
    return out, timesteps


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_every_layer_and_step_masks_and_biases_by_the_rule(tiny_pipe, photos, traced, tokenizer, guidance):
    from fastcomposer.inputs.prompt import parse_prompt

    out, timesteps = call(tiny_pipe, photos, boxes=BOXES, guidance=guidance)
    (state,) = traced
    positions = parse_prompt(PROMPT, tokenizer).subject_positions
    factors = layer_factors(tiny_pipe.unet)
    grids = attention_grids((SIZE // 8, SIZE // 8), len(tiny_pipe.unet.config.block_out_channels))
    n, negative = 2, 2 if guidance > 1 else 0
    boxed = [b is not None for b in BOXES]
    cross_layers = sorted(name for name in factors if ".attn2." in name)
    self_layers = sorted(name for name, f in factors.items() if ".attn1." in name and f in LAYOUT.self_factors)
    assert self_layers  # (the tiny UNet's self-attention layers all sit at factor 2; SD1.5's at 1 stay unmasked)
    for i, t in enumerate(timesteps):
        records = [r for r in state.trace if r.step == i]
        assert sorted(r.layer for r in records if r.kind == "cross") == cross_layers
        assert sorted(r.layer for r in records if r.kind == "self") == self_layers
        for record in records:
            sets = membership(BOXES, grids[factors[record.layer]])
            if record.kind == "cross":
                want = expected_cross(sets, positions, boxed, t, negative, n)
            else:
                want = expected_self(sets, negative + n)
            assert record.mask.shape == want.shape
            assert torch.equal(torch.isinf(record.mask), torch.isinf(want)), (record.layer, i)
            finite = ~torch.isinf(want)
            assert torch.allclose(record.mask[finite], want[finite], atol=1e-6), (record.layer, i)
    # the bias fades with the timestep: strong at the first step, almost gone at the last
    first = expected_cross(membership(BOXES, (8, 8)), positions, boxed, timesteps[0], 0, 1).max()
    last = expected_cross(membership(BOXES, (8, 8)), positions, boxed, timesteps[-1], 0, 1).max()
    assert first > 0.5 and last < 0.01


def test_the_processor_computes_masked_attention(tiny_pipe):
    """One cross- and one self-attention layer: the processor's output is softmax(QK^T / sqrt(d) + M) V, projected."""
    unet = tiny_pipe.unet
    name = next(n for n, f in layer_factors(unet).items() if ".attn2." in n and f == 2).removesuffix(".processor")
    attn = unet.get_submodule(name)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 16, attn.to_q.in_features, generator=g)
    context = torch.randn(2, 77, attn.to_k.in_features, generator=g)
    mask = torch.zeros(2, 1, 16, 77)
    mask[1, 0, :8, 5] = -math.inf  # the positive row: the first 8 cells may not see token 5
    mask[1, 0, 8:, 9] = 2.0  # the last 8 get a bias on token 9

    class Fixed:
        trace = None

        def cross_mask(self, tokens, length):
            return mask

        def record(self, *a):
            pass

    with torch.no_grad():
        got = LayoutAttnProcessor(Fixed(), name)(attn, hidden, encoder_hidden_states=context)
        heads = attn.heads
        q = attn.to_q(hidden).view(2, 16, heads, -1).transpose(1, 2)
        k = attn.to_k(context).view(2, 77, heads, -1).transpose(1, 2)
        v = attn.to_v(context).view(2, 77, heads, -1).transpose(1, 2)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask, dim=-1)
        assert torch.all(weights[1, :, :8, 5] == 0) and torch.all(weights[0, :, :8, 5] > 0)
        want = attn.to_out[0]((weights @ v).transpose(1, 2).reshape(2, 16, -1))
    assert torch.allclose(got, want, atol=1e-5)


def test_no_boxes_and_no_separation_installs_nothing_and_changes_no_pixel(tiny_pipe, photos):
    original = dict(tiny_pipe.unet.attn_processors)
    seen = []

    def look(p, i, t, tensors):
        seen.append(all(proc is original[name] for name, proc in p.unet.attn_processors.items()))
        return tensors

    images = [photos["astronaut"], photos["hopper"], photos["camera"]]
    common = dict(num_inference_steps=3, height=SIZE, width=SIZE, output_type="np")
    plain = tiny_pipe(PROMPT, images, generator=torch.Generator().manual_seed(5), **common).images
    off = tiny_pipe(PROMPT, images, boxes=[None, None, None], separate=False, callback_on_step_end=look,
                    generator=torch.Generator().manual_seed(5), **common).images
    assert seen and all(seen)
    assert np.array_equal(plain, off)
    boxed = tiny_pipe(PROMPT, images, boxes=BOXES, generator=torch.Generator().manual_seed(5), **common).images
    assert not np.array_equal(plain, boxed)  # and the layout does act when it is on


def test_capture_in_the_same_run_changes_no_pixel_and_stays_inside_the_boxes(tiny_pipe, photos):
    halves = [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
    images = [photos["astronaut"], photos["hopper"]]
    kw = dict(num_inference_steps=4, height=SIZE, width=SIZE, output_type="np", boxes=halves)
    prompt = "a man img and a woman img"
    alone = tiny_pipe(prompt, images, generator=torch.Generator().manual_seed(1), **kw)
    both = tiny_pipe(prompt, images, generator=torch.Generator().manual_seed(1), return_attention=True, **kw)
    assert np.array_equal(alone.images, both.images)
    attention = both.attention
    assert attention.boxes == halves and attention.regions is not None
    for layer, maps in attention.layer_maps.items():  # (n, k, h, w) on the layer's own grid
        w = maps.shape[-1]
        left, right = maps[..., : w // 2].sum(dim=(-2, -1)), maps[..., w // 2:].sum(dim=(-2, -1))
        total = left + right
        assert (left[:, 0] / total[:, 0]).min() >= 0.95 and (right[:, 1] / total[:, 1]).min() >= 0.95, layer
        assert (right[:, 0] / total[:, 0]).max() <= 0.02 and (left[:, 1] / total[:, 1]).max() <= 0.02, layer


def test_the_subject_tokens_sit_at_the_same_positions_in_both_prompts(tokenizer):
    from fastcomposer.inputs.prompt import parse_prompt

    for prompt in [PROMPT, "a man img and a woman img hiking", "A photo of a man img, smiling; and a cat img.",
                   "two friends: a girl img (left) and a boy img (right) at the beach",
                   "a woman's img portrait, oil painting", "a sci-fi robot img next to a man img"]:
        parsed = parse_prompt(prompt, tokenizer)
        plain = tokenizer(parsed.text_only, padding="max_length", max_length=77, truncation=True).input_ids
        assert plain == parsed.input_ids, prompt  # the text-only prompt tokenises as the clean ids
        assert text_only_positions(tokenizer, parsed.text_only, parsed.input_ids, parsed.subject_positions) == \
            parsed.subject_positions


def test_a_moved_word_is_found_near_its_position():
    class Shifted:  # a tokenizer that puts one extra token in front
        def __call__(self, text, **kw):
            class Out:
                input_ids = [0, 9, 5, 6, 7, 8] + [0] * 71
            return Out()

    assert text_only_positions(Shifted(), "x", [0, 5, 6, 7, 8] + [0] * 72, [1, 3]) == [2, 4]


def test_separation_assigns_each_cell_to_the_strongest_subject_above_the_threshold():
    maps = torch.zeros(1, 2, 4, 4)
    maps[0, 0, :, :2] = 1.0  # subject 0 looks at the left half
    maps[0, 1, :, 2:] = 2.0  # subject 1 at the right half, twice as strongly
    maps[0, 1, 0, 0] = 1.5  # and a little at one left cell (below subject 0 there after smoothing? see below)
    regions = regions_from_maps(maps, threshold=0.5)
    # written out: 3x3 means (edges average what exists), each map over its own peak, winner per cell if >= 0.5
    pooled = torch.nn.functional.avg_pool2d(maps[0][:, None], 3, 1, 1, count_include_pad=False)[:, 0]
    share = pooled / pooled.flatten(1).max(dim=1).values[:, None, None]
    want = torch.zeros(2, 4, 4, dtype=torch.bool)
    for r in range(4):
        for c in range(4):
            j = int(share[:, r, c].argmax())
            want[j, r, c] = bool(share[j, r, c] >= 0.5)
    assert torch.equal(regions[0], want)
    assert want[0, :, 0].all() and want[1, :, 3].all()  # the halves are found
    free = torch.tensor([[False, True]])  # subject 0 has a box: only subject 1 may get cells
    assert not regions_from_maps(maps, 0.5, free)[0, 0].any()


def test_separation_masks_nothing_before_the_switch_and_its_regions_after(tiny_pipe, photos, traced, monkeypatch):
    captured = []
    original = LayoutState.separate

    def spy(self, maps):
        captured.append(maps.clone())
        return original(self, maps)

    monkeypatch.setattr(LayoutState, "separate", spy)
    out, timesteps = call(tiny_pipe, photos, separate=True, steps=4, alpha=0.5)
    (state,) = traced
    switch = next(i for i in range(len(timesteps)) if i > (1 - 0.5) * 4)
    assert {r.step for r in state.trace} == set(range(switch, len(timesteps)))
    (maps,) = captured
    assert maps.shape[:2] == (2, 3)  # 2 images, 3 subjects
    regions = regions_from_maps(maps, LAYOUT.separation_threshold)
    grid = tuple(maps.shape[-2:])
    factor = next(f for f, g in state.grids.items() if g == grid)
    assert torch.equal(state.regions[factor], regions)
    # the masks after the switch follow those regions: a cell of subject j shuts out the others' words
    record = next(r for r in state.trace if r.kind == "cross" and r.mask.shape[2] == grid[0] * grid[1])
    cells = regions.flatten(2)  # (n, k, N)
    for image in range(2):
        for j in range(3):
            others = cells[image].any(dim=0) & ~cells[image, j]
            position = state.plan.positions[j]
            assert torch.equal(torch.isinf(record.mask[2 + image, 0, :, position]), others)


def test_layout_composes_with_caching_several_images_and_a_lora(tiny_pipe, photos, traced, tmp_path):
    from fastcomposer.models.lora import apply_loras, remove_loras

    from .test_lora import lora_factors, write_peft

    out, _ = call(tiny_pipe, photos, boxes=BOXES, n=2, cache_interval=2)
    assert np.isfinite(out.images).all() and len(out.images) == 2 and traced[-1].trace
    plain, _ = call(tiny_pipe, photos, boxes=BOXES, n=1)
    apply_loras(tiny_pipe, [f"{write_peft(tmp_path / 'style.safetensors', lora_factors())}:1.0"])
    try:
        styled, _ = call(tiny_pipe, photos, boxes=BOXES, n=1)
    finally:
        remove_loras(tiny_pipe)
    assert traced[-1].trace and not np.allclose(plain.images, styled.images)


def test_a_compiled_unet_does_not_recompile_for_new_boxes(photos):
    """torch.compile's guards (the eager backend: the same guards, no code generation) see new boxes as new tensor
    values, not a new graph; and the compiled run gives the uncompiled run's pixels for the second set of boxes."""
    from torch._dynamo.utils import counters

    from fastcomposer.pipeline.loading import load_pipeline

    torch._dynamo.reset()
    pipe = load_pipeline("tiny", device="cpu", dtype="fp32", safety_checker=False)
    images = [photos["astronaut"], photos["hopper"]]
    a, b = [(0, 0, 0.5, 1), (0.5, 0, 1, 1)], [(0, 0, 0.3, 1), (0.3, 0, 1, 0.5)]

    def run(boxes):
        return pipe("a man img and a woman img", images, num_inference_steps=2, height=SIZE, width=SIZE,
                    boxes=boxes, output_type="np", generator=torch.Generator().manual_seed(0)).images

    eager_b = run(b)
    pipe.unet = torch.compile(pipe.unet, backend="eager", fullgraph=True)
    run(a)
    graphs = counters["stats"]["unique_graphs"]
    assert np.array_equal(run(b), eager_b)
    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()


def test_attention_store_keeps_each_layer_on_its_own_grid():
    store = AttentionStore(1, (8, 8), 2, 0)
    probs = torch.rand(1, 2, 16, 77).softmax(-1)
    store.add(probs, "a")
    store.add(probs * 0 + 1 / 77, "a")
    maps = store.layer_maps([3])["a"]
    assert maps.shape == (1, 1, 4, 4)
    want = (probs.mean(1)[0, :, 3].reshape(4, 4) + 1 / 77) / 2
    assert torch.allclose(maps[0, 0], want)
